"""scripts/bench_grpo_step.py: its wiring, and smoke runs on a tiny random Llama (the embedded
model's tokenizer and chat template). Timings are written, never asserted."""

from __future__ import annotations

import json

import pytest

from scripts import bench_grpo_step as bench

from tests.tiny import build_chat_llama

SMALLEST = ["--steps", "1", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "2",
            "--threads", "1", "--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_chat_llama(tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.1)


def test_a_side_gets_the_parent_settings_back(tmp_path):
    s = bench.Settings(model="/m", steps=2, temperature=0.7, response_prefix="\\boxed{",
                       filter_zero_variance=True)
    argv = bench.side_argv(s, "ours", tmp_path / "r.json")
    args = bench.build_parser().parse_args(argv[3:])  # drop python -m module
    assert bench.Settings(**{f.name: getattr(args, f.name) for f in bench.fields(bench.Settings)}) == s
    assert (args.side, args.result) == ("ours", tmp_path / "r.json")


def test_task_rows_give_the_truth_to_even_rows_and_a_wrong_answer_to_odd_ones():
    rows = bench.task_rows(6, seed=0)
    assert len(rows) == 6
    assert [r["api"] - r["truth"] for r in rows] == [0, 1, 0, 1, 0, 1]


def test_summary_pools_the_rounds_timed_steps_and_takes_the_highest_peak():
    def run(warm, timed, peak):
        steps = [{"seconds": s, "generation_seconds": s / 2} for s in (warm, *timed)]
        return {"steps": steps, "peak_rss_mib": peak}

    summary = bench.summarise([run(100.0, [1.0, 2.0], 10.0), run(100.0, [6.0], 30.0)])
    assert summary == {"median_s": 2.0, "mean_s": 3.0, "generation_median_s": 1.0,
                       "peak_rss_mib": 30.0}


@pytest.mark.slow
def test_ours_only_writes_a_report(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_model), *SMALLEST, "--ours-only", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    [ours] = report["sides"]["ours"]  # one round
    assert len(ours["steps"]) == 2 and ours["policy_version"] == 2  # warm-up + 1 timed, both applied
    assert all(st["seconds"] > 0 and "learn" in st["phases"] for st in ours["steps"])
    assert ours["threads"] == 1 and ours["prompt_tokens"][0] > 100
    assert set(report["summary"]["ours"]) == {"median_s", "mean_s", "generation_median_s", "peak_rss_mib"}
    assert report["ratio_ours_over_trl"] is None and "trl" not in report["sides"]
    assert report["settings"]["group_size"] == 2 and report["versions"]["torch"]
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_before"]) == 3
    assert "ours" in capsys.readouterr().out


@pytest.mark.slow
def test_both_sides_give_a_ratio(tiny_model, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_model), *SMALLEST, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    [trl] = report["sides"]["trl"]
    assert len(trl["steps"]) == 2 and all("generation_seconds" in st for st in trl["steps"])
    assert trl["prompt_tokens"] == report["sides"]["ours"][0]["prompt_tokens"]  # the same prompts
    assert trl["prompt_ids_match"]  # ... tokenized by TRL to the ids our engine samples from
    assert set(report["ratio_ours_over_trl"]) == set(report["summary"]["trl"])
