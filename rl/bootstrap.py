"""Paired bootstrap of two evaluations of the same examples: is B really better than A?

The answer-boundary lab's procedure (``../shared/seed-experiment.md``):

1. pair the records by example id (``uid``); ids present on one side only are listed, never
   compared;
2. per pair, delta = correct(B) − correct(A), in {−1, 0, +1}: +1 is a win for B, −1 a loss;
3. ``iterations`` times (10,000 by default), draw n deltas with replacement (numpy's seeded
   ``default_rng``) and take their mean;
4. the 95% interval is the 2.5th and 97.5th percentile of those means, interpolated linearly
   between the sorted means (what ``numpy.percentile`` does by default).

The result reads both as a fraction of the paired examples (``mean_delta``, ``ci_low``,
``ci_high``) and as a count of examples (``sum_delta``, ``ci_low_count``, ``ci_high_count``;
the lab's "exact −4, interval [−10, +1]").

Command line::

    python -m rl.bootstrap a.jsonl b.jsonl [--iterations N] [--seed S] [--field correct] [--json out.json]

Inputs are JSONL with one record per example (``uid`` and ``correct``, as the training
entry's ``eval_*.jsonl`` writes them) or a report's ``results.json`` (its ``records``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

CHUNK = 1024  # resamples drawn at once: bounds memory at CHUNK × n deltas


@dataclass(frozen=True)
class BootstrapResult:
    """B − A over the paired examples.

    mean_delta: mean per-example delta (a fraction of n_paired); sum_delta: the same as a
    count of examples; ci_low / ci_high: the interval of the mean delta at ``confidence``;
    ci_low_count / ci_high_count: that interval times n_paired; wins / losses / ties: pairs
    with delta +1 / −1 / 0; a_correct / b_correct: correct paired records on each side;
    missing_in_a / missing_in_b: ids only the other side has (sorted).
    """

    n_paired: int
    mean_delta: float
    sum_delta: int
    ci_low: float
    ci_high: float
    ci_low_count: float
    ci_high_count: float
    wins: int
    losses: int
    ties: int
    a_correct: int
    b_correct: int
    missing_in_a: list[str]
    missing_in_b: list[str]
    iterations: int
    seed: int
    confidence: float = 0.95


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending values, interpolated linearly between
    neighbours: position ``q/100 · (n − 1)``, as ``numpy.percentile``'s default.

    >>> percentile([0.0, 1.0, 2.0, 10.0], 50)
    1.5
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    position = q / 100 * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction)


def pair(a: Mapping[str, bool], b: Mapping[str, bool]) -> tuple[list[str], list[str], list[str]]:
    """``(paired ids, missing in a, missing in b)``, each sorted."""
    return sorted(a.keys() & b.keys()), sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())


def bootstrap_means(deltas: Sequence[float], iterations: int, seed: int) -> np.ndarray:
    """``iterations`` means of ``len(deltas)`` deltas drawn with replacement, sorted."""
    values = np.asarray(deltas, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(iterations, dtype=np.float64)
    for start in range(0, iterations, CHUNK):
        size = min(CHUNK, iterations - start)
        picks = rng.integers(0, len(values), size=(size, len(values)))
        means[start : start + size] = values[picks].mean(axis=1)
    means.sort()
    return means


def paired_bootstrap(a: Mapping[str, bool], b: Mapping[str, bool], iterations: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> BootstrapResult:
    """Compare ``b`` against ``a`` (each ``{uid: correct}``); see the module docstring."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ids, missing_in_a, missing_in_b = pair(a, b)
    if not ids:
        raise ValueError(f"no example id is on both sides ({len(a)} in a, {len(b)} in b)")
    deltas = [int(bool(b[i])) - int(bool(a[i])) for i in ids]
    means = bootstrap_means(deltas, iterations, seed)
    tail = 100 * (1 - confidence) / 2
    low, high = percentile(means, tail), percentile(means, 100 - tail)
    n = len(ids)
    return BootstrapResult(
        n_paired=n, mean_delta=sum(deltas) / n, sum_delta=sum(deltas), ci_low=low, ci_high=high,
        ci_low_count=low * n, ci_high_count=high * n, wins=deltas.count(1), losses=deltas.count(-1),
        ties=deltas.count(0), a_correct=sum(bool(a[i]) for i in ids), b_correct=sum(bool(b[i]) for i in ids),
        missing_in_a=missing_in_a, missing_in_b=missing_in_b, iterations=iterations, seed=seed,
        confidence=confidence)


def _lookup(record: dict, field: str):
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def read_records(path: str | Path, field: str = "correct") -> dict[str, bool]:
    """``{uid: correct}`` from a JSONL of records or a results JSON with ``records``.

    ``field`` may be dotted (``boundary.stop_aware.exact``). A record without ``uid`` or
    the field, a non-boolean value, or an id seen twice is an error naming file and line
    (several samples per example must be reduced to one record before comparing).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL of several lines
    if isinstance(whole, dict) and isinstance(whole.get("records"), list):
        records = list(enumerate(whole["records"], start=1))
    else:
        records = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    out: dict[str, bool] = {}
    for number, record in records:
        where = f"{path}:{number}"
        try:
            uid, value = str(record["uid"]), _lookup(record, field)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where}: record has no {error} (need 'uid' and {field!r})") from None
        if value not in (True, False, 0, 1):  # 1.0 and 0.0 compare equal and pass
            raise ValueError(f"{where}: {field} must be true/false or 0/1, got {value!r}")
        if uid in out:
            raise ValueError(f"{where}: example id {uid!r} appears twice (one record per example)")
        out[uid] = bool(value)
    return out


def _signed(x: float, digits: int = 0) -> str:
    return f"{x:+.{digits}f}" if abs(x) >= 0.5 * 10**-digits else f"{0:.{digits}f}"


def format_result(result: BootstrapResult, name_a: str = "a", name_b: str = "b", listed: int = 10) -> str:
    """A few lines for the console: counts, the interval in examples and as a fraction."""
    r, n, pct = result, result.n_paired, round(100 * result.confidence)
    lines = [
        f"paired bootstrap: {name_b} vs {name_a} ({name_b} − {name_a}), {n} paired examples",
        f"  {name_a}: {r.a_correct}/{n} correct   {name_b}: {r.b_correct}/{n} correct",
        f"  delta {_signed(r.sum_delta)} examples ({_signed(r.mean_delta, 4)}): "
        f"{r.wins} wins, {r.losses} losses, {r.ties} ties",
        f"  {pct}% interval: [{_signed(r.ci_low_count, 1)}, {_signed(r.ci_high_count, 1)}] examples "
        f"([{_signed(r.ci_low, 4)}, {_signed(r.ci_high, 4)}]); {r.iterations} resamples, seed {r.seed}",
    ]
    for label, ids in ((f"only in {name_b} (missing in {name_a})", r.missing_in_a),
                       (f"only in {name_a} (missing in {name_b})", r.missing_in_b)):
        if ids:
            more = f" … and {len(ids) - listed} more" if len(ids) > listed else ""
            lines.append(f"  {label}, not compared: {len(ids)}: {', '.join(ids[:listed])}{more}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.bootstrap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="the baseline's records")
    parser.add_argument("b", type=Path, help="the candidate's records (deltas are b − a)")
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--field", default="correct", help="the boolean to compare (dotted for nested)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        result = paired_bootstrap(read_records(args.a, args.field), read_records(args.b, args.field),
                                  args.iterations, args.seed, args.confidence)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_result(result, args.a.name, args.b.name))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "field": args.field,
                                         **asdict(result)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
