"""GSM8K train solutions as rationale-SFT rows in the strict final-line format.

    python scripts/rationale_data.py --source ../shared/data/gsm8k/train.jsonl --out data/gsm8k/rationale.jsonl

Each row ``{"question", "answer"}`` becomes ``{"id", "prompt", "completion"}``: the prompt is
:func:`rl.prompts.gsm8k_prompt` (raw text, the prompt GSM8K rollouts and evaluation use), the
completion the solution with its calculator annotations (``<<48/2=24>>``) removed, blank lines
dropped, and ``#### n`` as its last line. Every completion is checked with the self-distillation
rule (:func:`rl.distill.keep_sample`: exact, strict final line, no trailing text); a row that
fails it is reported and left out. The output feeds ``sft.data_path``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strict_solution(answer: str) -> str:
    """A GSM8K answer field in the strict final-line format.

    >>> strict_solution("Half: 48/2 = <<48/2=24>>24.\\n\\n#### 1,007 ")
    'Half: 48/2 = 24.\\n#### 1,007'
    """
    body, marker, tail = answer.rpartition("####")
    if not marker:
        raise ValueError("no '####' in the answer field")
    lines = [line.rstrip() for line in _CALCULATOR.sub("", body).splitlines() if line.strip()]
    return "\n".join([*lines, f"#### {tail.strip()}"])


def rationale_rows(source: Path) -> tuple[list[dict], list[str]]:
    """``(rows, problems)`` for every GSM8K row of ``source`` (problems: ``file:line: why``)."""
    from rl.datasets import read_tasks
    from rl.distill import keep_sample
    from rl.prompts import gsm8k_prompt

    tasks, problems = read_tasks(source, "gsm8k", on_error="skip")
    rows, bad = [], [str(p) for p in problems]
    for task in tasks:
        completion = "\n" + strict_solution(task.row["answer"])
        if not keep_sample(completion, task.truth):
            bad.append(f"{task.uid}: the rewritten solution does not pass the strict rule")
            continue
        rows.append({"id": task.uid, "prompt": gsm8k_prompt(task.prompt), "completion": completion})
    return rows, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="GSM8K rows {question, answer} (JSONL)")
    parser.add_argument("--out", type=Path, required=True, help="rationale rows {id, prompt, completion} (JSONL)")
    parser.add_argument("--limit", type=int, help="keep the first N rows")
    args = parser.parse_args(argv)
    rows, bad = rationale_rows(args.source)
    rows = rows[: args.limit] if args.limit else rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}; left out {len(bad)}")
    for line in bad[:20]:
        print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
