"""Every verifier on ≥10,000 hostile strings: no crash, no hang, each call within its bound.

The bounds are hang detectors (a verifier that loops or explodes on a megabyte input),
not performance assertions: they are orders of magnitude above the normal cost.
"""

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from tests.verifiers.hostile import hostile_strings
from verifiers import answers, rewards, symbols

CHEAP_BOUND_S = 5.0
CORPUS = hostile_strings()


def _cheap_verifiers(text: str):
    yield answers.extract_boxed(text)
    yield answers.resolve_adapter_answer(text, Fraction(3))
    yield answers.parse_api_answer(text)
    yield answers.parse_number(text)
    yield answers.score_gsm8k(text, 18)
    yield answers.stop_aware(text)
    for name, reward in rewards.REWARDS.items():
        result = reward(text, rewards.Example(truth=18, api_answer=3, question=text[:1000]))
        assert isinstance(result.reward, float), name
    try:
        symbols.evaluate(text)
    except (symbols.SymbolError, ZeroDivisionError):
        pass


def test_corpus_is_large_and_hostile():
    assert len(CORPUS) >= 10_000
    assert max(map(len, CORPUS)) >= 1 << 20


def test_cheap_verifiers_on_hostile_corpus():
    slowest = (0.0, "")
    for text in CORPUS:
        start = time.perf_counter()
        for _ in _cheap_verifiers(text):
            pass
        elapsed = time.perf_counter() - start
        slowest = max(slowest, (elapsed, text[:40]))
        assert elapsed < CHEAP_BOUND_S, f"{elapsed:.2f}s on {text[:60]!r} (len {len(text)})"
    print(f"slowest call: {slowest[0] * 1000:.1f} ms on {slowest[1]!r}")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_cheap_verifiers_never_raise_on_arbitrary_text(text):
    for _ in _cheap_verifiers(text):
        pass


def test_math_judge_on_hostile_corpus():
    from verifiers.math import Verdict, judge

    timeout_s = 2.0
    judge("x", "x+0")  # start the sandbox outside the per-call bound (a once-per-process cost)
    verdicts = {}
    for text in CORPUS:
        start = time.perf_counter()
        verdict = judge(text, "18", timeout_s=timeout_s).verdict
        elapsed = time.perf_counter() - start
        assert elapsed < timeout_s + 1.5, f"{elapsed:.2f}s on {text[:60]!r} (len {len(text)})"
        assert isinstance(verdict, Verdict)
        verdicts[verdict.name] = verdicts.get(verdict.name, 0) + 1
    print(f"math.judge verdicts on the corpus: {verdicts}")
