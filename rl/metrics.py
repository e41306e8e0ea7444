"""Where step metrics go: one JSON line per step, a short console line, TensorBoard, W&B or
MLflow (rl/trackers.py), and on Ray also the cluster's metrics (cluster/metrics.py).

Metrics are named by owner and phase (``reward/mean``, ``timing/rollout``, ``learn/kl``);
every sink takes the same flat dict, logged from one place (the loop's caller).
"""

from __future__ import annotations

import json
import sys
import time
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
    """One line per step: the phase and ``step n/total`` (1-based), the key numbers, the step's
    seconds, elapsed time and ETA (from the steps this sink has seen), and the decoded sample
    with its question and the upstream's answer::

        grpo step 7/40  reward=0.25  ...  4.1s  elapsed 0:28  eta 2:15  | 3 θ 4  api 7 → '\\boxed{CORRECT}' reward 0
    """

    def __init__(self, stream: TextIO | None = None, *, phase: str = "step", total: int | None = None):
        self.stream = stream  # None: whatever sys.stdout is when a line is written
        self.phase, self.total = phase, total
        self._start, self._first = time.perf_counter(), None

    def log(self, step: int, metrics: dict) -> None:
        self._first = step if self._first is None else self._first
        parts = [f"{self.phase} {step + 1}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{LABELS.get(key, key.split('/')[-1])}={metrics[key]:.3g}" for key in CONSOLE_KEYS if key in metrics]
        seconds = sum(v for k, v in metrics.items() if k.startswith("timing/"))
        parts.append(f"{seconds:.1f}s")
        elapsed = time.perf_counter() - self._start
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total:
            done = step - self._first + 1
            parts.append(f"eta {_clock(elapsed / done * max(self.total - step - 1, 0))}")
        sample = metrics.get("sample")
        if sample:
            question = f"{sample['question']}  api {sample.get('api_answer')} → " if sample.get("question") else ""
            parts.append(f"| {question}{sample['completion'][:60]!r} reward {sample['reward']:g}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


class Progress:
    """``label: done/total, elapsed m:ss, eta m:ss`` printed at each tenth of the way (and at the
    end), for the long phases without steps: upstream answers, evaluation."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, parts: int = 10):
        self.label, self.total, self.stream, self.parts = label, total, stream, parts
        self._start, self._shown = time.perf_counter(), 0

    def update(self, done: int, note: str = "") -> None:
        part = done * self.parts // max(self.total, 1)
        if part <= self._shown and done < self.total or self._shown == self.parts:
            return
        self._shown = part
        elapsed = time.perf_counter() - self._start
        eta = f", eta {_clock(elapsed / done * (self.total - done))}" if 0 < done < self.total else ""
        print(f"{self.label}: {done}/{self.total}{note}, elapsed {_clock(elapsed)}{eta}",
              file=self.stream or sys.stdout, flush=True)


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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


def sinks_for(tracker: str, run: Path, name: str = "run", config: dict | None = None,
              total_steps: int | None = None) -> "FanOut":
    """The console (GRPO steps out of ``total_steps``) plus what ``logging.tracker`` names:
    ``metrics.jsonl`` for every tracker but ``none``, and TensorBoard, W&B or MLflow
    (rl/trackers.py; ``name`` and ``config`` describe the run to them). On Ray the trainer adds
    cluster.metrics.RayMetricsSink."""
    sinks: list = [ConsoleSink(phase="grpo", total=total_steps)]
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
