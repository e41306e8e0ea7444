"""rl/trackers.py with the real clients: W&B offline (its own files in the run folder) and
MLflow on a file store in the run folder; a resumed run logs into the same tracker run."""

import json
import struct
from pathlib import Path

import pytest

from rl.metrics import sinks_for

STEP = {"reward/mean": 0.5, "reward/symbol/*": 0.25, "learn/skipped": False,
        "sample": {"uid": "x", "completion": "7}", "reward": 1.0}}
CONFIG = {"rollout": {"group_size": 8, "stop": ["}"]}, "logging": {"name": "t"}}


def test_mlflow_gets_every_step_the_config_and_a_resumed_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sink = sinks_for("mlflow", tmp_path, "t", CONFIG)
    sink.log(0, STEP)
    sink.close()
    resumed = sinks_for("mlflow", tmp_path, "t", CONFIG)
    resumed.log(1, {**STEP, "reward/mean": 0.75})
    resumed.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run_id = json.loads((tmp_path / "tracker_runs.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["rollout.group_size"] == "8" and run.data.params["rollout.stop"] == '["}"]'
    history = lambda key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))  # noqa: E731
    assert history("reward/mean") == [(0, 0.5), (1, 0.75)]
    assert history("reward/symbol/_") == [(0, 0.25), (1, 0.25)]
    assert "learn/skipped" not in run.data.metrics  # booleans and dicts are not metrics
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def _wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-ID.wandb``: W&B's transaction log, LevelDB's log
    format (a 7-byte file header, 32 KiB blocks of chunks with a 7-byte header: CRC, length,
    type 1 full / 2 first / 3 middle / 4 last) holding wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_gets_every_step_the_config_and_a_resumed_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = sinks_for("wandb", tmp_path, "t", CONFIG)
    sink.log(0, STEP)
    sink.log(1, {**STEP, "reward/mean": 0.75})
    sink.close()
    run_id = json.loads((tmp_path / "tracker_runs.json").read_text())["wandb"]
    [log] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _wandb_records(log)
    steps = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
    assert [(s["_step"], s["reward/mean"], s["reward/symbol/*"]) for s in steps] == [(0, 0.5, 0.25), (1, 0.75, 0.25)]
    assert all("learn/skipped" not in s and "sample" not in s for s in steps)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "t" and "rollout" in {item.key for item in run.config.update}
    resumed = sinks_for("wandb", tmp_path, "t", CONFIG)
    assert resumed.sinks[-1].run.id == run_id
    resumed.close()


def test_module_doctests():
    import doctest

    import rl.trackers

    assert doctest.testmod(rl.trackers).failed == 0
