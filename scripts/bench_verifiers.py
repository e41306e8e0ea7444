"""Verifier throughput: binary rewards per second, and ``equivalent`` latency percentiles.

    python scripts/bench_verifiers.py [--seconds 3] [--out results/bench_verifiers.json]

Binary rewards run on realistic adapter completions (the response prefix plus what a small
model writes: ``CORRECT}``, a number, a short rationale, garbage) in one process, one core.
``equivalent`` runs on a mixed set of math answers (numbers, fractions, LaTeX, algebra,
pathological inputs) and reports p50 / p99 / max latency and the verdict counts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: this checkout first

from scripts.bench_results import machine, write_result  # noqa: E402

COMPLETIONS = [
    "\\boxed{CORRECT}", "\\boxed{12}", "\\boxed{-1006}", "\\boxed{1,872}", "\\boxed{7.0}",
    "\\boxed{\\text{CORRECT}}", "\\boxed{INCORRECT}", "\\boxed{12",
    "The API says 12 but 3 γ 4 is 12, so \\boxed{CORRECT}",
    "θ is addition, so 3 θ 4 = 7. \\boxed{7}", "I think the answer is 15.", "\\boxed{5}\n\nExplanation: 2 + 3",
]
MATH_PAIRS = [
    ("1000", "1e3"), ("0.5", "\\frac{1}{2}"), ("7/2", "3.5"), ("2*sqrt(2)", "sqrt(8)"),
    ("x^2-1", "(x-1)*(x+1)"), ("\\frac{\\pi}{2}", "pi/2"), ("3", "4"), ("x+1", "x+2"),
    ("\\sqrt{2}", "1.41421356"), ("18", "18"), ("-5", "−5"), ("9**9**9**9", "1"),
    ("(" * 500 + "1" + ")" * 500, "1"), ("a" * 5000, "a"),
]


def bench_binary(seconds: float) -> dict:
    from verifiers.rewards import binary_reward

    rng = random.Random(0)
    items = [(c, rng.randint(-50, 50), rng.choice([None, 12, 7])) for c in COMPLETIONS * 100]
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for completion, truth, api in items:
            binary_reward(completion, truth, api)
        calls += len(items)
    elapsed = time.perf_counter() - start
    return {"calls": calls, "seconds": elapsed, "rewards_per_s": calls / elapsed}


def bench_equivalent(rounds: int) -> dict:
    from verifiers.math import judge

    latencies, verdicts = [], {}
    judge("x", "x+0")  # start the sandbox outside the measurement (identical text skips it)
    for _ in range(rounds):
        for pred, gold in MATH_PAIRS:
            start = time.perf_counter()
            verdict = judge(pred, gold).verdict.name
            latencies.append(time.perf_counter() - start)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"calls": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * pick(0.99), "max_ms": 1000 * latencies[-1], "verdicts": verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on binary rewards")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the math set")
    parser.add_argument("--out", type=Path, default=Path("results/bench_verifiers.json"))
    args = parser.parse_args(argv)
    binary = bench_binary(args.seconds)
    print(f"binary_reward: {binary['rewards_per_s']:,.0f} rewards/s ({binary['calls']:,} calls, one core)")
    equivalent = bench_equivalent(args.rounds)
    print(f"equivalent:    p50 {equivalent['p50_ms']:.2f} ms  p99 {equivalent['p99_ms']:.1f} ms  "
          f"max {equivalent['max_ms']:.1f} ms over {equivalent['calls']} calls; verdicts {equivalent['verdicts']}")
    write_result(args.out, {"binary_reward": binary, "equivalent": equivalent, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
