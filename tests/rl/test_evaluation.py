"""Evaluation metrics on hand-made rows whose every count is worked out by hand below."""

import itertools
import json
from dataclasses import dataclass
from fractions import Fraction

import pytest

from rl.evaluation import (
    EvalRow,
    accuracy,
    boundary_metrics,
    build_row,
    classify_error,
    decisions,
    errors,
    evaluate_items,
    format_table,
    operand_accuracy,
    pass_at_k,
    sample_metrics,
    summarize,
    symbol_accuracy,
    verdicts,
)
from rl.records import Completion, Prompt, SamplingParams
from verifiers.rewards import Example

# uid, category, expression, truth, API answer, completion  → what happens
CASES = [
    ("c1", "custom", "3 θ 4", 7, 7, r"\boxed{CORRECT}"),            # kept a correct API answer
    ("c2", "custom", "10 α 3", 7, 5, r"\boxed{7}"),                 # fixed a wrong one
    ("c3", "custom", "2 γ 6", 12, 12, r"\boxed{13}"),               # broke a correct one: arithmetic
    ("c4", "custom", "8 β 2", 4, 8, r"\boxed{CORRECT}"),            # left wrong: echoes the API
    ("c5", "custom", "8 β 2 θ 1", 5, 3, r"\boxed{2}"),              # left wrong: echoes an operand
    ("c6", "custom", "5 θ 5", 10, None, r"\boxed{CORRECT}"),        # CORRECT of no answer: no answer
    ("s1", "standard", "3 + 4 * 2", 11, 11, "I think it's 11"),     # no box: broke, no answer
    ("s2", "standard", "9 - 3", 6, 6, r"\boxed{CORRECT}"),          # kept
    ("s3", "standard", "12 / 4", 3, 4, r"\boxed{INCORRECT}"),       # unreadable verdict: no answer
]


def make_rows():
    return [build_row(uid, cat, text, Example(truth=truth, api_answer=api, question=expr))
            for uid, cat, expr, truth, api, text in CASES]


def acc(correct, total):
    return {"correct": correct, "total": total, "accuracy": correct / total}


def test_rows_carry_what_the_metrics_need():
    rows = {r.uid: r for r in make_rows()}
    assert [(r.correct, r.decision, r.error, r.answer) for r in rows.values()] == [
        (True, "CORRECT", None, "7"), (True, "override", None, "7"), (False, "override", "arithmetic", "13"),
        (False, "CORRECT", "echo_api", "8"), (False, "override", "echo_operand", "2"),
        (False, "CORRECT", "no_answer", None), (False, "none", "no_answer", None), (True, "CORRECT", None, "6"),
        (False, "none", "no_answer", None)]
    c6 = rows["c6"]
    assert (c6.expression, c6.api_answer, c6.truth, c6.api_correct) == ("5 θ 5", None, "10", False)
    assert rows["c1"].api_correct and rows["c1"].completion == r"\boxed{CORRECT}"
    record = json.loads(json.dumps(vars(rows["c5"])))  # what scripts/train.py writes per row
    assert EvalRow.from_dict({**record, "extra": 1}) == rows["c5"]


def test_category_accuracy_is_the_seeds_table():
    summary = summarize(make_rows())
    assert summary["categories"] == ["custom", "standard"]
    assert summary["custom"] == acc(2, 6) and summary["standard"] == acc(1, 3) and summary["overall"] == acc(3, 9)
    assert accuracy([]) == {"correct": 0, "total": 0, "accuracy": 0.0}


def test_accuracy_per_symbol():
    by_symbol = symbol_accuracy(make_rows())
    # θ in c1 (right), c5, c6; α in c2 (right); γ in c3; β in c4, c5; +,* in s1; - in s2 (right); / in s3
    assert list(by_symbol) == ["θ", "α", "γ", "β", "+", "-", "*", "/"]
    expected = {"θ": (1, 3), "α": (1, 1), "γ": (0, 1), "β": (0, 2), "+": (0, 1), "-": (1, 1), "*": (0, 1), "/": (0, 1)}
    assert {s: (v["correct"], v["total"]) for s, v in by_symbol.items()} == expected
    assert by_symbol["γ"]["op"] == "*" and by_symbol["γ"]["alphabet"] == "custom"
    assert by_symbol["/"]["alphabet"] == "standard"


def test_symbol_spellings_and_unparseable_expressions():
    rows = [build_row("a", "standard", r"\boxed{8}", Example(8, None, "2 × 4")),
            build_row("b", "standard", r"\boxed{1}", Example(1, None, "9 − 8")),
            build_row("c", "custom", r"\boxed{1}", Example(1, None, "not an expression"))]
    assert {s: v["total"] for s, v in symbol_accuracy(rows).items()} == {"*": 1, "-": 1}
    assert operand_accuracy(rows) == {"2": acc(2, 2)}


def test_accuracy_per_operand_count():
    by_operands = summarize(make_rows())["by_operands"]
    assert by_operands["custom"] == {"2": acc(2, 5), "3": acc(0, 1)}
    assert by_operands["standard"] == {"2": acc(1, 2), "3": acc(0, 1)}
    assert by_operands["overall"] == {"2": acc(3, 7), "3": acc(0, 2)}


def test_decisions_and_verdicts():
    rows = make_rows()
    assert decisions(rows) == {"kept_correct_api": 2, "fixed_wrong_api": 1, "broke_correct_api": 2, "left_wrong": 4}
    assert summarize(rows)["decisions"]["standard"] == {
        "kept_correct_api": 1, "fixed_wrong_api": 0, "broke_correct_api": 1, "left_wrong": 1}
    assert verdicts(rows) == {"CORRECT": {"n": 4, "correct": 2}, "override": {"n": 3, "correct": 1},
                              "none": {"n": 2, "correct": 0}}


def test_error_kinds():
    rows = make_rows()
    assert errors(rows) == {"wrong": 6, "misread_symbol": 0, "echo_api": 1, "echo_operand": 1, "arithmetic": 1,
                            "no_answer": 3}
    assert summarize(rows)["errors"]["custom"] == {
        "wrong": 4, "misread_symbol": 0, "echo_api": 1, "echo_operand": 1, "arithmetic": 1, "no_answer": 1}


@pytest.mark.parametrize("answer, api, expression, kind", [
    (None, 5, "2 θ 3", "no_answer"),
    (Fraction(12), 12, "12 θ 5", "echo_api"),      # the API restated the first operand: the API wins
    (Fraction(60), 60, "12 θ 5", "misread_symbol"),  # θ read as × by the API, kept by the adapter
    (Fraction(7), 17, "12 θ 5", "misread_symbol"),   # θ read as − by the adapter
    (Fraction(60), None, "2 γ 5 θ 2 γ 3", "misread_symbol"),  # θ as ×: 2·5·2·3 (the truth is 16)
    (Fraction(37), 3, "12 θ 5 β 5", "misread_symbol"),  # β as ×: 12 + 25 (the truth is 13)
    (Fraction(8), 8, "12 - 5", "echo_api"),          # standard symbols cannot be misread
    (Fraction(5), 3, "12 θ 5", "echo_operand"),
    (Fraction(6), None, "12 θ 5", "arithmetic"),
    (Fraction(-5), 3, "12 θ 5", "arithmetic"),       # a sign is not an operand
    (Fraction(5), None, "twelve and 5", "echo_operand"),  # unparseable: numbers in the text
])
def test_classify_error(answer, api, expression, kind):
    assert classify_error(answer, api, expression) == kind


def test_copying_the_api_number_is_an_echo_too():
    row = build_row("x", "custom", r"\boxed{8}", Example(truth=4, api_answer=8, question="8 β 2"))
    assert (row.decision, row.error) == ("override", "echo_api")


GSM8K = [
    "3 + 4 = 7\n#### 7",              # raw clean; stop-aware clean
    "#### 7\nHuman: next question 9",  # raw trailing text; the cut at \nHuman: makes it clean
    "The answer is 8",                 # wrong, no marker
    "I don't know",                    # no answer
    "#### 7 apples",                   # raw trailing text; cut after the marker: clean
]


def test_gsm8k_boundary_raw_and_stop_aware():
    rows = [build_row(f"g{i}", "gsm8k", text, Example(truth=7, question="q"), "gsm8k_exact")
            for i, text in enumerate(GSM8K)]
    assert [r.correct for r in rows] == [True, True, False, False, True]
    assert all(r.decision is None and r.error is None for r in rows)
    metrics = boundary_metrics(rows)
    raw, cut = metrics["raw"], metrics["stop_aware"]
    assert {k: raw[k] for k in ("total", "exact", "strict_final_line", "trailing_text", "final_format", "missing")} \
        == {"total": 5, "exact": 3, "strict_final_line": 1, "trailing_text": 2, "final_format": 3, "missing": 1}
    assert {k: cut[k] for k in ("exact", "strict_final_line", "trailing_text", "missing")} \
        == {"exact": 3, "strict_final_line": 3, "trailing_text": 0, "missing": 1}
    nonzero = lambda buckets: {b: n for b, n in buckets.items() if n}  # noqa: E731
    assert nonzero(raw["buckets"]) == {"correct_clean_contract": 1, "correct_with_trailing_text": 2,
                                       "wrong_missing_marker": 1, "wrong_missing_answer": 1}
    assert nonzero(cut["buckets"]) == {"correct_clean_contract": 3, "wrong_missing_marker": 1,
                                       "wrong_missing_answer": 1}
    summary = summarize(rows)
    assert "by_symbol" not in summary and summary["gsm8k"] == acc(3, 5)
    table = format_table(summary, "gsm8k")
    assert "strict final line                 1           3" in table


def test_pass_at_k_matches_counting_subsets():
    for n, c, k in [(4, 1, 2), (5, 2, 3), (6, 0, 2), (3, 3, 1), (6, 3, 6)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_format_table_prints_the_seeds_table_then_the_breakdowns():
    table = format_table(summarize(make_rows()), "held-out accuracy, after:")
    lines = table.splitlines()
    assert lines[0] == "held-out accuracy, after:"
    assert [line.split()[:2] for line in lines[1:4]] == [["custom", "2/6"], ["standard", "1/3"], ["overall", "3/9"]]
    assert "θ (+)        1/3" in table and "custom    2: 2/5 (40.0%)   3: 0/1 (0.0%)" in table
    assert ("decisions: kept a correct API answer 2, fixed a wrong one 1, broke a correct one 2, "
            "left a wrong one 4") in table
    assert "verdicts:  CORRECT 4 (2 right), override 3 (1 right), none 2 (0 right)" in table
    assert "errors (6 wrong): misread symbol 0, echo API 1, echo operand 1, arithmetic 1, no answer 3" in table


# --- evaluate_items through a scripted engine ------------------------------------------


@dataclass(frozen=True)
class Item:  # the fields of rl.loop.TrainItem that evaluation reads
    uid: str
    prompt: Prompt
    example: Example
    category: str


class ScriptedEngine:
    def __init__(self, texts):
        self.texts, self.policy_version = texts, 3

    def generate(self, prompts, n, sampling):
        return [Completion(p, s, [1], [-0.1], self.texts[prompt.text][s % len(self.texts[prompt.text])], "stop",
                           self.policy_version) for p, prompt in enumerate(prompts) for s in range(n)]


def _items():
    return [Item(uid, Prompt([1], f"prompt {uid}", response_prefix="Answer: "), Example(truth, api, expr), cat)
            for uid, cat, expr, truth, api, _ in CASES]


def test_evaluate_items_greedy():
    engine = ScriptedEngine({f"prompt {uid}": [text] for uid, *_, text in CASES})
    summary, rows = evaluate_items(engine, _items(), SamplingParams(temperature=0.0))
    assert summary == summarize(make_rows())
    assert rows[0].completion == r"Answer: \boxed{CORRECT}" and rows[0].policy_version == 3
    assert all(json.dumps(vars(row)) for row in rows)
    assert "samples" not in summary


def test_evaluate_items_in_chunks_with_progress_gives_the_same_rows(monkeypatch, capsys):
    import rl.evaluation

    engine = ScriptedEngine({f"prompt {uid}": [text] for uid, *_, text in CASES})
    whole = evaluate_items(engine, _items(), SamplingParams(temperature=0.0))
    monkeypatch.setattr(rl.evaluation, "PROGRESS_CHUNK", 4)  # 9 items: chunks of 4, 4, 1
    chunked = evaluate_items(engine, _items(), SamplingParams(temperature=0.0), progress="eval before")
    assert chunked == whole
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in printed] == ["eval before: 4/9 items", "eval before: 8/9 items",
                                                         "eval before: 9/9 items"]


def test_evaluate_items_pass_at_k():
    texts = {f"prompt {uid}": [r"\boxed{0}", text] for uid, *_, text in CASES}  # sample 1 is the scripted one
    summary, rows = evaluate_items(ScriptedEngine(texts), _items(), SamplingParams(temperature=1.0), n_samples=2)
    assert len(rows) == 18 and {r.sample_index for r in rows} == {0, 1}
    assert summary["overall"] == acc(3, 18)
    assert summary["samples"]["overall"] == {"items": 9, "n_samples": 2, "pass@1": pytest.approx(3 / 18),
                                             "pass@k": pytest.approx(3 / 9)}
    assert sample_metrics([])["items"] == 0
    assert "pass@2 33.3%" in format_table(summary, "t")
    with pytest.raises(ValueError, match="temperature"):
        evaluate_items(ScriptedEngine(texts), _items(), SamplingParams(temperature=0.0), n_samples=2)
