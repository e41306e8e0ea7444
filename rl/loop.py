"""The GRPO training loop, written against small interfaces so it runs in-process or on Ray.

One step, as a flat list of timed phases:

1. ``rollout`` — take the next ``prompts_per_step`` items, sample ``group_size`` completions
   of each from the rollout engine (the current adapter, ``policy_version`` on every one);
2. ``verify`` — score every completion (response prefix + completion) with the reward;
3. ``advantages`` — group-normalised advantages; groups whose rewards are all equal carry no
   signal and are dropped, and further prompts are sampled (up to ``max_refill_rounds``) to
   refill the batch;
4. ``learn`` — one optimizer step of the learner over the kept groups;
5. ``sync`` — the learner's LoRA tensors go to the engine under the new version.

Phases 1-3 are :func:`collect`, 4-5 :func:`learn`. With ``max_policy_lag`` (the config's
``algorithm.async_off_policy_steps``) above 0 the rollouts of the next steps are collected in a
background thread while the learner learns (rl/rollout_ahead.py). The loop holds nothing but
the interfaces in rl/interfaces.py; the Ray trainer wires actor groups that satisfy them.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from rl.grpo import group_advantages, select_informative_groups
from rl.interfaces import Learner, RolloutEngine, sync_adapter
from rl.records import Prompt, SamplingParams, TrainGroup
from rl.rollout_ahead import Batch, RolloutsAhead, RolloutsNow, SerializedEngine, exclusive
from verifiers.rewards import Example, RewardResult
from verifiers.symbols import symbols_in


@dataclass(frozen=True)
class TrainItem:
    """One training prompt: its rendered prompt, what the reward needs, and a category
    (``custom`` / ``standard`` / ``gsm8k``) for per-category metrics."""

    uid: str
    prompt: Prompt
    example: Example
    category: str


Scorer = Callable[[Sequence[tuple[str, Example]]], list[RewardResult]]


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    prompts_per_step: int
    group_size: int
    sampling: SamplingParams
    advantage_scale: str = "std"
    filter_zero_variance: bool = True
    max_refill_rounds: int = 2
    seed: int = 0
    time_budget_s: float | None = None
    stall_steps: int = 5
    max_policy_lag: int = 0
    shuffle: bool = True


@dataclass
class StepTimer:
    """Wall-clock seconds per named phase, reported as ``timing/<phase>``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class StreamPosition:
    """Where the item stream stood after a step's batch: what a checkpoint of the step saves
    (with rollouts ahead, the live stream is already further on)."""

    position: int


class ItemStream:
    """Endless epochs over ``items``, each reshuffled by a seeded RNG (in the given order every
    epoch with ``shuffle=False``); ``position`` counts the items handed out, and a stream
    started at a position continues exactly where one that handed out that many items would
    (what a checkpoint needs to resume the data order)."""

    def __init__(self, items: Sequence[TrainItem], seed: int, position: int = 0, shuffle: bool = True):
        if not items:
            raise ValueError("no training items")
        self.items, self.seed, self.position, self.shuffle = list(items), seed, 0, shuffle
        self._order: list[int] = []
        self._epoch = -1
        for _ in range(position):
            next(self)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> "ItemStream":
        return self

    def __next__(self) -> TrainItem:
        epoch, offset = divmod(self.position, len(self.items))
        if epoch != self._epoch:
            self._order, self._epoch = self._epoch_order(epoch), epoch
        self.position += 1
        return self.items[self._order[offset]]


def _score_groups(items, completions, score: Scorer, group_size: int):
    """Rewards and results per group, in the items' order."""
    pairs = [(items[c.prompt_index].prompt.response_prefix + c.text, items[c.prompt_index].example)
             for c in completions]
    results = score(pairs)
    groups = [[] for _ in items]
    for completion, result in zip(completions, results):
        groups[completion.prompt_index].append((completion, result))
    for group in groups:
        assert len(group) == group_size, "the engine returned a partial group"
    return groups


def _sampling_for(sampling: SamplingParams, step: int, round_: int) -> SamplingParams:
    """A fresh seed per step and refill round: a fixed seed would replay the same noise every
    step (the same prompt under the same policy would give the same group). Derived, not
    drawn, so a resumed run samples exactly what an uninterrupted one would."""
    if sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed * 1_000_003 + step * 1_009 + round_) % 2**31)


def _collect(step, stream, engine, score, settings, timer):
    """Sample and score groups until enough carry signal or the refill bound is reached.

    Returns every sampled group (for metrics), the groups to train on, and how many
    zero-variance groups were dropped.
    """
    sampled: list[tuple[TrainItem, list]] = []
    pool: list[tuple[TrainItem, list]] = []  # informative groups kept so far
    wanted, rounds, dropped = settings.prompts_per_step, 0, 0
    while True:
        items = [next(stream) for _ in range(wanted)]
        with timer.phase("rollout"):
            sampling = _sampling_for(settings.sampling, step, rounds)
            completions = engine.generate([i.prompt for i in items], settings.group_size, sampling)
        with timer.phase("verify"):
            groups = list(zip(items, _score_groups(items, completions, score, settings.group_size)))
        sampled += groups
        if not settings.filter_zero_variance:
            return sampled, groups, 0
        pool += groups
        rewards = [[result.reward for _, result in group] for _, group in pool]
        selection = select_informative_groups(rewards, settings.prompts_per_step, rounds, settings.max_refill_rounds)
        dropped += len(selection.dropped)
        pool = [pool[i] for i in selection.kept]
        if not selection.need_more:
            return sampled, pool, dropped
        wanted, rounds = selection.missing, rounds + 1


def _train_groups(kept, settings) -> list[TrainGroup]:
    groups = []
    for item, group in kept:
        rewards = [result.reward for _, result in group]
        advantages = group_advantages(torch.tensor(rewards), len(rewards), settings.advantage_scale).tolist()
        completions = [c for c, _ in group]
        groups.append(TrainGroup(
            prompt_ids=item.prompt.token_ids,
            completions=[c.token_ids for c in completions],
            advantages=advantages,
            rollout_logprobs=[c.logprobs for c in completions],
            truncated=[c.finish_reason == "length" for c in completions],
            policy_version=completions[0].policy_version,
            rewards=rewards,
        ))
    return groups


def rollout_metrics(sampled) -> dict:
    """Reward, length and truncation statistics over every sampled group (kept or not).

    ``groups/zero_variance_fraction``: the share of groups whose rewards were all equal (no
    advantage, no gradient: 1.0 is a stall); ``rollout/entropy``: the sampled tokens' mean
    negative log-probability under the sampler, an estimate of the policy's token entropy that
    falls as it collapses; ``reward/<category>`` and ``reward/symbol/<op>`` (symbol items, each
    operator an item uses).
    """
    results = [(item, c, r) for item, group in sampled for c, r in group]
    rewards = [r.reward for _, _, r in results]
    lengths = [len(c.token_ids) for _, c, _ in results]
    logprobs = [lp for _, c, _ in results for lp in c.logprobs]
    mean = sum(rewards) / len(rewards)
    flat = sum(len({r.reward for _, r in group}) == 1 for _, group in sampled)
    metrics = {
        "reward/mean": mean,
        "reward/std": (sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5,
        "reward/format_ok": sum(r.format_ok for _, _, r in results) / len(results),
        "groups/zero_variance_fraction": flat / len(sampled),
        "rollout/entropy": -sum(logprobs) / max(1, len(logprobs)),
        "rollout/completion_len": sum(lengths) / len(lengths),
        "rollout/truncated": sum(c.finish_reason == "length" for _, c, _ in results) / len(results),
        "rollout/tokens": sum(lengths),
    }
    for category in sorted({item.category for item, _, _ in results}):
        values = [r.reward for item, _, r in results if item.category == category]
        metrics[f"reward/{category}"] = sum(values) / len(values)
    by_symbol: dict[str, list[float]] = {}
    for item, _, r in results:
        if item.category in ("custom", "standard"):
            for symbol in symbols_in(item.example.question or ""):
                by_symbol.setdefault(symbol, []).append(r.reward)
    for symbol, values in sorted(by_symbol.items()):
        metrics[f"reward/symbol/{symbol}"] = sum(values) / len(values)
    return metrics


class StallWatch:
    """Counts consecutive steps in which every sampled group had identical rewards, and warns
    (on stderr, which is the job log) when the run reaches ``stall_steps`` of them and every
    ``stall_steps`` after: the policy gets no gradient and learns nothing, typically because it
    collapsed onto one answer (always CORRECT) or never finds a right one."""

    def __init__(self, stall_steps: int, stream=None):
        self.stall_steps, self.streak = stall_steps, 0
        self.stream = stream

    def update(self, step: int, metrics: dict) -> None:
        stalled = metrics["groups/zero_variance_fraction"] >= 1.0
        self.streak = self.streak + 1 if stalled else 0
        metrics["stall/zero_variance_steps"] = self.streak
        if self.stall_steps and self.streak and self.streak % self.stall_steps == 0:
            print(f"WARNING step {step}: every group had identical rewards for {self.streak} steps in a row "
                  f"(reward {metrics['reward/mean']:.2f}, token entropy {metrics['rollout/entropy']:.2f}): "
                  f"no gradient, the policy is not learning. Try a format warm-start (sft.steps), the "
                  f"rewrite answer format, more refill rounds or a higher temperature.",
                  file=self.stream or sys.stderr, flush=True)


def collect(step, stream, engine: RolloutEngine, score: Scorer, settings) -> Batch:
    """The rollout half of a step: sampled, scored and filtered groups (phases rollout, verify)."""
    timer = StepTimer()
    sampled, kept, dropped = _collect(step, stream, engine, score, settings, timer)
    return Batch(step, sampled, kept, dropped, dict(timer.seconds), stream.position)


def learn(batch: Batch, engine: RolloutEngine, learner: Learner, settings) -> dict:
    """The learning half of a step: advantages, one learner step, the weights to the engine;
    returns the step's metrics (including ``timing/*`` and one decoded sample)."""
    timer = StepTimer(dict(batch.seconds))
    sampled, kept = batch.sampled, batch.kept
    metrics = rollout_metrics(sampled)
    metrics["groups/sampled"] = len(sampled)
    metrics["groups/zero_variance_dropped"] = batch.dropped
    metrics["groups/kept"] = len(kept)
    with timer.phase("advantages"):
        groups = _train_groups(kept, settings)
    if groups:
        metrics["async/policy_lag"] = learner.policy_version - min(g.policy_version for g in groups)
        with timer.phase("learn"):
            stats = learner.train_step(groups)
        metrics.update({f"learn/{k}": v for k, v in vars(stats).items() if isinstance(v, (int, float))})
        with timer.phase("sync"):
            sync = sync_adapter(engine, learner)
        if sync is not None:
            metrics.update({"sync/bytes": sync.bytes, "sync/push_seconds": sync.seconds})
            if sync.verified is not None:
                metrics["sync/verified"] = int(sync.verified)
    metrics["policy_version"] = learner.policy_version
    metrics.update({f"timing/{name}": seconds for name, seconds in timer.seconds.items()})
    if metrics.get("timing/rollout"):
        metrics["throughput/rollout_tokens_per_s"] = metrics["rollout/tokens"] / metrics["timing/rollout"]
    item, group = sampled[0]
    completion, result = group[0]
    metrics["sample"] = {"uid": item.uid, "question": item.example.question,
                         "completion": item.prompt.response_prefix + completion.text,
                         "reward": result.reward, "api_answer": str(item.example.api_answer)}
    return metrics


def train_step(step, stream, engine: RolloutEngine, learner: Learner, score: Scorer, settings) -> dict:
    """One synchronous GRPO step: :func:`collect`, then :func:`learn`."""
    return learn(collect(step, stream, engine, score, settings), engine, learner, settings)


def train(items: Sequence[TrainItem], engine, learner, score: Scorer, settings: LoopSettings,
          sink: MetricsSink, on_step_end: Callable[[int, dict, StreamPosition], None] | None = None,
          start_step: int = 0, data_position: int = 0,
          evaluate: Callable[[int], dict] | None = None, spent_s: float = 0.0,
          until: Callable[[], bool] | None = None) -> list[dict]:
    """Run steps ``start_step .. settings.steps - 1``; every step's metrics go to ``sink``.

    ``settings.time_budget_s`` ends the run after the step at which the training time
    (``spent_s`` already spent, e.g. by an SFT stage, plus the steps' own time; evaluation
    excluded) reaches it; ``until()`` true after a step's hook ends the run there (a curriculum
    stage that reached its threshold, rl/curriculum.py).

    ``data_position`` is where the item stream resumes (a checkpoint's ``stream.position``);
    ``evaluate(step)`` returns extra metrics logged with the step's (periodic held-out
    evaluation); ``on_step_end(step, metrics, position)`` is where the caller checkpoints:
    ``position.position`` is the item stream's position after the step's batch.
    """
    stream = ItemStream(items, settings.seed, data_position, settings.shuffle)
    if settings.max_policy_lag:
        engine = SerializedEngine(engine)
        rollouts = RolloutsAhead(lambda step: collect(step, stream, engine, score, settings),
                                 start_step, settings.steps, settings.max_policy_lag)
    else:
        rollouts = RolloutsNow(lambda step: collect(step, stream, engine, score, settings))
    try:
        return _run(rollouts, engine, learner, settings, sink, on_step_end, start_step, evaluate, spent_s, until)
    finally:
        rollouts.close()


def _run(rollouts, engine, learner, settings, sink, on_step_end, start_step, evaluate, spent_s,
         until=None) -> list[dict]:
    watch = StallWatch(settings.stall_steps)
    history = []
    for step in range(start_step, settings.steps):
        start = time.perf_counter()
        batch = rollouts.next(step)
        waited = time.perf_counter() - start
        metrics = learn(batch, engine, learner, settings)
        rollouts.step_done()
        spent_s += time.perf_counter() - start
        if settings.max_policy_lag:
            metrics["timing/rollout_wait"] = waited
        metrics["data/position"] = batch.position
        metrics["time/train_seconds"] = spent_s
        watch.update(step, metrics)
        if evaluate is not None:
            with exclusive(engine):  # no rollout ahead shares the engine with the evaluation
                metrics.update(evaluate(step))
        sink.log(step, metrics)
        history.append(metrics)
        if on_step_end is not None:
            on_step_end(step, metrics, StreamPosition(batch.position))
        if until is not None and until():
            break
        if settings.time_budget_s is not None and spent_s >= settings.time_budget_s:
            print(f"time budget reached after step {step}: {spent_s:.0f} s of training "
                  f"(algorithm.max_train_seconds = {settings.time_budget_s:g})", flush=True)
            break
    return history
