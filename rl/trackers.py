"""Optional experiment trackers: Weights & Biases and MLflow (``pip install -e '.[trackers]'``).

``logging.tracker: wandb`` or ``mlflow`` adds one of them to the console and ``metrics.jsonl``.
No credential goes through the config: each reads its own environment, as its docs say.

- W&B: ``WANDB_API_KEY`` (or ``wandb login``), ``WANDB_PROJECT`` (default ``api-adapter``),
  ``WANDB_MODE=offline`` to write ``RUN/wandb/`` for a later ``wandb sync``.
- MLflow: ``MLFLOW_TRACKING_URI`` (a tracking server or database), else a file store in
  ``RUN/mlruns`` (MLflow 3 keeps that backend in maintenance mode; it is allowed for this run);
  ``MLFLOW_EXPERIMENT_NAME`` (default ``api-adapter``).

Each gets every numeric metric of a step under its name (MLflow refuses some characters, e.g.
the ``*`` of ``reward/symbol/*``: those become ``_``) and the resolved config (W&B's run config,
MLflow's params as ``section.key``). The tracker's run id is kept in ``RUN/tracker_runs.json``,
so a resumed run (``checkpoint.resume``) goes on logging into the same tracker run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

RUNS_FILE = "tracker_runs.json"


def numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    >>> flatten({"rollout": {"group_size": 8, "stop": ["}"]}, "seed": 0})
    {'rollout.group_size': 8, 'rollout.stop': ['}'], 'seed': 0}
    """
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / :`` and spaces).

    >>> mlflow_name("reward/symbol/*")
    'reward/symbol/_'
    """
    return re.sub(r"[^\w\-./: ]", "_", key)


class _RunIds:
    """The tracker run ids of one run folder (RUN/tracker_runs.json)."""

    def __init__(self, run: Path):
        self.path = Path(run) / RUNS_FILE

    def get(self, tracker: str) -> str | None:
        return json.loads(self.path.read_text()).get(tracker) if self.path.exists() else None

    def put(self, tracker: str, run_id: str) -> None:
        from rl.files import write_atomic

        ids = json.loads(self.path.read_text()) if self.path.exists() else {}
        write_atomic(self.path, json.dumps({**ids, tracker: run_id}, indent=2) + "\n")


class WandbSink:
    """Steps to a W&B run (resumed when the run folder already has one)."""

    def __init__(self, run: Path, name: str, config: dict):
        import wandb

        ids = _RunIds(run)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "api-adapter"), name=name,
                              dir=str(run), config=config, id=ids.get("wandb"), resume="allow")
        ids.put("wandb", self.run.id)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """Steps to an MLflow run (the same run again when the run folder already has one)."""

    def __init__(self, run: Path, name: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            uri = (Path(run) / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        ids = _RunIds(run)
        self.run_id = ids.get("mlflow")
        if self.run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "api-adapter")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])
            ids.put("mlflow", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), float(v), now, step)
                                                    for k, v in numeric(metrics).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
