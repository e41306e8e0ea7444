"""verifiers.math: the three verdicts, the fast path, and the bounds on hostile input.

Hostile checks use a short budget (0.5 s); "returns in time" means within budget + 1 s.
"""

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings, strategies as st

from tests.verifiers.hostile import MEGABYTE, hostile_strings
from verifiers._sandbox import Sandbox
from verifiers.math import MAX_CHARS, CannotJudge, Verdict, equivalent, judge

pytestmark = pytest.mark.timeout(120)  # a hang detector for the whole file

HOSTILE_BUDGET_S = 0.5
NOT_EQUIVALENT = {Verdict.DIFFERENT, Verdict.CANNOT_JUDGE}

EQUIVALENT_PAIRS = [
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    ("1e3", "1000"),
    ("1,000", "1000"),
    ("$1,000", "1000"),
    ("-3", "−3"),
    (r"\boxed{-3}", "-3"),
    (r"the answer is \boxed{\frac{1}{2}}", "0.5"),
    ("2*sqrt(2)", "sqrt(8)"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    ("x^2-1", "(x-1)*(x+1)"),
    ("(x-1)(x+1)", "x**2 - 1"),
    ("2.5e-3*x", "x/400"),
    ("7/2", "3.5"),
    ("pi", r"\pi"),
    ("50%", "0.5"),
    (r"\{1, 2\}", r"\{2, 1\}"),
]
DIFFERENT_PAIRS = [
    ("-3", "3"),
    ("0.5", r"\frac{1}{3}"),
    ("1e3", "100"),
    ("12", "1,200"),
    ("2*sqrt(2)", "sqrt(6)"),
    ("x^2-1", "(x-1)*(x-1)"),
    ("x^2+1", "(x-1)*(x+1)"),
    (r"\boxed{3}", "-3"),
    ("2.0", "3"),
    ("3.14", "pi"),
    ("twelve", "12"),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT_PAIRS)
def test_equivalent_forms(pred, gold):
    judgement = judge(pred, gold)
    assert judgement.verdict is Verdict.EQUIVALENT, judgement
    assert equivalent(pred, gold) is True


@pytest.mark.parametrize("pred, gold", DIFFERENT_PAIRS)
def test_different_forms(pred, gold):
    judgement = judge(pred, gold)
    assert judgement.verdict is Verdict.DIFFERENT, judgement
    assert equivalent(pred, gold) is False


def test_plain_numbers_skip_sympy_and_take_microseconds():
    start = time.perf_counter()
    for _ in range(1000):
        assert judge("1,000", "1e3").reason == "equal as exact numbers"
        assert judge("-7/2", "7/2").reason == "unequal as exact numbers"
    assert time.perf_counter() - start < 0.5


def test_decimal_rounding_is_left_to_math_verify():
    # Exact fractions would call these different; math-verify rounds to 6 places.
    assert judge("0.333333", "1/3").verdict is Verdict.EQUIVALENT
    assert judge("0.3333", "1/3").verdict is Verdict.DIFFERENT


def test_gold_that_is_not_math_cannot_be_judged_but_a_bad_prediction_is_wrong():
    assert judge("3", "}").verdict is Verdict.CANNOT_JUDGE
    assert judge("}", "3").verdict is Verdict.DIFFERENT


def test_equivalent_raises_cannot_judge_with_the_judgement():
    with pytest.raises(CannotJudge) as caught:
        equivalent("1" * (MAX_CHARS + 1), "1")
    assert isinstance(caught.value, ValueError)
    assert caught.value.judgement.verdict is Verdict.CANNOT_JUDGE
    assert "longer than" in str(caught.value)


def test_caps_answer_at_once():
    start = time.perf_counter()
    assert judge("a" * MEGABYTE, "1").verdict is Verdict.CANNOT_JUDGE
    assert "nests brackets" in judge("{" * 100 + "1", "1").reason
    assert judge("1", "(" * 10_000 + "1" + ")" * 10_000).verdict is Verdict.CANNOT_JUDGE
    assert time.perf_counter() - start < 0.1


def test_bad_arguments_are_errors_not_verdicts():
    with pytest.raises(TypeError):
        judge(3, "3")
    with pytest.raises(ValueError):
        judge("3", "3", timeout_s=0)


HOSTILE = [
    "9**9**9**9", "9^{9^{9^{9}}}", "2^(10^10)", "2^{2^{40}}", "(10^{10})!", "10**10**10",
    "1+" * 999 + "1", "a" * MEGABYTE, "9" * MEGABYTE, "(" * 10_000 + "1" + ")" * 10_000,
    "{" * 10_000, "\\boxed{" * 10_000, "\x00" * 100, "1\x00", "\x1b[31m1", "\x07\x08\r\n",
    "𝟗", "٣", "\u202e1", "\ufeff1", "\ud800", "½", "\\", "",
]


@pytest.mark.parametrize("side", ["pred", "gold"])
@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t[:12]))
def test_hostile_input_returns_in_time_and_never_equivalent(text, side):
    pred, gold = (text, "7") if side == "pred" else ("7", text)
    start = time.monotonic()
    judgement = judge(pred, gold, timeout_s=HOSTILE_BUDGET_S)
    assert judgement.verdict in NOT_EQUIVALENT, judgement
    assert time.monotonic() - start < HOSTILE_BUDGET_S + 1.0


def test_hostile_corpus_sample():
    corpus = hostile_strings(n=2000, seed=1)
    for text in corpus[:21] + corpus[-120:]:  # the hand-made big ones, then random mixes
        start = time.monotonic()
        assert judge(text, "123457", timeout_s=HOSTILE_BUDGET_S).verdict in NOT_EQUIVALENT
        assert time.monotonic() - start < HOSTILE_BUDGET_S + 1.0, repr(text[:60])


def test_next_call_works_after_a_timeout():
    timed_out = judge("9^{9^{9^{9}}}", "1", timeout_s=0.3)
    assert timed_out.verdict is Verdict.CANNOT_JUDGE and "did not finish" in timed_out.reason
    assert judge("x^2-1", "(x-1)*(x+1)").verdict is Verdict.EQUIVALENT


def test_from_many_threads():
    # math-verify's own timeout (SIGALRM) fails outside the main thread; this one must not.
    pairs = (EQUIVALENT_PAIRS + DIFFERENT_PAIRS) * 2
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda pair: judge(*pair, timeout_s=30).verdict, pairs))
    expected = ([Verdict.EQUIVALENT] * len(EQUIVALENT_PAIRS) + [Verdict.DIFFERENT] * len(DIFFERENT_PAIRS)) * 2
    assert verdicts == expected


def test_time_waiting_for_another_thread_counts_against_the_budget():
    judge("x", "x+0")  # the server is up, so only the waiting is measured
    hog = threading.Thread(target=judge, args=("9^{9^{9^{9}}}", "1"), kwargs={"timeout_s": 1.5})
    hog.start()
    time.sleep(0.2)
    start = time.monotonic()
    judgement = judge("x^2-1", "(x-1)*(x+1)", timeout_s=0.3)
    assert time.monotonic() - start < 0.3 + 0.5
    assert judgement.verdict is Verdict.CANNOT_JUDGE and "another thread" in judgement.reason
    hog.join()


def test_sandbox_restarts_when_its_server_dies():
    sandbox = Sandbox()
    try:
        assert sandbox.compare("x+x", "2*x", time.monotonic() + 30)[0] == "EQUIVALENT"
        first = sandbox.pid
        os.killpg(first, signal.SIGKILL)
        os.waitpid(first, 0)
        assert sandbox.compare("x+x", "3*x", time.monotonic() + 30)[0] == "DIFFERENT"
        assert sandbox.pid not in (None, first)
    finally:
        sandbox.close()
    assert sandbox.pid is None


def test_a_forked_child_starts_its_own_sandbox():
    judge("x", "x+0")  # the parent's server is running when the child is forked
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=lambda: results.put(judge("x+x", "2*x", timeout_s=30).verdict))
    child.start()
    assert results.get(timeout=60) is Verdict.EQUIVALENT
    child.join(10)
    assert judge("x+x", "3*x").verdict is Verdict.DIFFERENT  # the parent's still works


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_runs_under_an_address_space_cap():
    sandbox = Sandbox(memory_mb=512)
    try:
        sandbox.compare("x+x", "2*x", time.monotonic() + 30)
        with open(f"/proc/{sandbox.pid}/task/{sandbox.pid}/children") as children:
            (worker,) = children.read().split()
        with open(f"/proc/{worker}/limits") as limits:
            line = next(row for row in limits if row.startswith("Max address space"))
        assert line.split()[3] != "unlimited" and int(line.split()[3]) < 2 << 30
    finally:
        sandbox.close()


TOKENS = list("0123456789+-*/^().,=x ") + ["\\frac{", "}", "{", "\\sqrt{", "sqrt(", "pi", "e", "%", "$", "\\boxed{"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.booleans())
def test_arbitrary_text_always_gets_a_verdict(text, as_gold):
    pred, gold = (text, "x^2-1") if not as_gold else ("x^2-1", text)
    assert isinstance(judge(pred, gold, timeout_s=1.0).verdict, Verdict)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25).map("".join),
       st.lists(st.sampled_from(TOKENS), max_size=25).map("".join))
def test_math_like_text_always_gets_a_verdict(pred, gold):
    start = time.monotonic()
    assert isinstance(judge(pred, gold, timeout_s=1.0).verdict, Verdict)
    assert time.monotonic() - start < 2.0
