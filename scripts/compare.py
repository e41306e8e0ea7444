"""Compare two evaluated runs item by item: ``api-adapter compare A B``.

    api-adapter compare runs/recipe runs/candidate                  # final evaluations, as graded
    api-adapter compare runs/x/eval_after_sft.jsonl runs/x/eval_after.jsonl --grade tolerant
    api-adapter compare A B --json runs/compare.json

A and B are run folders (their ``eval_<--label>.jsonl``, ``after`` by default), evaluation JSONL
files, or reports' ``results.json``. Records pair by example id; ids on one side only are
counted, never compared. Nothing is generated again: ``--grade`` re-reads the stored
completions.

- ``stored``: the verdicts the evaluation recorded (``correct``);
- ``strict``: symbol items, the adapter's boxed answer (CORRECT: the API's) equals the truth (the
  training reward); GSM8K items, the ``####`` number equals the gold *and* its line is the last;
- ``tolerant``: symbol items, the strict answer or else the last number of the completion;
  GSM8K items, the number after the marker (or first box, or last number) with ``, $ %`` removed
  (the lab's "tolerant rescore").

For each metric (``correct`` under the grade; for GSM8K also ``strict_final_line`` and
``trailing_text``, stop-aware as the evaluation stored them) and each scope (overall, per
category, per symbol: the items whose expression uses it), the table shows A and B with counts and
B − A with its paired-bootstrap interval (``rl/bootstrap.py``: 10,000 resamples, seeded).
Exit status 0; 2 for unreadable or unpaired inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:
    sys.path.insert(0, str(REPO))

GRADES = ("stored", "strict", "tolerant")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api-adapter compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the baseline: a run folder, an eval JSONL or a results.json")
    p.add_argument("b", type=Path, help="the candidate (deltas are B − A)")
    p.add_argument("--label", default="after", help="which eval_<label>.jsonl of a run folder (default after)")
    p.add_argument("--grade", choices=GRADES, default="stored")
    p.add_argument("--iterations", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every comparison here")
    return p


def read_rows(path: Path, label: str) -> list[dict]:
    """The evaluation records of a run folder, an eval JSONL or a report's results.json."""
    if path.is_dir():
        path = path / f"eval_{label}.jsonl"
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)["records"]
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if any(row.get("sample_index", 0) for row in rows):
        raise ValueError(f"{path}: several samples per item; compare one record per item")
    return rows


def _number(text: str | None) -> Fraction | None:
    from verifiers.answers import parse_number

    return None if text is None else parse_number(str(text))


def grade(row: dict, how: str) -> bool:
    """Whether ``row`` is right under ``how`` (module docstring), from its stored completion."""
    from verifiers.answers import find_numbers, resolve_adapter_answer, score_gsm8k

    if how == "stored":
        return bool(row["correct"])
    truth = _number(row["truth"])
    if row["category"] == "gsm8k":
        score = score_gsm8k(row["completion"], row["truth"])
        return score.exact and score.strict_final_line if how == "strict" else score.exact
    answer = resolve_adapter_answer(row["completion"], _number(row.get("api_answer")))
    if answer is None and how == "tolerant":
        numbers = find_numbers(row["completion"])
        answer = numbers[-1] if numbers else None
    return answer is not None and answer == truth


def metrics(row: dict, how: str) -> dict[str, bool]:
    out = {"correct": grade(row, how)}
    boundary = (row.get("boundary") or {}).get("stop_aware")
    if boundary:
        out.update(strict_final_line=bool(boundary["strict_final_line"]), trailing_text=bool(boundary["trailing_text"]))
    return out


def scopes(row: dict) -> list[str]:
    from verifiers.symbols import symbols_in

    found = ["overall", row["category"]]
    if row["category"] != "gsm8k":
        found += [f"symbol {s}" for s in sorted(symbols_in(row["expression"]))]
    return found


def compare(a_rows: list[dict], b_rows: list[dict], how: str, iterations: int, seed: int) -> list[dict]:
    """One entry per (metric, scope) with both sides' counts and the paired bootstrap of B − A."""
    from rl.bootstrap import paired_bootstrap

    tables: dict[tuple[str, str], tuple[dict, dict]] = {}
    for side, rows in ((0, a_rows), (1, b_rows)):
        for row in rows:
            for metric, value in metrics(row, how).items():
                for scope in scopes(row):
                    tables.setdefault((metric, scope), ({}, {}))[side][str(row["uid"])] = value
    out = []
    for (metric, scope), (a, b) in sorted(tables.items(), key=lambda kv: (kv[0][0], _scope_order(kv[0][1]))):
        if not set(a) & set(b):
            continue
        result = paired_bootstrap(a, b, iterations, seed)
        out.append({"metric": metric, "scope": scope, **asdict(result)})
    if not out:
        raise ValueError(f"no example id is on both sides ({len(a_rows)} records in A, {len(b_rows)} in B)")
    return out


def _scope_order(scope: str) -> tuple:
    return ({"overall": 0, "custom": 1, "standard": 2, "gsm8k": 3}.get(scope, 4), scope)


def format_table(results: list[dict], name_a: str, name_b: str) -> str:
    lines = [f"{'metric':<18} {'scope':<10} {name_a[:10]:>10} {name_b[:10]:>10}  {'B − A [95% interval]':<22} wins/losses"]
    for r in results:
        n = r["n_paired"]
        delta = f"{r['sum_delta']:+d} [{r['ci_low_count']:+.0f}, {r['ci_high_count']:+.0f}]"
        lines.append(f"{r['metric']:<18} {r['scope']:<10} {r['a_correct']:>6}/{n:<3} {r['b_correct']:>6}/{n:<3}"
                     f"  {delta:<22} {r['wins']}/{r['losses']}")
    missing = results[0]["missing_in_a"], results[0]["missing_in_b"]
    if any(missing):
        lines.append(f"unpaired: {len(missing[0])} only in B, {len(missing[1])} only in A (not compared)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        a_rows, b_rows = read_rows(args.a, args.label), read_rows(args.b, args.label)
        results = compare(a_rows, b_rows, args.grade, args.iterations, args.seed)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"A = {args.a}, B = {args.b}; grade {args.grade}; {results[0]['n_paired']} items paired")
    print(format_table(results, "A", "B"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "grade": args.grade,
                                         "comparisons": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
