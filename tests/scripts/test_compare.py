"""api-adapter compare: two evaluations paired item by item, re-graded from stored completions."""

from __future__ import annotations

import json

from scripts import compare

SYMBOL = {"category": "custom", "expression": "3 θ 4", "truth": "7", "api_answer": "12"}
GSM8K = {"category": "gsm8k", "expression": "q", "truth": "1000", "api_answer": None}


def row(uid, base, completion, correct, boundary=None):
    return {"uid": uid, **base, "completion": completion, "correct": correct, "boundary": boundary}


def test_grades_read_the_stored_completion():
    boxed, prose = row("a", SYMBOL, r"\boxed{7}", True), row("b", SYMBOL, "it is 7", False)
    kept = row("c", SYMBOL, r"\boxed{CORRECT}", False)
    assert [compare.grade(r, "strict") for r in (boxed, prose, kept)] == [True, False, False]
    assert [compare.grade(r, "tolerant") for r in (boxed, prose, kept)] == [True, True, False]
    clean, trailing = row("d", GSM8K, "so\n#### 1,000", False), row("e", GSM8K, "#### 1000 and more", False)
    assert [compare.grade(r, "strict") for r in (clean, trailing)] == [True, False]
    assert [compare.grade(r, "tolerant") for r in (clean, trailing)] == [True, True]
    assert compare.grade(clean, "stored") is False


def test_two_runs_compared_per_metric_and_scope(tmp_path, capsys):
    a = [row(f"s{i}", SYMBOL, r"\boxed{12}", False) for i in range(6)]
    b = [row(f"s{i}", SYMBOL, r"\boxed{7}", True) for i in range(5)] + [row("s5", SYMBOL, r"\boxed{12}", False)]
    b.append(row("only-b", SYMBOL, r"\boxed{7}", True))
    boundary = {"stop_aware": {"strict_final_line": True, "trailing_text": False}}
    a.append(row("g", GSM8K, "#### 1000", True, boundary))
    b.append(row("g", GSM8K, "#### 1000", True, {"stop_aware": {"strict_final_line": False, "trailing_text": True}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (tmp_path / "b.json").write_text(json.dumps({"records": b}))
    out = tmp_path / "cmp.json"
    assert compare.main([str(run), str(tmp_path / "b.json"), "--iterations", "500", "--json", str(out)]) == 0
    found = {(c["metric"], c["scope"]): c for c in json.loads(out.read_text())["comparisons"]}
    overall = found[("correct", "overall")]
    assert (overall["n_paired"], overall["a_correct"], overall["b_correct"], overall["wins"]) == (7, 1, 6, 5)
    assert overall["missing_in_a"] == ["only-b"] and overall["ci_low_count"] > 0
    assert found[("correct", "symbol θ")]["sum_delta"] == 5 and ("correct", "symbol θ") in found
    assert found[("strict_final_line", "gsm8k")]["sum_delta"] == -1
    assert found[("trailing_text", "overall")]["sum_delta"] == 1
    printed = capsys.readouterr().out
    assert "7 items paired" in printed and "unpaired: 1 only in B" in printed


def test_unreadable_or_unpaired_input_is_exit_2(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps(row("x", SYMBOL, "", False)) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(row("y", SYMBOL, "", False)) + "\n")
    assert compare.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert "no example id is on both sides" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing"), str(tmp_path / "b.jsonl")]) == 2
