r"""Is a predicted math answer equivalent to the gold one? Three verdicts, not two.

``judge(pred, gold)`` returns a :class:`Judgement`: ``EQUIVALENT``, ``DIFFERENT``, or
``CANNOT_JUDGE`` with a reason (input too long or too deeply nested, SymPy out of time or
memory, a gold answer that is not math). ``equivalent(pred, gold)`` is the boolean on top; it
raises :class:`CannotJudge` rather than answer ``False`` for "don't know", so that a reward
built on it cannot quietly turn a verifier failure into a 0.

How a pair is judged, cheapest first:

1. caps: more than :data:`MAX_CHARS` characters a side, or brackets nested deeper than
   :data:`MAX_DEPTH` (math-verify's ANTLR parser slows down steeply with nesting), cannot be
   judged;
2. identical text (after trimming spaces) is equivalent;
3. two plain numbers (``-12``, ``1,000``, ``7/2``, ``\frac{7}{2}``, ``1e3``) are compared
   exactly as fractions, in microseconds. Equal is final; unequal is final unless a decimal
   point is involved, where math-verify's rounding (``0.333333`` = 1/3) decides instead;
4. everything else goes to math-verify (``parse`` + ``verify``, built on SymPy) in a separate
   process with a wall-clock budget and a memory cap (see :mod:`verifiers._sandbox`). Text
   that calls a function in plain SymPy syntax (``sin(x)**2``, ``exp(0)``) is read by
   :mod:`verifiers.plain_syntax` (an ``ast`` whitelist), everything else by math-verify's
   LaTeX reader (``2*sqrt(2)`` and ``x^2-1`` parse as LaTeX); nothing the model wrote is ever
   ``eval``-ed or ``sympify``-ed. A "not equal" from math-verify where the two sides agree at
   every test point is "cannot judge": SymPy failed to prove an identity, it did not refute it.

A gold answer that math-verify cannot parse cannot be judged; a prediction it cannot parse
(against a gold that parses) is ``DIFFERENT``. math-verify's rules apply: a bare value
equals an equation that assigns it (``3`` and ``x=3``), ``1,2`` is a set, ``50%`` is 0.5,
and ``a^b^c`` (or ``a**b**c``, read as ``^``) is ``(a^b)^c``.

>>> judge("1,000", "1e3")
Judgement(verdict=<Verdict.EQUIVALENT: 'equivalent'>, reason='equal as exact numbers')
>>> equivalent(r"\frac{6}{4}", "3/2"), equivalent("-3", "3")
(True, False)
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from fractions import Fraction

from verifiers import answers
from verifiers._sandbox import Sandbox

MAX_CHARS = 2000
"""Longest answer (per side) that is judged; a final answer is rarely over a few dozen."""
MAX_DEPTH = 12
"""Deepest bracket nesting that is judged: math-verify's parser takes ~0.1 s per level."""

# `1e3`, `-2.5E-4`; the exponent is capped so that building the exact fraction stays cheap.
_SCIENTIFIC = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][+-]?[0-9]{1,3}")
_BRACKETS = re.compile(r"[(\[{]|[)\]}]")

# One server process per calling process, started on first use: a worker process is a
# per-process resource, and judge() must stay a plain function.
_SANDBOX = Sandbox()


class Verdict(enum.Enum):
    EQUIVALENT = "equivalent"
    DIFFERENT = "different"
    CANNOT_JUDGE = "cannot judge"  # too big, too slow, or not math: neither right nor wrong


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str  # why, in words, for logs and diagnostics


class CannotJudge(ValueError):
    """Raised by :func:`equivalent` when the pair cannot be judged; ``.judgement`` says why."""

    def __init__(self, judgement: Judgement):
        super().__init__(judgement.reason)
        self.judgement = judgement


def judge(pred: str, gold: str, timeout_s: float = 2.0) -> Judgement:
    r"""Judge ``pred`` against ``gold``; returns within about ``timeout_s`` + 0.5 s.

    No text makes it raise; only a broken install does (``RuntimeError`` when the sandbox
    process cannot start).

    Time spent waiting for another thread's check counts against ``timeout_s``. The one
    exception to the bound: the first SymPy check in a process also waits for the
    sandbox process to start (about a second, once).

    >>> judge("2.50", "5/2").verdict.name, judge("7", "8").verdict.name
    ('EQUIVALENT', 'DIFFERENT')
    >>> judge("1" * 3000, "1").reason
    'prediction is longer than 2000 characters'
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(f"pred and gold must be str, not {type(pred).__name__}, {type(gold).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    quick = _quick_judgement(pred, gold)
    if quick is not None:
        return quick
    verdict, reason = _SANDBOX.compare(pred, gold, deadline)
    return Judgement(Verdict[verdict], reason)


def equivalent(pred: str, gold: str, timeout_s: float = 2.0) -> bool:
    r"""True when ``pred`` and ``gold`` are the same math, False when they differ.

    Raises :class:`CannotJudge` (a ``ValueError``) when :func:`judge` cannot tell, rather than
    return ``False``: "don't know" is not "wrong", and a caller that wants 0 for it should say
    so where it catches the exception.

    >>> equivalent("1e3", "1000"), equivalent("12", "1,200")
    (True, False)
    >>> equivalent("(" * 20 + "1" + ")" * 20, "1")
    Traceback (most recent call last):
    ...
    verifiers.math.CannotJudge: prediction nests brackets deeper than 12
    """
    judgement = judge(pred, gold, timeout_s)
    if judgement.verdict is Verdict.CANNOT_JUDGE:
        raise CannotJudge(judgement)
    return judgement.verdict is Verdict.EQUIVALENT


def _quick_judgement(pred: str, gold: str) -> Judgement | None:
    """The verdicts that need no SymPy: caps, identical text, plain numbers."""
    for name, text in (("prediction", pred), ("gold answer", gold)):
        if len(text) > MAX_CHARS:
            return Judgement(Verdict.CANNOT_JUDGE, f"{name} is longer than {MAX_CHARS} characters")
    if pred.strip() == gold.strip():
        return Judgement(Verdict.EQUIVALENT, "identical text")
    for name, text in (("prediction", pred), ("gold answer", gold)):
        if _nesting_depth(text) > MAX_DEPTH:
            return Judgement(Verdict.CANNOT_JUDGE, f"{name} nests brackets deeper than {MAX_DEPTH}")
    pred_value, gold_value = _exact_number(pred), _exact_number(gold)
    if pred_value is None or gold_value is None:
        return None
    if pred_value == gold_value:
        return Judgement(Verdict.EQUIVALENT, "equal as exact numbers")
    if "." in pred or "." in gold:
        return None  # leave decimal rounding to math-verify, so there is one rule for it
    return Judgement(Verdict.DIFFERENT, "unequal as exact numbers")


def _exact_number(text: str) -> Fraction | None:
    value = answers.parse_number(text)
    if value is None and _SCIENTIFIC.fullmatch(text.strip().strip("$")):
        value = Fraction(text.strip().strip("$"))
    return value


def _nesting_depth(text: str) -> int:
    """Deepest nesting of ``( [ {``, counting every opener whether or not it is closed."""
    depth = deepest = 0
    for bracket in _BRACKETS.finditer(text):
        depth = depth + 1 if bracket.group() in "([{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest
