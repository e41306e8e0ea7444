"""The report: results JSON, Markdown tables, gallery and PNG plots from hand-made rows."""

import hashlib
import json

import pytest

from rl.bootstrap import read_records
from rl.evaluation import build_row, summarize
from rl.report import main, report_from_run, write_report
from verifiers.rewards import Example


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CASES = [
    ("c1", "custom", "3 θ 4", 7, 7, r"\boxed{CORRECT}"),
    ("c2", "custom", "10 α 3", 7, 5, r"\boxed{7}"),
    ("c3", "custom", "2 γ 6", 12, 12, r"\boxed{13}"),
    ("c4", "custom", "8 β 2", 4, 8, r"\boxed{CORRECT}"),
    ("c5", "custom", "8 β 2 θ 1", 5, 3, r"\boxed{2}"),
    ("s1", "standard", "3 + 4 * 2", 11, 11, "it is 11 | ``` odd"),
    ("s2", "standard", "9 - 3", 6, 6, r"\boxed{CORRECT}"),
]
HISTORY = [{"step": s, "reward/mean": 0.1 * s, "reward/std": 0.2, "reward/custom": 0.05 * s,
            "reward/standard": 0.15 * s, "timing/rollout": 1.0, **({"eval/custom": 0.1 * s} if s % 2 else {})}
           for s in range(6)]


def rows_for(completions):
    return [build_row(uid, cat, text, Example(truth=truth, api_answer=api, question=expr))
            for (uid, cat, expr, truth, api, _), text in zip(CASES, completions)]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"expression": "3 θ 4", "answer": 7, "type": "custom"}\n')
    before = summarize(rows_for([r"\boxed{CORRECT}"] * len(CASES)))
    rows = rows_for([c[-1] for c in CASES])
    results = {"title": "Hand-made report", "model": "tiny-model", "adapter": {"checkpoint": "ck/step_2"},
               "config": {"algorithm": {"steps": 5}}, "test_path": str(test_file), "before": before,
               "train_seconds": 1.5}
    paths = write_report(tmp_path / "report", results, rows, HISTORY)
    return paths, test_file, rows


def test_writes_the_files_and_valid_pngs(written):
    paths, _, _ = written
    assert set(paths) == {"results", "report", "training_curves", "category_accuracy", "symbol_accuracy"}
    for name in ("training_curves", "category_accuracy", "symbol_accuracy"):
        assert_png(paths[name])


def test_results_json_has_identity_metrics_and_records(written):
    paths, test_file, rows = written
    document = json.loads(paths["results"].read_text())
    assert document["data"]["sha256"] == hashlib.sha256(test_file.read_bytes()).hexdigest()
    assert document["model"] == "tiny-model" and document["adapter"] == {"checkpoint": "ck/step_2"}
    assert document["config"] == {"algorithm": {"steps": 5}} and document["extra"] == {"train_seconds": 1.5}
    after = document["metrics"]["after"]
    assert (after["custom"]["correct"], after["standard"]["correct"], after["overall"]["total"]) == (2, 1, 7)
    assert document["metrics"]["before"]["overall"]["correct"] == 4  # CORRECT everywhere: c1 c3 s1 s2
    assert [r["uid"] for r in document["records"]] == [r.uid for r in rows]
    assert read_records(paths["results"]) == {r.uid: r.correct for r in rows}  # bootstrap reads it as is


def test_markdown_has_the_tables_gallery_and_plots(written):
    paths, _, _ = written
    md = paths["report"].read_text()
    assert "| category | before | after | change |" in md
    assert "| custom | 2/5 (40.0%) | 2/5 (40.0%) | +0 (+0.0 pts) |" in md
    assert "| standard | 2/2 (100.0%) | 1/2 (50.0%) | -1 (-50.0 pts) |" in md
    assert "| overall | 4/7 (57.1%) | 3/7 (42.9%) | -1 (-14.3 pts) |" in md
    assert "| α (-) | 0/1 (0.0%) | 1/1 (100.0%) | +1 (+100.0 pts) |" in md
    assert "| standard | 3 | 1/1 (100.0%) | 0/1 (0.0%) | -1 (-100.0 pts) |" in md
    assert "| fixed a wrong one | 1 | 0 | 1 |" in md and "| echo_operand | 1 | 0 | 1 |" in md
    assert "| CORRECT | 2 (1) | 1 (1) | 3 (2) |" in md
    assert "![category_accuracy](plots/category_accuracy.png)" in md
    assert "### custom: correct (2 shown)" in md and "### custom: failed (3 shown)" in md
    assert "wrong (echo_api)" in md and "wrong (echo_operand)" in md and "wrong (arithmetic)" in md
    assert "````text" in md  # a completion holding ``` gets a longer fence


def test_report_without_history_or_before_and_for_gsm8k(tmp_path):
    rows = [build_row(f"g{i}", "gsm8k", text, Example(truth=7, question="How many?"), "gsm8k_exact")
            for i, text in enumerate(["#### 7", "#### 7\nHuman: more", "no idea"])]
    paths = write_report(tmp_path, {}, rows)
    assert "training_curves" not in paths and "symbol_accuracy" not in paths
    assert_png(paths["category_accuracy"])
    md = paths["report"].read_text()
    assert "| category | accuracy |" in md and "| gsm8k | 2/3 (66.7%) |" in md
    assert "| trailing text | 1 | 0 |" in md and "| correct_with_trailing_text | 1 | 0 |" in md
    assert "wrong (wrong_missing_answer)" in md


def test_report_from_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "test.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text("model:\n  name_or_path: embedded\n")
    for label, completions in (("before", [r"\boxed{CORRECT}"] * len(CASES)), ("after", [c[-1] for c in CASES]),
                               ("after_sft", [r"\boxed{CORRECT}"] * len(CASES))):
        (run / f"eval_{label}.jsonl").write_text("".join(json.dumps(vars(r)) + "\n" for r in rows_for(completions)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in HISTORY))
    paths = report_from_run(run)
    document = json.loads(paths["results"].read_text())
    assert document["model"] == "embedded" and document["adapter"]["checkpoint"].endswith("step_000002")
    assert document["data"]["sha256"] == hashlib.sha256(b"{}\n").hexdigest()
    assert "training_curves" in paths and paths["report"].parent == run / "report"
    stages = document["metrics"]["stages"]  # the bars: upstream alone, after the warm-start, after training
    assert list(stages) == ["upstream alone", "after warm-start", "after training"]
    upstream_right = sum(r.api_correct for r in rows_for([c[-1] for c in CASES]))
    assert stages["upstream alone"]["overall"]["correct"] == upstream_right
    for key in ("custom", "standard", "overall"):  # CORRECT everywhere keeps the upstream's answers
        assert stages["after warm-start"][key] == stages["upstream alone"][key]
    assert "| category | upstream alone | after warm-start | after training |" in paths["report"].read_text()
    assert main([str(tmp_path / "missing")]) == 2 and "no final evaluation" in capsys.readouterr().err
