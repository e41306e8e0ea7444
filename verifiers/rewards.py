"""Rewards: plain functions from a completion and its example to a score and diagnostics.

- ``binary`` — the adapter task's reward: 1.0 iff the resolved answer (the boxed number,
  or the API's answer for ``\\boxed{CORRECT}``) equals the truth.
- ``gsm8k_exact`` — 1.0 iff the GSM8K-style prediction equals the gold (the lab's "exact").
- ``shaped`` — the SymPy-RLVR seed's correctness-gated reward V3:
  ``(0.1 + 0.5c) + (0.2 + 0.2c) · secondary``, c = correctness, secondary the weighted sum of
  self-consistency .25, reasoning depth .20, number grounding .20, format .15,
  parsability .10, length .05, repetition .05 (each in [0, 1], defined below). A wrong answer
  earns at most 0.3 and a right one at least 0.6, so no style can outscore being right.

Look rewards up by name with :func:`get_reward`; a typo lists the valid names.

>>> binary_reward("\\\\boxed{CORRECT}", truth=7, api_answer=7)
1.0
>>> get_reward("binary")(r"\\boxed{12}", Example(truth=12)).reward
1.0
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping

from verifiers.answers import (
    MAX_DIGITS,
    find_numbers,
    is_correct_token,
    last_box_span,
    parse_number,
    read_box,
    score_gsm8k,
)


@dataclass(frozen=True)
class Example:
    """What a reward may look at besides the completion.

    truth: the exact answer (GSM8K answer fields are accepted by the GSM8K rewards);
    api_answer: the upstream's parsed answer, ``None`` when it gave none;
    question: the task text (used by ``shaped``'s number grounding).
    """

    truth: Fraction | int | str
    api_answer: Fraction | int | None = None
    question: str | None = None


@dataclass(frozen=True)
class RewardResult:
    """A reward and why: ``answer`` is what the reward read (``None``: nothing readable),
    ``format_ok`` whether the completion followed the task's answer format, and
    ``trailing_text`` whether non-space text follows the answer. ``components`` holds
    shaped rewards' parts."""

    reward: float
    answer: Fraction | None
    format_ok: bool
    trailing_text: bool
    components: Mapping[str, float] = field(default_factory=dict)


RewardFn = Callable[[str, Example], RewardResult]


def adapter_reward(completion: str, example: Example) -> RewardResult:
    """The adapter task's binary reward with its diagnostics."""
    span = last_box_span(completion)
    box = None if span is None else completion[span[0] : span[1]]
    answer = read_box(box, example.api_answer)
    format_ok = box is not None and (answer is not None or is_correct_token(box))
    trailing = span is not None and completion[span[1] + 1 :].strip() != ""
    truth = parse_number(example.truth) if isinstance(example.truth, str) else example.truth
    correct = answer is not None and answer == truth  # Fraction == int is exact
    return RewardResult(1.0 if correct else 0.0, answer, format_ok, trailing)


def binary_reward(completion: str, truth: Fraction | int, api_answer: Fraction | int | None) -> float:
    """1.0 iff :func:`resolve_adapter_answer` equals ``truth``, else 0.0."""
    return adapter_reward(completion, Example(truth, api_answer)).reward


def gsm8k_exact_reward(completion: str, example: Example) -> RewardResult:
    """1.0 iff the GSM8K prediction matches; format means a clean final ``#### n`` line."""
    score = score_gsm8k(completion, example.truth)
    format_ok = score.strict_final_line and not score.trailing_text
    return RewardResult(float(score.exact), score.predicted, format_ok, score.trailing_text)


SHAPED_WEIGHTS: Mapping[str, float] = {
    "self_consistency": 0.25,
    "reasoning_depth": 0.20,
    "number_grounding": 0.20,
    "format": 0.15,
    "parsability": 0.10,
    "length": 0.05,
    "repetition": 0.05,
}
_GOOD_LENGTH = (40, 1500)  # characters; a fair range for a GSM8K solution


def _secondary(completion: str, example: Example, score) -> dict[str, float]:
    body = completion[: completion.find("####")] if "####" in completion else completion
    body_numbers = find_numbers(body[-8 * MAX_DIGITS :])
    steps = [line for line in body.splitlines() if "=" in line or find_numbers(line[:500])]
    question_numbers = set(find_numbers((example.question or "")[: 8 * MAX_DIGITS]))
    used = set(body_numbers)
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    low, high = _GOOD_LENGTH
    size = len(completion)
    return {
        # the final answer was derived in the reasoning, not pulled from nowhere
        "self_consistency": float(score.predicted is not None and score.predicted in used),
        "reasoning_depth": min(len(steps) / 4.0, 1.0),
        # the reasoning uses the question's numbers (1.0 when the question has none)
        "number_grounding": len(question_numbers & used) / len(question_numbers) if question_numbers else 1.0,
        "format": 1.0 if score.strict_final_line and not score.trailing_text else 0.5 * score.final_format,
        "parsability": float(score.predicted is not None),
        "length": 1.0 if low <= size <= high else (size / low if size < low else high / size),
        "repetition": len(set(lines)) / len(lines) if lines else 0.0,
    }


def shaped_reward(completion: str, example: Example) -> RewardResult:
    """The correctness-gated shaped reward (SymPy-RLVR V3) over a GSM8K-style completion."""
    score = score_gsm8k(completion, example.truth)
    parts = _secondary(completion, example, score)
    secondary = sum(SHAPED_WEIGHTS[name] * value for name, value in parts.items())
    c = float(score.exact)
    reward = (0.1 + 0.5 * c) + (0.2 + 0.2 * c) * secondary
    format_ok = score.strict_final_line and not score.trailing_text
    return RewardResult(reward, score.predicted, format_ok, score.trailing_text, parts)


REWARDS: Mapping[str, RewardFn] = {
    "binary": adapter_reward,
    "gsm8k_exact": gsm8k_exact_reward,
    "shaped": shaped_reward,
}


def get_reward(name: str) -> RewardFn:
    """The reward called ``name``; an unknown name is a ``KeyError`` listing the valid ones."""
    try:
        return REWARDS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), REWARDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown reward {name!r}{hint}; valid rewards: {', '.join(sorted(REWARDS))}") from None
