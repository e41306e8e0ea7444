"""Where step metrics go: one JSON line per step, a short console line, TensorBoard, W&B or
MLflow (rl/trackers.py), and on Ray also the cluster's metrics (cluster/metrics.py).

Metrics are named by owner and phase (``reward/mean``, ``timing/rollout``, ``learn/kl``);
every sink takes the same flat dict, logged from one place (the loop's caller).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

CONSOLE_KEYS = ("reward/mean", "groups/kept", "learn/loss", "learn/kl", "rollout/completion_len", "sft/loss",
                "eval/custom", "eval/standard")
LABELS = {"reward/mean": "reward", "rollout/completion_len": "len", "sft/loss": "sft_loss",
          "eval/custom": "eval_custom", "eval/standard": "eval_standard"}


class NullSink:
    """Tracking off."""

    def log(self, step: int, metrics: dict) -> None:
        pass


class JsonlSink:
    """Appends ``{"step": n, **metrics}`` to a file, flushed per step (a killed run keeps them)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, default=str) + "\n")


class ConsoleSink:
    """One line per step: the key numbers, the step's seconds, and the decoded sample."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream  # None: whatever sys.stdout is when a line is written

    def log(self, step: int, metrics: dict) -> None:
        parts = [f"step {step:4d}"]
        parts += [f"{LABELS.get(key, key.split('/')[-1])}={metrics[key]:.3g}" for key in CONSOLE_KEYS if key in metrics]
        seconds = sum(v for k, v in metrics.items() if k.startswith("timing/"))
        parts.append(f"{seconds:.1f}s")
        sample = metrics.get("sample")
        if sample:
            parts.append(f"sample={sample['completion'][:60]!r}→{sample['reward']:g}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


class TensorBoardSink:
    """Every numeric metric as a TensorBoard scalar under its own name (``reward/mean`` ...)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def sinks_for(tracker: str, run: Path, name: str = "run", config: dict | None = None) -> "FanOut":
    """The console plus what ``logging.tracker`` names: ``metrics.jsonl`` for every tracker but
    ``none``, and TensorBoard, W&B or MLflow (rl/trackers.py; ``name`` and ``config`` describe
    the run to them). On Ray the trainer adds cluster.metrics.RayMetricsSink."""
    sinks: list = [ConsoleSink()]
    if tracker != "none":
        sinks.append(JsonlSink(Path(run) / "metrics.jsonl"))
    if tracker == "tensorboard":
        sinks.append(TensorBoardSink(Path(run) / "tensorboard"))
    if tracker in ("wandb", "mlflow"):
        from rl.trackers import MlflowSink, WandbSink

        sinks.append({"wandb": WandbSink, "mlflow": MlflowSink}[tracker](Path(run), name, config or {}))
    return FanOut(*sinks)


class FanOut:
    """Several sinks as one."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        """Close the sinks that hold something open (a writer, a tracker run)."""
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
