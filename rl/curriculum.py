"""Curricula: training stages run in order as one job (``curriculum:`` in the config).

Each stage has its own training items (a generated symbol tier, or a JSONL file), an end (a
fixed number of ``steps``, or ``advance_at``: the mean training reward ``reward/mean`` over the
last ``window`` steps reaching the threshold, bounded by ``max_steps``), and its own learning
rate, KL coefficient, rollout ``max_new_tokens`` and temperature (null inherits the top-level
value). The learner, its optimizer state and the engine's adapter carry over from stage to
stage; nothing is rebuilt.

The learning rate: at each stage's first step the learner's schedule (``learner.warmup_fraction``
and ``learner.lr_schedule``) starts over from the current optimizer step, over the stage's
``steps`` (or ``max_steps``), peaking at the stage's lr. ``lr_schedule: constant`` with
``warmup_fraction: 0`` holds each stage's lr flat.

Steps are numbered globally (``step`` in metrics.jsonl, checkpoint folders, the sampling seed);
every metric row also carries ``stage`` (index), ``stage/name`` and ``stage/step``. A
checkpoint's meta holds the :class:`Position` a resumed run starts from: the stage, the step
within it, the stage's data position and the threshold window's rewards, so a resumed run takes
the same next prompts and advances at the same step as an uninterrupted one. A checkpoint saved
at a stage's last step already points at the next stage's start.

The controller (scripts/train.py) wires the parts: :func:`run_curriculum` takes callables for
the stage's items and for the step-end hook (checkpoints, graceful stop) and never sees the
config tree; :func:`resolve_stages` reads the config into flat :class:`Stage` records.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rl.loop import LoopSettings, TrainItem, train


@dataclass(frozen=True)
class Stage:
    """A stage with every inherited value filled in. ``steps``: the stage's step bound (its
    ``steps``, or ``max_steps`` with a threshold); ``advance_at``: None ends by steps alone."""

    index: int
    name: str
    tier: str | None
    train_path: str | None
    steps: int
    advance_at: float | None
    window: int
    lr: float
    kl_coef: float
    max_new_tokens: int
    temperature: float


def resolve_stages(config) -> list[Stage]:
    """The config's curriculum with nulls replaced by the top-level values."""
    return [Stage(i, st.name, st.tier, st.train_path, st.steps or st.max_steps, st.advance_at, st.window,
                  config.learner.lr if st.lr is None else st.lr,
                  config.algorithm.kl_coef if st.kl_coef is None else st.kl_coef,
                  st.max_new_tokens or config.rollout.max_new_tokens,
                  config.rollout.temperature if st.temperature is None else st.temperature)
            for i, st in enumerate(config.curriculum)]


def stage_data(data, stage: Stage):
    """The DataConfig a stage trains on: its own file, else its tier generated, else ``data``'s."""
    if stage.train_path is not None:
        return dataclasses.replace(data, train_path=stage.train_path)
    if stage.tier is not None:
        return dataclasses.replace(data, train_path=None, tier=stage.tier)
    return data


def learner_settings(stage: Stage, warmup_fraction: float) -> dict:
    """Arguments of ``Learner.configure_stage`` for ``stage`` (the loss's constant normaliser
    follows the stage's completion cap)."""
    return dict(lr=stage.lr, warmup_steps=round(warmup_fraction * stage.steps), total_steps=stage.steps,
                kl_coef=stage.kl_coef, temperature=stage.temperature, constant_normaliser=stage.max_new_tokens)


class AdvanceWatch:
    """The last ``window`` training rewards; :meth:`update` says whether their mean has reached
    ``advance_at`` (never before the window is full, never when ``advance_at`` is None).

    >>> watch = AdvanceWatch(0.75, 2)
    >>> [watch.update(r) for r in (1.0, 0.0, 0.0, 1.0, 1.0)]
    [False, False, False, False, True]
    """

    def __init__(self, advance_at: float | None, window: int, history: Sequence[float] = ()):
        self.advance_at = advance_at
        self.rewards: deque[float] = deque(history, maxlen=window)

    def update(self, reward: float) -> bool:
        self.rewards.append(reward)
        full = len(self.rewards) == self.rewards.maxlen
        return self.advance_at is not None and full and sum(self.rewards) / len(self.rewards) >= self.advance_at


@dataclass
class Position:
    """Where a curriculum stands, as saved in checkpoint meta (``meta["curriculum"]``): the stage
    index, steps done in it, its item stream's position, the threshold window's rewards, and
    the finished stages (name, steps, ``ended_by``: threshold or steps)."""

    stage: int = 0
    stage_step: int = 0
    data_position: int = 0
    window: list[float] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self, stages: Sequence["Stage"]) -> list[dict]:
        """Every stage for results.json: the finished ones, then the one a time budget or a stop
        cut short (``ended_by: unfinished``) and those never reached (``ended_by: not reached``)."""
        rest = [{"stage": st.index, "name": st.name, "steps": self.stage_step if st.index == self.stage else 0,
                 "ended_by": "unfinished" if st.index == self.stage else "not reached"}
                for st in stages[self.stage:]]
        return self.done + rest

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Position":
        return cls(**meta) if meta else cls()


class StageSink:
    """Adds the stage (``stage``, ``stage/name``, ``stage/step``) to every metric row."""

    def __init__(self, sink, stage: Stage, start_step: int):
        self.sink, self.stage, self.start_step = sink, stage, start_step

    def log(self, step: int, metrics: dict) -> None:
        self.sink.log(step, {**metrics, "stage": self.stage.index, "stage/name": self.stage.name,
                             "stage/step": step - self.start_step})


StepHook = Callable[[int, dict, object, dict, bool], None]  # stream: has .position


def run_curriculum(stages: Sequence[Stage], position: Position, start_step: int, *,
                   items_for: Callable[[Stage], list[TrainItem]], engine, learner, score,
                   settings: LoopSettings, sink, warmup_fraction: float,
                   on_step_end: StepHook | None = None, evaluate=None,
                   spent_s: float = 0.0) -> tuple[list[dict], Position]:
    """Run the stages from ``position`` (global step ``start_step``); returns every step's
    metrics and the final position (its ``done`` lists each finished stage).

    ``on_step_end(step, metrics, stream, meta, boundary)``: ``meta`` is the position a run
    resumed from this step's checkpoint starts at (``{"curriculum": ...}``), ``boundary`` true
    at a stage's last step -- the controller checkpoints there and where it is due.
    ``settings.time_budget_s`` ends the whole curriculum, as it ends a single-stage run."""
    history: list[dict] = []
    step = start_step
    resuming = position.stage_step > 0
    while position.stage < len(stages):
        stage = stages[position.stage]
        learner.configure_stage(**learner_settings(stage, warmup_fraction), restart_schedule=not resuming)
        print(f"curriculum stage {stage.index} {stage.name!r}: step {position.stage_step} of at most "
              f"{stage.steps}" + (f", advancing at reward {stage.advance_at:g}" if stage.advance_at is not None
                                  else ""), flush=True)
        stage_history = _run_stage(stage, position, step, items_for(stage), engine, learner, score,
                                   settings, sink, on_step_end, evaluate, spent_s)
        history += stage_history
        step += len(stage_history)
        resuming = False
        if stage_history:
            spent_s = stage_history[-1]["time/train_seconds"]
        budget = settings.time_budget_s
        if position.stage == stage.index or (budget is not None and spent_s >= budget):
            break  # the time budget ended the stage (or the run) early
    return history, position


def _run_stage(stage: Stage, position: Position, start_step: int, items, engine, learner, score,
               settings: LoopSettings, sink, on_step_end, evaluate, spent_s: float) -> list[dict]:
    """One stage's steps through :func:`rl.loop.train`; ``position`` moves along, step by step."""
    watch = AdvanceWatch(stage.advance_at, stage.window, position.window)
    stage_start = start_step - position.stage_step  # the global step of the stage's first step
    sampling = dataclasses.replace(settings.sampling, max_new_tokens=stage.max_new_tokens,
                                   temperature=stage.temperature)
    stage_settings = dataclasses.replace(settings, steps=stage_start + stage.steps, sampling=sampling)
    finished = [False]

    def step_end(step: int, metrics: dict, stream) -> None:
        reached = watch.update(metrics["reward/mean"])
        stage_step = step - stage_start + 1
        if reached or stage_step == stage.steps:
            position.done.append({"stage": stage.index, "name": stage.name, "steps": stage_step,
                                  "ended_by": "threshold" if reached else "steps"})
            position.stage, position.stage_step, position.data_position, position.window = stage.index + 1, 0, 0, []
            finished[0] = True
        else:
            position.stage_step, position.data_position = stage_step, stream.position
            position.window = list(watch.rewards)
        if on_step_end is not None:
            on_step_end(step, metrics, stream, {"curriculum": position.to_meta()}, finished[0])

    return train(items, engine, learner, score, stage_settings, StageSink(sink, stage, stage_start),
                 on_step_end=step_end, start_step=start_step, data_position=position.data_position,
                 evaluate=evaluate, spent_s=spent_s, until=lambda: finished[0])
