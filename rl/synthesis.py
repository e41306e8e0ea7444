r"""Question synthesis with independent verification: an LLM writes questions, a separate
resolver derives every answer with SymPy tools, and only answers derived that way are kept.

The pipeline, per question (:func:`synthesize`):

1. **Plan.** ``questions_per_tier`` questions for each tier; each draws a topic from
   ``topics`` with a seeded RNG (:func:`plan`), so a rerun asks the same things.
2. **Generate.** The generator model gets the tier and topic (temperature
   ``generator_temperature``) and replies ``QUESTION: ...`` / ``ANSWER: ...``. Its stated
   answer is recorded and compared with the final one, but never used as truth.
3. **Resolve.** A separate tool conversation (its own system prompt, possibly another model)
   sees only the question, must compute with the tools and ends with ``\boxed{...}``. Tiers in
   ``double_check_tiers`` are resolved twice, in independent conversations: the user turn
   carries the resolution number, so the two never share a cache entry, and the second may
   go to another resolver model.
4. **Keep or drop.** A question is dropped, with its reason, when the generator's reply has
   no question, a resolution failed or has no ``\boxed`` answer, a resolution made no
   successful tool call (its answer was not derived with SymPy: we chose to drop rather than
   trust the model's own arithmetic), or the two resolutions of a double-checked tier are
   not the same math (or cannot be compared) by :func:`verifiers.math.judge`.

This module does no I/O of its own besides :func:`write_outputs`: the caller passes
``generate`` and ``resolve`` (``scripts/synthesize.py`` builds them on the cached upstream
clients and the SymPy tool runner), which keeps ``rl`` free of ``actors``. Every model call
is in the answer cache before this module sees it, so nothing paid for is lost when a run
stops early; the outputs are written atomically at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from rl.files import write_atomic
from verifiers import answers, math as math_judge

DEFAULT_TOPICS = (
    "polynomial equations", "systems of linear equations", "definite integrals",
    "indefinite integrals", "derivatives", "prime factorization", "modular arithmetic",
    "greatest common divisors", "binomial coefficients", "permutations and combinations",
    "simplifying algebraic expressions", "factoring polynomials",
)
GENERATOR_SYSTEM = (
    "You write self-contained math questions. Each has one exact answer (a number, an "
    "expression, or a list of values) that a computer algebra system can check. Reply in "
    "exactly this format:\nQUESTION: <the question>\nANSWER: <its answer>"
)
RESOLVER_SYSTEM = (
    "Answer the math question. Do not compute anything yourself: derive each step by calling "
    "the tools and use their results. When done, reply with the final answer alone inside "
    "\\boxed{...}, written in SymPy syntax (for example \\boxed{3*sqrt(2)} or \\boxed{-2, 2})."
)
_GENERATED = re.compile(r"QUESTION:\s*(?P<question>.+?)\s*(?:\n\s*ANSWER:\s*(?P<answer>.*?)\s*)?$",
                        re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class SynthesisSettings:
    """What to synthesize; validated on construction (the message names the field).

    tiers: difficulty tiers, in order; questions_per_tier: questions per tier (1-10,000);
    topics: a topic is drawn per question; double_check_tiers: tiers resolved twice and kept
    only when both agree (each must be in ``tiers``); seed: the topic RNG's seed;
    generator_temperature / resolver_temperature: sent as is (None: the API's default), in
    [0, 1]; generator_max_tokens / resolver_max_tokens: per model call; max_rounds: model calls
    per resolution (1-50); judge_timeout_s: budget of one answer comparison.
    """

    tiers: tuple[str, ...] = ("easy", "medium", "hard")
    questions_per_tier: int = 4
    topics: tuple[str, ...] = DEFAULT_TOPICS
    double_check_tiers: tuple[str, ...] = ("hard",)
    seed: int = 0
    generator_temperature: float | None = 1.0
    resolver_temperature: float | None = 0.0
    generator_max_tokens: int = 512
    resolver_max_tokens: int = 1024
    max_rounds: int = 8
    judge_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _check(bool(self.tiers) and len(set(self.tiers)) == len(self.tiers), "tiers",
               self.tiers, "a non-empty list of distinct names")
        _check(bool(self.topics), "topics", self.topics, "a non-empty list")
        unknown = [t for t in self.double_check_tiers if t not in self.tiers]
        _check(not unknown, "double_check_tiers", self.double_check_tiers, f"tiers among {list(self.tiers)}")
        _check(1 <= self.questions_per_tier <= 10_000, "questions_per_tier", self.questions_per_tier, "1..10000")
        for name in ("generator_temperature", "resolver_temperature"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value <= 1.0, name, value, "null or a number in [0, 1]")
        for name in ("generator_max_tokens", "resolver_max_tokens"):
            _check(1 <= getattr(self, name) <= 64_000, name, getattr(self, name), "1..64000")
        _check(1 <= self.max_rounds <= 50, "max_rounds", self.max_rounds, "1..50")
        _check(self.judge_timeout_s > 0, "judge_timeout_s", self.judge_timeout_s, "a positive number")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}: got {value!r}, expected {allowed}")


@dataclass(frozen=True)
class Slot:
    """One planned question: ``index`` is global and is the generator call's sample index."""

    index: int
    tier: str
    topic: str


@dataclass(frozen=True)
class GeneratorReply:
    """The generator's reply as the caller's ``generate`` returns it."""

    text: str | None
    error: str | None
    provider: str
    model: str
    key: str
    cached: bool


class Resolution(Protocol):
    """What ``resolve`` returns (:class:`actors.upstream.tools.Conversation` is one)."""

    text: str | None
    error: str | None
    tool_calls: list
    def to_json(self) -> dict: ...


Generate = Callable[[str, str, "float | None", int, int], Awaitable[GeneratorReply]]
"""``generate(system, prompt, temperature, max_tokens, sample_index)``"""
Resolve = Callable[[int, str, str, "float | None", int, int], Awaitable[Resolution]]
"""``resolve(resolution_index, system, prompt, temperature, max_tokens, max_rounds)``"""


@dataclass(frozen=True)
class Outcome:
    """One question's fate: ``row`` (the dataset row) when kept, else ``drop`` (a short kind)
    and ``detail`` (the reason in words) with what was known about it."""

    slot: Slot
    row: dict | None = None
    drop: str | None = None
    detail: str | None = None
    question: str | None = None
    provenance: dict = field(default_factory=dict)


def plan(settings: SynthesisSettings) -> list[Slot]:
    """The questions to ask, with their topics drawn by a seeded RNG.

    >>> [(s.tier, s.topic) for s in plan(SynthesisSettings(
    ...     tiers=("a", "b"), questions_per_tier=2, topics=("x", "y", "z"), double_check_tiers=()))]
    [('a', 'y'), ('a', 'y'), ('b', 'x'), ('b', 'y')]
    """
    rng = random.Random(settings.seed)
    tiers = [tier for tier in settings.tiers for _ in range(settings.questions_per_tier)]
    return [Slot(i, tier, rng.choice(settings.topics)) for i, tier in enumerate(tiers)]


def generator_prompt(slot: Slot) -> str:
    return f"Write one {slot.tier} question about {slot.topic}."


def resolver_prompt(question: str, resolution_index: int) -> str:
    """The resolver's user turn; the number makes each resolution its own conversation."""
    return (f"Resolution {resolution_index + 1}: derive the answer from scratch with the tools."
            f"\n\nQuestion: {question}")


def parse_generated(text: str | None) -> tuple[str, str | None] | None:
    """``(question, stated answer or None)`` from a generator reply, or None.

    >>> parse_generated("QUESTION: Solve x^2 = 4.\\nANSWER: x = 2")
    ('Solve x^2 = 4.', 'x = 2')
    """
    match = _GENERATED.search(text or "")
    if match is None:
        return None
    return match.group("question"), (match.group("answer") or None)


async def synthesize(settings: SynthesisSettings, generate: Generate, resolve: Resolve,
                     judge: Callable = math_judge.judge) -> list[Outcome]:
    """Every planned question's :class:`Outcome`, in plan order (calls run concurrently)."""
    work = _Work(settings, generate, resolve, judge)
    return list(await asyncio.gather(*(work.one(slot) for slot in plan(settings))))


@dataclass
class _Work:
    settings: SynthesisSettings
    generate: Generate
    resolve: Resolve
    judge: Callable

    async def one(self, slot: Slot) -> Outcome:
        s = self.settings
        reply = await self.generate(GENERATOR_SYSTEM, generator_prompt(slot), s.generator_temperature,
                                    s.generator_max_tokens, slot.index)
        generator = {"provider": reply.provider, "model": reply.model, "key": reply.key,
                     "cached": reply.cached, "text": reply.text}
        if reply.error is not None:
            return Outcome(slot, drop="generator_failed", detail=reply.error, provenance={"generator": generator})
        parsed = parse_generated(reply.text)
        if parsed is None:
            return Outcome(slot, drop="no_question", detail="the generator's reply has no 'QUESTION:' line",
                           provenance={"generator": generator})
        question, stated = parsed
        count = 2 if slot.tier in s.double_check_tiers else 1
        resolutions = await asyncio.gather(*(
            self.resolve(k, RESOLVER_SYSTEM, resolver_prompt(question, k), s.resolver_temperature,
                         s.resolver_max_tokens, s.max_rounds) for k in range(count)))
        provenance = {"generator": {**generator, "stated_answer": stated},
                      "resolutions": [r.to_json() for r in resolutions], "double_checked": count == 2,
                      "synthesized_at": time.time()}
        final, drop, detail = await self._decide(resolutions)
        if drop is not None:
            return Outcome(slot, drop=drop, detail=detail, question=question, provenance=provenance)
        provenance["generator"].update(await self._stated_agrees(stated, final))
        row = {"question": question, "answer": final, "tier": slot.tier, "topic": slot.topic,
               "provenance": provenance}
        return Outcome(slot, row=row, question=question, provenance=provenance)

    async def _decide(self, resolutions: list[Resolution]) -> tuple[str | None, str | None, str | None]:
        """``(answer, None, None)`` when kept, else ``(None, drop kind, reason)``."""
        finals = []
        for k, resolution in enumerate(resolutions, start=1):
            if resolution.error is not None:
                return None, "resolution_failed", f"resolution {k}: {resolution.error}"
            if not any(not call.is_error for call in resolution.tool_calls):
                return None, "no_tool_call", f"resolution {k} made no successful tool call"
            boxed = answers.extract_boxed(resolution.text or "")
            if not boxed or not boxed.strip():
                return None, "no_boxed_answer", f"resolution {k} gave no \\boxed{{}} answer"
            finals.append(boxed.strip())
        if len(finals) == 2:
            verdict = await asyncio.to_thread(self.judge, finals[1], finals[0], self.settings.judge_timeout_s)
            if verdict.verdict is math_judge.Verdict.DIFFERENT:
                return None, "disagree", f"resolutions disagree: {finals[0]!r} vs {finals[1]!r}"
            if verdict.verdict is math_judge.Verdict.CANNOT_JUDGE:
                return None, "cannot_compare", f"resolutions cannot be compared: {verdict.reason}"
        return finals[0], None, None

    async def _stated_agrees(self, stated: str | None, final: str) -> dict:
        """Whether the generator's stated answer matches (None: no answer stated, or cannot judge)."""
        if stated is None:
            return {"stated_agrees": None, "stated_check": "no answer stated"}
        verdict = await asyncio.to_thread(self.judge, stated, final, self.settings.judge_timeout_s)
        agrees = {math_judge.Verdict.EQUIVALENT: True, math_judge.Verdict.DIFFERENT: False}.get(verdict.verdict)
        return {"stated_agrees": agrees, "stated_check": verdict.reason}


def summarize(outcomes: list[Outcome]) -> dict:
    """Kept and dropped counts (overall, per tier, per drop kind) and every drop's reason."""
    by_tier: dict[str, Counter] = {}
    for outcome in outcomes:
        by_tier.setdefault(outcome.slot.tier, Counter())["kept" if outcome.row else "dropped"] += 1
    dropped = [o for o in outcomes if o.row is None]
    return {
        "planned": len(outcomes), "kept": len(outcomes) - len(dropped), "dropped": len(dropped),
        "by_tier": {tier: dict(counts) for tier, counts in by_tier.items()},
        "drop_reasons": dict(Counter(o.drop for o in dropped)),
        "drops": [{"index": o.slot.index, "tier": o.slot.tier, "topic": o.slot.topic, "kind": o.drop,
                   "reason": o.detail, "question": o.question} for o in dropped],
    }


def write_outputs(outcomes: list[Outcome], dataset: Path, summary: dict) -> None:
    """The kept rows as JSONL at ``dataset`` and ``summary`` beside it (``*.summary.json``),
    each written atomically (temporary file, fsync, rename)."""
    lines = "".join(json.dumps(o.row, ensure_ascii=False) + "\n" for o in outcomes if o.row)
    write_atomic(dataset, lines)
    write_atomic(summary_path(dataset), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def summary_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.stem + ".summary.json")
