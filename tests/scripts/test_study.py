"""scripts/study.py: the spec is checked before anything runs, each run is train.py with the
study's and the run's overrides plus the budget, and the report is made from the run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import study

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_study_resolves_to_valid_configs():
    from rl.config import load_config

    spec = study.load_spec(ROOT / "configs" / "study" / "t1.yaml")
    assert len(spec["runs"]) >= 6 and "peer" in {r["name"] for r in spec["runs"]}
    for run in spec["runs"]:
        command = study.train_command(spec, run, Path("/tmp/x") / run["name"])
        config = load_config(command[3], command[5::2])
        assert config.algorithm.max_train_seconds == spec["budget_s"] and config.data.unique
        assert config.logging.run_dir == f"/tmp/x/{run['name']}"


def test_a_bad_spec_names_the_problem(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nconfig: configs/smoke.yaml\nbudget_s: 5\nruns:\n  - name: a\n  - name: a\n")
    with pytest.raises(SystemExit, match="distinct name"):
        study.load_spec(path)
    path.write_text("name: s\nconfig: configs/smoke.yaml\nruns: []\n")
    with pytest.raises(SystemExit, match="budget_s"):
        study.load_spec(path)


def _fake_run(folder: Path, custom_curve: list[float]) -> None:
    folder.mkdir(parents=True)
    acc = lambda x: {"correct": int(100 * x), "total": 100, "accuracy": x}  # noqa: E731
    results = {"steps": 10 * len(custom_curve), "train_seconds": 99.5, "reward_curve": [0.1, 0.5],
               "before": {"custom": acc(0.0), "standard": acc(0.1), "overall": acc(0.05)},
               "after": {"custom": acc(custom_curve[-1]), "standard": acc(0.8), "overall": acc(0.6),
                         "by_symbol": {"θ": {"accuracy": 0.9}, "+": {"accuracy": 0.8}}}}
    (folder / "results.json").write_text(json.dumps(results))
    rows = []
    for i in range(10 * len(custom_curve)):
        row = {"step": i, "time/train_seconds": float(i), "groups/zero_variance_fraction": 1.0 if i < 3 else 0.5}
        if (i + 1) % 10 == 0:
            row.update({"eval/custom": custom_curve[i // 10], "eval/standard": 0.8,
                        "eval/symbol/θ": custom_curve[i // 10]})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluated = [{"category": "custom", "api_correct": False}, {"category": "standard", "api_correct": True},
                 {"category": "standard", "api_correct": False}]
    (folder / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluated))


def test_report_tables_curves_and_when_a_symbol_was_learned(tmp_path):
    spec = {"name": "s", "budget_s": 100, "about": "A test.",
            "runs": [{"name": "a", "about": "first", "set": ["x.y=1"]}, {"name": "missing"}]}
    _fake_run(tmp_path / "a", [0.2, 0.85, 0.9])
    rows = study.report(spec, Path("spec.yaml"), tmp_path)
    assert [r["name"] for r in rows] == ["a"]  # a run without results is left out
    row = rows[0]
    assert row["stalled_steps"] == 3 and row["learned_at_step"] == {"θ": 20}
    assert [p["step"] for p in row["eval_curve"]] == [10, 20, 30]
    assert row["accuracy"]["after"]["custom"] == 0.9
    md = (tmp_path / "study.md").read_text()
    assert row["flat_groups_first_5"] == 0.8  # 1, 1, 1, 0.5, 0.5
    assert "| `a` | 30 | 100 | 90% | 80% | 60% | 80% | 3 | 90% | 80% |" in md
    assert row["upstream_accuracy"] == {"custom": 0.0, "standard": 0.5}
    assert "upstream alone on the same items: custom 0%, standard 50%" in md
    assert "θ at step 20" in md and "python scripts/study.py spec.yaml" in md
    assert json.loads((tmp_path / "study.json").read_text())["runs"][0]["name"] == "a"
