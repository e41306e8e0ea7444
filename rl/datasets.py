"""Task rows read from JSONL, validated line by line.

Two task kinds: ``symbols`` (rows ``{"expression", "answer", "type"}``, the answer checked
against :func:`verifiers.symbols.evaluate`) and ``gsm8k`` (rows ``{"question", "answer"}``,
the gold read after the last ``####``). A malformed row (bad JSON, a missing or mistyped
field, an expression the engine rejects, an answer that disagrees with it) is reported with
its file and line. ``on_error="refuse"`` (the default) raises :class:`DatasetError` listing
every bad row before anything runs; ``on_error="skip"`` drops them and returns the reports.
A row is never half-processed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

from verifiers.answers import gsm8k_gold
from verifiers.symbols import SymbolError, evaluate

TaskKind = Literal["symbols", "gsm8k"]
OnError = Literal["refuse", "skip"]
MAX_REPORTED = 20


class DatasetError(ValueError):
    """One or more malformed rows; the message lists them as ``file:line: problem``."""


@dataclass(frozen=True)
class Task:
    """One item to solve.

    uid: ``"<file name>:<line>"`` unless the row has an ``id``; prompt: the text sent
    upstream (the expression, or the question); truth: the exact answer; category:
    ``custom`` / ``standard`` for symbols, ``gsm8k`` otherwise; row: the row as read.
    """

    uid: str
    prompt: str
    truth: Fraction
    category: str
    row: dict = field(repr=False, compare=False)


@dataclass(frozen=True)
class RowProblem:
    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


def _symbol_task(row: dict, uid: str) -> Task:
    expression, answer, kind = row.get("expression"), row.get("answer"), row.get("type")
    if not isinstance(expression, str):
        raise ValueError(f"'expression' must be a string, got {expression!r}")
    if kind not in ("custom", "standard"):
        raise ValueError(f"'type' must be 'custom' or 'standard', got {kind!r}")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise ValueError(f"'answer' must be an integer, got {answer!r}")
    try:
        value = evaluate(expression)
    except (SymbolError, ZeroDivisionError) as error:
        raise ValueError(f"expression {expression!r}: {error}") from None
    if Fraction(answer) != value:
        raise ValueError(f"'answer' {answer!r} disagrees with the expression's value {value}")
    return Task(uid, expression, value, kind, row)


def _gsm8k_task(row: dict, uid: str) -> Task:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"'question' must be a non-empty string, got {question!r}")
    if not isinstance(answer, (str, int)):
        raise ValueError(f"'answer' must be a string or number, got {answer!r}")
    truth = gsm8k_gold(answer) if isinstance(answer, str) else Fraction(answer)
    return Task(uid, question, truth, "gsm8k", row)


_PARSERS = {"symbols": _symbol_task, "gsm8k": _gsm8k_task}


def read_tasks(
    path: str | Path, kind: TaskKind, on_error: OnError = "refuse", limit: int | None = None
) -> tuple[list[Task], list[RowProblem]]:
    """Read and validate every row of ``path``; ``(tasks, problems)``.

    ``limit`` keeps the first N valid rows. Blank lines are ignored.
    """
    if kind not in _PARSERS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {sorted(_PARSERS)}")
    if on_error not in ("refuse", "skip"):
        raise ValueError(f"on_error must be 'refuse' or 'skip', got {on_error!r}")
    path = Path(path)
    tasks: list[Task] = []
    problems: list[RowProblem] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
                uid = str(row.get("id", f"{path.name}:{number}"))
                tasks.append(_PARSERS[kind](row, uid))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                problems.append(RowProblem(str(path), number, str(error)))
            if limit is not None and len(tasks) >= limit:
                break
    if problems and on_error == "refuse":
        listed = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DatasetError(
            f"{len(problems)} malformed row(s) in {path} (pass on_error='skip' / --skip-bad-rows "
            f"to drop them):\n{listed}{more}"
        )
    return tasks, problems
