"""The training entry end to end on the real parts: the embedded model as upstream and as
the adapter's base, the HF engine, the DeepSpeed + PEFT learner, the answer cache."""

import json

import pytest

from scripts import train


@pytest.mark.slow
def test_smoke_config_trains_checkpoints_and_reports(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--config", "configs/smoke.yaml", "--set", f"logging.run_dir={run}", "--set", "cluster.mode=in_process",
            "--set", "eval.every_steps=1"]
    assert train.main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and len(results["reward_curve"]) == 2
    assert results["before"]["overall"]["total"] == results["after"]["overall"]["total"] == 8
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all("timing/rollout" in m and "sample" in m for m in metrics)
    assert all(0.0 <= m["eval/overall"] <= 1.0 and "eval/custom" in m for m in metrics)  # periodic eval
    checkpoint = run / "checkpoints" / "step_000002"
    assert (checkpoint / "adapter" / "adapter_config.json").exists() and (checkpoint / "meta.json").exists()
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists() and (checkpoint / "learner_state.pt").exists()
    assert (run / "config.yaml").exists() and (run / "upstream_cache.sqlite").exists()
    # a rerun on the same answer cache pays for no upstream answer twice; a run that its time budget
    # ends between scheduled checkpoints still saves its last step
    capsys.readouterr()
    rerun = tmp_path / "rerun"
    assert train.main(argv + ["--set", "algorithm.steps=3", "--set", "eval.at_start=false",
                              "--set", "algorithm.max_train_seconds=0.001", "--set", "checkpoint.every_steps=0",
                              "--set", f"logging.run_dir={rerun}",
                              "--set", f"upstream.cache_path={run / 'upstream_cache.sqlite'}"]) == 0
    out = capsys.readouterr().out
    assert "upstream: 40 answers (40 from the cache)" in out and "time budget reached after step 0" in out
    assert json.loads((rerun / "results.json").read_text())["steps"] == 1
    assert (rerun / "checkpoints" / "step_000001" / "adapter" / "adapter_config.json").exists()


def test_max_requests_stops_the_run_before_the_limit_and_keeps_the_answers(tmp_path, capsys):
    from actors.upstream import AnswerCache

    run = tmp_path / "run"
    argv = ["--config", "configs/smoke.yaml", "--set", f"logging.run_dir={run}", "--set", "cluster.mode=in_process",
            "--set", "upstream.max_requests=5"]
    assert train.main(argv) == 3
    err = capsys.readouterr().err
    assert "error: upstream.max_requests 5 reached: 5 calls made; 3" in err  # 33-35 of 40 (duplicates share)
    assert "request(s) left unanswered" in err
    with AnswerCache(run / "upstream_cache.sqlite") as cache:
        assert cache.counts()["answered"] == 5
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm:\n  stepz: 3\n")
    assert train.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:2" in err and "algorithm.stepz" in err and "steps" in err


def test_sft_stage_knobs_of_the_sft_command_are_refused_here(tmp_path, capsys):
    argv = ["--config", "configs/smoke.yaml", "--set", f"logging.run_dir={tmp_path}", "--set", "sft.distill_rounds=2"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "sft.distill_rounds=2" in err and "api-adapter sft" in err
    assert not (tmp_path / "config.yaml").exists()  # refused before anything ran


@pytest.mark.slow
def test_format_warm_start_teaches_the_rewrite_format_on_the_embedded_model(tmp_path):
    """The SFT stage on standard-symbol items only: its loss falls, the base model (which writes
    no box at all in the rewrite format) answers in the format afterwards, the adapter is saved
    for later stages, and GRPO continues from it."""
    run = tmp_path / "run"
    argv = ["--config", "configs/smoke.yaml", "--set", f"logging.run_dir={run}", "--set", "cluster.mode=in_process",
            "--set", "data.answer_format=rewrite", "--set", "rollout.response_prefix=null",
            "--set", "rollout.max_new_tokens=24", "--set", "eval.max_new_tokens=24", "--set", "sft.steps=6",
            "--set", "sft.batch_size=8", "--set", "algorithm.steps=1", "--set", "checkpoint.every_steps=0"]
    assert train.main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    sft = results["sft"]
    assert sft["steps"] == 6 and sft["loss_last"] < sft["loss_first"] / 3
    boxed = lambda stage: results[stage]["verdicts"]["overall"]  # noqa: E731
    assert boxed("before")["none"]["n"] == 8  # no box before
    assert boxed("after_sft")["none"]["n"] <= 2  # the format is learned
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert results["steps"] == 1 and json.loads((run / "metrics.jsonl").read_text())["policy_version"] >= 6


def test_vllm_engine_without_vllm_stops_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    run = tmp_path / "run"
    argv = ["--config", "configs/smoke.yaml", "--set", "rollout.engine=vllm", "--set", f"logging.run_dir={run}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "rollout.engine vllm" in err and "scripts/install.sh" in err and ".[gpu]" in err
    assert not run.exists()  # no upstream answer, no model load, no run folder

