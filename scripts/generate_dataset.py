"""Write a task's train/test JSONL files.

    python scripts/generate_dataset.py symbols --out data/symbols            # the seed's 1600/400
    python scripts/generate_dataset.py symbols --tier t1 --n-per-type 500 --out data/t1
    python scripts/generate_dataset.py gsm8k --source ../shared/data/gsm8k/train.jsonl --out data/gsm8k

Symbols: ``--n-per-type`` custom + as many standard expressions from one seeded RNG, split
per type (``--test-fraction``), rows ``{"expression", "answer", "type", "tier"}``. GSM8K: the
rows of ``--source`` (default: the test split shipped in ``rl/data/gsm8k``) validated line by
line and written as ``test.jsonl``; malformed rows are listed as ``file:line`` and refused
unless ``--skip-bad-rows``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHIPPED_GSM8K_TEST = Path(__file__).resolve().parents[1] / "rl" / "data" / "gsm8k" / "test.jsonl"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("symbols", "gsm8k"))
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n-per-type", type=int, default=1000, help="symbols: items per type")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--tier", default="seed", help="symbols: seed, or a ladder rung t1..t4")
    parser.add_argument("--unique", action="store_true",
                        help="symbols: distinct expressions per type (train and test share none)")
    parser.add_argument("--source", type=Path, default=SHIPPED_GSM8K_TEST, help="gsm8k: rows to read")
    parser.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows instead of refusing")
    return parser


def _tier(name: str):
    from verifiers.symbol_data import LADDER, SEED_TIER

    tiers = {tier.name: tier for tier in (SEED_TIER, *LADDER)}
    if name not in tiers:
        raise SystemExit(f"--tier {name!r} is not a tier; choose one of {', '.join(tiers)}")
    return tiers[name]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from verifiers.symbol_data import build_symbol_dataset, write_jsonl

    if args.task == "symbols":
        try:
            train, test = build_symbol_dataset(args.n_per_type, args.seed, args.test_fraction, _tier(args.tier),
                                               unique=args.unique)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        for name, rows in (("train", train), ("test", test)):
            count = write_jsonl(rows, args.out / f"{name}.jsonl")
            print(f"wrote {count} rows to {args.out / f'{name}.jsonl'}")
        return 0
    from rl.datasets import DatasetError, read_tasks

    try:
        tasks, problems = read_tasks(args.source, "gsm8k", "skip" if args.skip_bad_rows else "refuse")
    except (DatasetError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    count = write_jsonl((task.row for task in tasks), args.out / "test.jsonl")
    print(f"wrote {count} rows to {args.out / 'test.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
