"""Evaluating the chain (upstream answer → adapter → final answer) on held-out items.

Greedy by default, through the same rollout engine as training. :func:`evaluate_items` turns
each completion into an :class:`EvalRow` (one per example and sample, JSON-ready with
``vars(row)``); :func:`summarize` computes every metric from rows alone, so a saved
``eval_*.jsonl`` can be re-summarized and compared later (``rl.bootstrap``, ``rl.report``).

Symbol task metrics (rows whose ``decision`` is not ``None``):

- accuracy per category (``custom`` / ``standard``) and overall, with counts: the seed's table;
- per symbol: accuracy over the items that contain it (θ α γ β, and + - * / for standard
  items): which operations have been learned;
- per operand count, per category;
- decisions: kept a correct API answer, fixed a wrong one, broke a correct one, left a wrong
  one; verdicts: how often the adapter said CORRECT / overrode / gave no readable verdict,
  and how often each was right;
- errors of the wrong rows, in this order of precedence: ``no_answer`` (no box, an unreadable
  box, or CORRECT when the API gave no answer), ``misread_symbol`` (the final answer is the
  expression's value with a custom symbol read as another operation, e.g. θ as ×, whether
  the adapter computed it or kept the API's), ``echo_api`` (the final answer is the API's,
  by CORRECT or by copying it), ``echo_operand`` (it is one of the expression's operands),
  ``arithmetic`` (any other number). These are the seed's failure modes.

GSM8K-style rows (category ``gsm8k``) get the answer-boundary metrics of
:func:`verifiers.answers.score_gsm8k` (exact, strict final line, trailing text, missing,
the failure-taxonomy buckets), on the raw completion and stop-aware, side by side.

With ``n_samples=k > 1`` every item gets k sampled completions; the accuracy tables then count
samples (their accuracy estimates pass@1) and ``summary["samples"]`` adds pass@k per item.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from math import comb
from typing import Any, Iterable, Sequence

from rl.interfaces import RolloutEngine
from rl.records import SamplingParams
from verifiers.answers import (
    GSM8K_BUCKETS,
    find_numbers,
    gsm8k_gold,
    is_correct_token,
    last_box_span,
    parse_number,
    score_gsm8k,
    stop_aware,
)
from verifiers.rewards import Example, get_reward
from verifiers.symbols import OPS, SEED_SYMBOLS, SymbolError, SymbolMap, evaluate, symbols_in, tokenize

ERROR_KINDS = ("misread_symbol", "echo_api", "echo_operand", "arithmetic", "no_answer")
DECISIONS = ("kept_correct_api", "fixed_wrong_api", "broke_correct_api", "left_wrong")
DECISION_LABELS = {"kept_correct_api": "kept a correct API answer", "fixed_wrong_api": "fixed a wrong one",
                   "broke_correct_api": "broke a correct one", "left_wrong": "left a wrong one"}
VERDICTS = ("CORRECT", "override", "none")
BOUNDARY_COUNTS = ("exact", "strict_final_line", "trailing_text", "final_format", "missing")
_CATEGORY_ORDER = ("custom", "standard", "gsm8k")
PROGRESS_CHUNK = 50
"""Items per engine call when evaluation shows its progress."""


@dataclass(frozen=True)
class EvalRow:
    """One evaluated completion; every field is JSON-ready.

    expression: the task text sent upstream (the expression; the question for GSM8K);
    truth / api_answer / answer: exact numbers as strings (``"7"``, ``"7/2"``), ``None`` for
    none; api_answer is the upstream's parsed answer, answer the adapter's resolved final
    answer (the API's for CORRECT); completion: response prefix + generated text;
    decision: ``"CORRECT"``, ``"override"`` (a readable number) or ``"none"`` (no readable
    verdict), ``None`` for non-adapter tasks; error: one of :data:`ERROR_KINDS` for a wrong
    adapter row, else ``None``; boundary: GSM8K only, ``{"raw": {...}, "stop_aware": {...}}``
    each with exact, strict_final_line, trailing_text, final_format, bucket, predicted.
    """

    uid: str
    category: str
    expression: str
    truth: str
    api_answer: str | None
    api_correct: bool
    completion: str
    answer: str | None
    decision: str | None
    correct: bool
    reward: float
    error: str | None = None
    boundary: dict | None = None
    sample_index: int = 0
    finish_reason: str | None = None
    policy_version: int | None = None

    @classmethod
    def from_dict(cls, record: dict) -> "EvalRow":
        """A row read back from JSON (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def _text(value: Fraction | int | None) -> str | None:
    return None if value is None else str(Fraction(value))


def _truth_value(truth: Fraction | int | str) -> Fraction:
    if isinstance(truth, str):
        value = gsm8k_gold(truth) if "####" in truth else parse_number(truth)
        if value is None:
            raise ValueError(f"truth is not a number: {truth!r}")
        return value
    return Fraction(truth)


def operands(expression: str, symbols: SymbolMap = SEED_SYMBOLS) -> list[int] | None:
    """The expression's operands, ``None`` when it does not parse.

    >>> operands("12 θ 7 γ 3")
    [12, 7, 3]
    """
    try:
        tokens = tokenize(expression, symbols)
    except SymbolError:
        return None
    return [t for t in tokens[::2]]  # type: ignore[misc]


def classify_error(answer: Fraction | None, api_answer: Fraction | int | None, expression: str,
                   symbols: SymbolMap = SEED_SYMBOLS) -> str:
    """Why a wrong final answer is wrong (see the module docstring for the precedence).

    >>> classify_error(Fraction(12), 12, "12 θ 5"), classify_error(Fraction(60), 60, "12 θ 5")
    ('echo_api', 'misread_symbol')
    """
    if answer is None:
        return "no_answer"
    if answer in misread_values(expression, symbols):
        return "misread_symbol"
    if api_answer is not None and answer == api_answer:
        return "echo_api"
    numbers = operands(expression, symbols)
    if numbers is None:
        numbers = find_numbers(expression)
    return "echo_operand" if answer in numbers else "arithmetic"


def misread_values(expression: str, symbols: SymbolMap = SEED_SYMBOLS) -> set[Fraction]:
    """The values ``expression`` takes when its custom symbols are read as other operations
    (every other assignment of ``+ - * /`` to the symbols it uses), minus its true value.

    >>> sorted(misread_values("6 θ 2"))  # θ is +: as -, *, /
    [Fraction(3, 1), Fraction(4, 1), Fraction(12, 1)]
    """
    used = sorted(c for c in set(expression) if c in symbols.custom)
    if not used:
        return set()
    try:
        truth = evaluate(expression, symbols)
    except (SymbolError, ZeroDivisionError):
        return set()
    values = set()
    for ops in itertools.product(OPS, repeat=len(used)):
        try:
            values.add(evaluate(expression, SymbolMap(dict(zip(used, ops)))))
        except ZeroDivisionError:
            continue
    return values - {truth}


def _verdict(completion: str, answer: Fraction | None) -> str:
    span = last_box_span(completion)
    if span is None:
        return "none"
    if is_correct_token(completion[span[0] : span[1]]):
        return "CORRECT"
    return "override" if answer is not None else "none"


def _boundary(completion: str, truth: Fraction) -> dict:
    out = {}
    for mode, text in (("raw", completion), ("stop_aware", stop_aware(completion))):
        score = score_gsm8k(text, truth)
        out[mode] = {"exact": score.exact, "strict_final_line": score.strict_final_line,
                     "trailing_text": score.trailing_text, "final_format": score.final_format,
                     "bucket": score.bucket, "predicted": _text(score.predicted)}
    return out


def build_row(uid: str, category: str, completion: str, example: Example, reward: str = "binary", *,
              sample_index: int = 0, finish_reason: str | None = None, policy_version: int | None = None,
              symbols: SymbolMap = SEED_SYMBOLS) -> EvalRow:
    """Score one completion and record what every metric needs.

    ``gsm8k`` rows are correct when the raw completion is exact (whatever the reward, so a
    shaped reward's score does not blur accuracy); other rows when the reward is 1.0.
    """
    result = get_reward(reward)(completion, example)
    truth = _truth_value(example.truth)
    api = example.api_answer
    expression = example.question or ""
    boundary = decision = error = None
    if category == "gsm8k":
        boundary = _boundary(completion, truth)
        correct = boundary["raw"]["exact"]
    else:
        correct = result.reward == 1.0
        decision = _verdict(completion, result.answer)
        error = None if correct else classify_error(result.answer, api, expression, symbols)
    return EvalRow(uid=uid, category=category, expression=expression, truth=_text(truth),
                   api_answer=_text(api), api_correct=api is not None and api == truth, completion=completion,
                   answer=_text(result.answer), decision=decision, correct=correct, reward=result.reward,
                   error=error, boundary=boundary, sample_index=sample_index, finish_reason=finish_reason,
                   policy_version=policy_version)


def evaluate_items(engine: RolloutEngine, items: Sequence, sampling: SamplingParams, reward: str = "binary",
                   n_samples: int = 1, symbols: SymbolMap = SEED_SYMBOLS,
                   progress: str | None = None) -> tuple[dict, list[EvalRow]]:
    """``n_samples`` completions per item; ``(summary, rows)``. ``items`` are ``rl.loop.TrainItem``.

    ``n_samples > 1`` is for pass@k and needs sampling (temperature > 0): greedy samples
    would all be the same. ``progress``: a label; the items then go to the engine in chunks of
    :data:`PROGRESS_CHUNK` and ``label: done/total`` is printed as they finish (a seeded
    sampling call gives other samples in chunks than in one call; greedy gives the same).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if n_samples > 1 and sampling.temperature == 0:
        raise ValueError("n_samples > 1 needs temperature > 0 (greedy samples are identical)")
    prompts = [item.prompt for item in items]
    if progress is None:
        completions = engine.generate(prompts, n_samples, sampling)
    else:
        from rl.metrics import Progress

        shown, completions = Progress(progress, len(prompts)), []
        for start in range(0, len(prompts), PROGRESS_CHUNK):
            chunk = engine.generate(prompts[start: start + PROGRESS_CHUNK], n_samples, sampling)
            completions += [dataclasses.replace(c, prompt_index=c.prompt_index + start) for c in chunk]
            shown.update(min(start + PROGRESS_CHUNK, len(prompts)), " items")
    rows = []
    for completion in completions:
        item = items[completion.prompt_index]
        rows.append(build_row(
            item.uid, item.category, item.prompt.response_prefix + completion.text, item.example, reward,
            sample_index=completion.sample_index, finish_reason=completion.finish_reason,
            policy_version=completion.policy_version, symbols=symbols))
    return summarize(rows, symbols), rows


# --- metrics: pure functions of rows ---------------------------------------------------


def accuracy(rows: Sequence[EvalRow]) -> dict:
    """``{"correct", "total", "accuracy"}``; accuracy 0.0 for no rows."""
    right = sum(r.correct for r in rows)
    return {"correct": right, "total": len(rows), "accuracy": right / len(rows) if rows else 0.0}


def categories(rows: Iterable[EvalRow]) -> list[str]:
    """The rows' categories: custom, standard, gsm8k first, then any others sorted."""
    present = {r.category for r in rows}
    return [c for c in _CATEGORY_ORDER if c in present] + sorted(present - set(_CATEGORY_ORDER))


def _by_scope(rows: Sequence[EvalRow], metric) -> dict:
    """``metric`` per category and over all rows (key ``overall``)."""
    out = {c: metric([r for r in rows if r.category == c]) for c in categories(rows)}
    out["overall"] = metric(rows)
    return out


def symbol_accuracy(rows: Sequence[EvalRow], symbols: SymbolMap = SEED_SYMBOLS) -> dict:
    """Accuracy over the items that contain each operator symbol.

    Custom symbols in the map's order, then standard ``+ - * /`` (``×`` ``÷`` ``−`` count as
    ``*`` ``/`` ``-``); symbols that occur in no row are left out. Each value also names the
    operation (``op``) and the alphabet.
    """
    groups: dict[str, list[EvalRow]] = {s: [] for s in symbols.custom}
    groups.update({op: [] for op in OPS})
    for row in rows:
        if operands(row.expression, symbols) is None:
            continue
        for symbol in symbols_in(row.expression, symbols):
            groups[symbol].append(row)
    out = {}
    for symbol, chosen in groups.items():
        if chosen:
            custom = symbol in symbols.custom
            out[symbol] = {"op": symbols.custom[symbol] if custom else symbol,
                           "alphabet": "custom" if custom else "standard", **accuracy(chosen)}
    return out


def operand_accuracy(rows: Sequence[EvalRow], symbols: SymbolMap = SEED_SYMBOLS) -> dict:
    """Accuracy per operand count (keys ``"2"``, ``"3"``...; unparseable expressions skipped)."""
    counts: dict[int, list[EvalRow]] = {}
    for row in rows:
        numbers = operands(row.expression, symbols)
        if numbers is not None:
            counts.setdefault(len(numbers), []).append(row)
    return {str(n): accuracy(counts[n]) for n in sorted(counts)}


def decisions(rows: Sequence[EvalRow]) -> dict:
    """What the adapter did with the API's answer, judged by the final answer."""
    return {
        "kept_correct_api": sum(r.api_correct and r.correct for r in rows),
        "fixed_wrong_api": sum(not r.api_correct and r.correct for r in rows),
        "broke_correct_api": sum(r.api_correct and not r.correct for r in rows),
        "left_wrong": sum(not r.api_correct and not r.correct for r in rows),
    }


def verdicts(rows: Sequence[EvalRow]) -> dict:
    """``{verdict: {"n", "correct"}}`` for CORRECT, override and none."""
    return {v: {"n": sum(r.decision == v for r in rows), "correct": sum(r.decision == v and r.correct for r in rows)}
            for v in VERDICTS}


def errors(rows: Sequence[EvalRow]) -> dict:
    """The wrong rows (``wrong``) split by :data:`ERROR_KINDS`."""
    kinds = Counter(r.error for r in rows if not r.correct)
    return {"wrong": sum(not r.correct for r in rows), **{k: kinds.get(k, 0) for k in ERROR_KINDS}}


def boundary_metrics(rows: Sequence[EvalRow]) -> dict:
    """GSM8K answer-boundary counts, ``{"raw": {...}, "stop_aware": {...}}``; ``missing``
    counts completions with no readable answer, ``buckets`` the failure taxonomy."""
    out = {}
    for mode in ("raw", "stop_aware"):
        scores = [r.boundary[mode] for r in rows if r.boundary]
        counts = {"total": len(scores)}
        for key in BOUNDARY_COUNTS:
            counts[key] = sum(s["predicted"] is None if key == "missing" else bool(s[key]) for s in scores)
        tally = Counter(s["bucket"] for s in scores)
        counts["buckets"] = {b: tally.get(b, 0) for b in GSM8K_BUCKETS}
        out[mode] = counts
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one item with ``c`` correct out of ``n`` samples (Chen et al. 2021).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def sample_metrics(rows: Sequence[EvalRow]) -> dict:
    """``{"items", "n_samples", "pass@1", "pass@k"}`` over the rows grouped by uid (k: the
    smallest group's size, so every item contributes the same k)."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        groups.setdefault(row.uid, []).append(row.correct)
    if not groups:
        return {"items": 0, "n_samples": 0, "pass@1": 0.0, "pass@k": 0.0}
    k = min(len(g) for g in groups.values())
    mean = lambda j: sum(pass_at_k(len(g), sum(g), j) for g in groups.values()) / len(groups)  # noqa: E731
    return {"items": len(groups), "n_samples": k, "pass@1": mean(1), "pass@k": mean(k)}


def summarize(rows: Sequence[EvalRow], symbols: SymbolMap = SEED_SYMBOLS) -> dict:
    """Every metric of the rows. Keys: each category and ``overall`` (accuracy with counts,
    the seed's table), ``categories`` (which keys those are); for adapter rows also
    ``by_symbol``, ``by_operands``, ``decisions``, ``verdicts``, ``errors`` (the last four per
    category and overall); ``boundary`` for GSM8K rows; ``samples`` when items have >1 sample."""
    summary: dict[str, Any] = _by_scope(rows, accuracy)
    summary["categories"] = categories(rows)
    adapter = [r for r in rows if r.decision is not None]
    if adapter:
        summary["by_symbol"] = symbol_accuracy(adapter, symbols)
        summary["by_operands"] = _by_scope(adapter, lambda rs: operand_accuracy(rs, symbols))
        summary["decisions"] = _by_scope(adapter, decisions)
        summary["verdicts"] = _by_scope(adapter, verdicts)
        summary["errors"] = _by_scope(adapter, errors)
    if any(r.boundary for r in rows):
        summary["boundary"] = boundary_metrics(rows)
    if len({r.uid for r in rows}) < len(rows):
        summary["samples"] = _by_scope(rows, sample_metrics)
    return summary


# --- the console table -----------------------------------------------------------------


def _count(value: dict) -> str:
    return f"{value['correct']:>4}/{value['total']:<4} ({100 * value['accuracy']:5.1f}%)"


def _label(name: str) -> str:
    return name.replace("_", " ").replace("api", "API")


def format_table(summary: dict, title: str) -> str:
    """The seed's table (accuracy per category and overall, with counts), then the breakdowns."""
    lines = [title]
    for name in [*summary["categories"], "overall"]:
        lines.append(f"  {name:<10} {_count(summary[name])}")
    if "by_symbol" in summary:
        lines.append("  by symbol:")
        for symbol, value in summary["by_symbol"].items():
            op = f"({value['op']})" if value["alphabet"] == "custom" else ""
            lines.append(f"    {symbol + ' ' + op:<10}{_count(value)}")
    if "by_operands" in summary:
        lines.append("  by operand count:")
        for scope, counts in summary["by_operands"].items():
            lines.append(f"    {scope:<10}" + "   ".join(
                f"{n}: {v['correct']}/{v['total']} ({100 * v['accuracy']:.1f}%)" for n, v in counts.items()))
    if "decisions" in summary:
        d, v, e = summary["decisions"]["overall"], summary["verdicts"]["overall"], summary["errors"]["overall"]
        lines.append("  decisions: " + ", ".join(f"{DECISION_LABELS[k]} {n}" for k, n in d.items()))
        lines.append("  verdicts:  " + ", ".join(f"{k} {x['n']} ({x['correct']} right)" for k, x in v.items()))
        lines.append(f"  errors ({e['wrong']} wrong): " + ", ".join(f"{_label(k)} {e[k]}" for k in ERROR_KINDS))
    if "boundary" in summary:
        raw, cut = summary["boundary"]["raw"], summary["boundary"]["stop_aware"]
        lines.append(f"  answer boundary ({raw['total']} items)   raw  stop-aware")
        for key in BOUNDARY_COUNTS:
            lines.append(f"    {_label(key):<30}{raw[key]:>5} {cut[key]:>11}")
        for bucket in GSM8K_BUCKETS:
            lines.append(f"    {bucket:<30}{raw['buckets'][bucket]:>5} {cut['buckets'][bucket]:>11}")
    if "samples" in summary:
        s = summary["samples"]["overall"]
        lines.append(f"  samples: {s['items']} items × {s['n_samples']}: pass@1 {100 * s['pass@1']:.1f}%, "
                     f"pass@{s['n_samples']} {100 * s['pass@k']:.1f}%")
    return "\n".join(lines)


def rows_as_dicts(rows: Iterable[EvalRow | dict]) -> list[dict]:
    """Rows as plain dicts (rows already read back from JSON pass through)."""
    return [dict(r) if isinstance(r, dict) else asdict(r) for r in rows]
