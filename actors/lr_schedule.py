"""The learner's learning-rate schedule: warm-up, then constant, linear or cosine decay, after
an optional SFT stage at its own rate; restartable per curriculum stage (rl/curriculum.py)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up from 0
    over warmup_steps, then constant, linear to 0 at total_steps, or half a cosine to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not one of {SCHEDULES}")
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The lr multiplier per optimizer step: ``sft_factor`` for the first ``sft_steps``, then
    ``scale`` times :func:`lr_factor` counted from ``start``. An object, not a lambda, so the
    LR scheduler's state_dict saves its fields and a resumed run continues a curriculum stage's
    schedule (:meth:`Learner.configure_stage`)."""

    def __init__(self, sft_steps: int, sft_factor: float, start: int, warmup_steps: int,
                 total_steps: int, schedule: str, scale: float = 1.0):
        self.sft_steps, self.sft_factor, self.schedule = sft_steps, sft_factor, schedule
        self.restart(start, scale, warmup_steps, total_steps)

    def restart(self, start: int, scale: float, warmup_steps: int, total_steps: int) -> None:
        """Count from optimizer step ``start`` (an SFT stage cut short ends there too)."""
        self.sft_steps = min(self.sft_steps, start)
        self.start, self.scale, self.warmup_steps, self.total_steps = start, scale, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.sft_steps:
            return self.sft_factor
        return self.scale * lr_factor(step - self.start, self.warmup_steps, self.total_steps, self.schedule)
