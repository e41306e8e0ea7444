"""scripts/ablate.py: the side-by-side table on hand-made results.json files, the ablation
configs (cpu_t1 with only the condition and name changed), and the checks made before any
training. No training runs here."""

from __future__ import annotations

import json

import pytest

from rl.config import load_config, to_dict
from scripts.ablate import DEFAULT_CONFIGS, format_markdown, format_text, load_run, main, table_rows


def acc(correct, total):
    return {"correct": correct, "total": total, "accuracy": correct / total}


def make_run(root, name, condition, *, before=True, after=(30, 36, 66)):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  condition: {condition}\nlogging:\n  name: {name}\n")
    results = {"run_dir": str(run), "steps": 30, "train_seconds": 312.4, "reward_curve": [0.125, 0.5, 0.75],
               "after": {"custom": acc(after[0], 40), "standard": acc(after[1], 40), "overall": acc(after[2], 80),
                         "categories": ["custom", "standard"]}}
    if before:
        results["before"] = {"custom": acc(0, 40), "standard": acc(30, 40), "overall": acc(30, 80)}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_table_side_by_side(tmp_path):
    runs = [load_run(make_run(tmp_path, "ablation_A", "A")),
            load_run(make_run(tmp_path, "ablation_D", "D", before=False, after=(10, 38, 48))),
            load_run(tmp_path / "ablation_C", "ablation_C", "C")]
    rows = dict(table_rows(runs))
    assert rows["run"] == ["ablation_A", "ablation_D", "ablation_C"] and rows["condition"] == ["A", "D", "C"]
    assert rows["custom before"] == ["0/40 (0.0%)", "-", "-"]
    assert rows["custom after"] == ["30/40 (75.0%)", "10/40 (25.0%)", "-"]
    assert rows["overall after"] == ["66/80 (82.5%)", "48/80 (60.0%)", "-"]
    assert rows["custom change"] == ["+75.0 pts", "-", "-"] and rows["standard change"][0] == "+15.0 pts"
    assert rows["reward first -> last"][0] == "0.125 -> 0.750" and rows["train time"][0] == "312 s"
    assert rows["error"][2].startswith("no ") and rows["error"][2].endswith("results.json")
    text = format_text(runs).splitlines()
    assert text[0].split() == ["run", "ablation_A", "ablation_D", "ablation_C"]
    assert text[3].split()[:4] == ["custom", "after", "30/40", "(75.0%)"]
    md = format_markdown(runs)
    assert "| | ablation_A | ablation_D | ablation_C |" in md and "|---|---|---|---|" in md
    assert "| custom after | 30/40 (75.0%) | 10/40 (25.0%) | - |" in md


def test_table_only_writes_markdown_and_json(tmp_path, capsys):
    configs = []
    for condition in "AB":
        make_run(tmp_path / "runs", f"ablation_{condition}", condition)
        configs.append(f"configs/ablation_{condition}.yaml")
    out = tmp_path / "summary"
    argv = ["--configs", *configs, "--set", f"logging.run_dir={tmp_path / 'runs'}/{{name}}", "--table-only",
            "--out", str(out)]
    assert main(argv) == 0
    assert "overall after" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["condition"] for r in summary["runs"]] == ["A", "B"]
    assert summary["runs"][0]["after"]["overall"]["correct"] == 66
    assert "| overall after | 66/80 (82.5%) | 66/80 (82.5%) |" in (out / "summary.md").read_text()


def test_ablation_configs_are_cpu_t1_but_for_condition_and_name_and_b_warm_start():
    base = to_dict(load_config("configs/cpu_t1.yaml"))
    for path, condition in zip(DEFAULT_CONFIGS, "ABCD"):
        config = to_dict(load_config(path))
        assert (config["data"]["condition"], config["logging"]["name"]) == (condition, f"ablation_{condition}")
        config["data"]["condition"], config["logging"]["name"] = base["data"]["condition"], base["logging"]["name"]
        if condition == "B":  # no symbol in B's prompt: nothing for the surrogate warm-start to teach
            assert config["sft"]["items"] == "standard"
            config["sft"]["items"] = base["sft"]["items"]
        assert config == base, f"{path} drifted from configs/cpu_t1.yaml"


def test_bad_configs_fail_before_any_training(tmp_path, capsys):
    assert main(["--set", "algorithm.stepz=3", "--out", str(tmp_path)]) == 2
    assert "algorithm.stepz" in capsys.readouterr().err
    assert main(["--set", f"logging.run_dir={tmp_path}/same", "--out", str(tmp_path)]) == 2
    assert "would both write into" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()
