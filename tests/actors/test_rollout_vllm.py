"""The vLLM engine's own pieces that need no running engine: log-prob modes, LoRA ranks, adapter
folders on tmpfs, the PEFT tensors it serves. Its behaviour as an engine is the contract suite's
(tests/actors/test_engine_contract.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from actors import rollout_vllm
from actors.lora_tensors import (check_lora_tensors, peft_config, portable_base_name, read_adapter,
                                 set_portable_base, write_peft_adapter)
from rl.interfaces import vllm_logprobs_mode

NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")


@pytest.mark.parametrize("temperature, top_k, top_p, mode", [
    (0.8, 0, 1.0, "processed_logprobs"), (0.0, 20, 0.9, "processed_logprobs"),
    (1.0, 20, 1.0, "raw_logprobs"), (1.0, 0, 0.95, "raw_logprobs"), (1.0, 0, 1.0, "processed_logprobs")])
def test_logprobs_mode_is_the_one_that_equals_the_learners(temperature, top_k, top_p, mode):
    assert vllm_logprobs_mode(temperature, top_k, top_p) == mode


def test_a_filter_at_another_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature 0.7"):
        vllm_logprobs_mode(0.7, top_k=20)


def test_lora_rank_rounds_up_to_a_rank_vllm_takes_and_names_the_key_beyond():
    assert [rollout_vllm._vllm_lora_rank(r) for r in (1, 2, 8, 9, 33, 512)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ValueError, match="lora.rank 600"):
        rollout_vllm._vllm_lora_rank(600)


@NEEDS_VLLM
def test_an_engine_with_a_rank_vllm_cannot_serve_stops_at_start_up():
    with pytest.raises(ValueError, match="lora.rank 600 exceeds"):
        rollout_vllm.VLLMRolloutEngine("embedded", lora_rank=600, lora_alpha=16, target_modules=["q_proj"])


def test_adapter_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = rollout_vllm.ADAPTER_FOLDER_PREFIX
    stale, live, other = (tmp_path / f"{prefix}{dead.pid}-x", tmp_path / f"{prefix}{os.getppid()}-y",
                          tmp_path / "someone-else")
    for folder in (stale, live, other):
        (folder / "lora-1").mkdir(parents=True)
    mine = rollout_vllm._adapter_folder(str(tmp_path))
    assert mine.name.startswith(f"{prefix}{os.getpid()}-") and mine.parent == tmp_path
    assert not stale.exists() and live.exists() and other.exists()


def test_peft_folder_round_trip_and_portable_base(tmp_path):
    config = peft_config(8, 16, ["v_proj", "q_proj"], base_model="/home/me/.cache/x")
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 8
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(8, 4)}
    folder = write_peft_adapter(tmp_path / "a", tensors, config)
    assert torch.equal(read_adapter(folder)["base_model.model.layers.0.q_proj.lora_A.weight"],
                       tensors["base_model.model.layers.0.q_proj.lora_A.weight"])
    from actors.models import EMBEDDED_MODEL

    set_portable_base(folder, EMBEDDED_MODEL)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_tensors_that_do_not_match_the_adapter_are_named():
    shapes = {"a.lora_A.weight": (8, 4), "a.lora_B.weight": (4, 8)}
    with pytest.raises(KeyError, match="missing .*a.lora_B.weight"):
        check_lora_tensors(shapes, {"a.lora_A.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="shape mismatch for \\['a.lora_B.weight'\\]"):
        check_lora_tensors(shapes, {"a.lora_A.weight": torch.zeros(8, 4), "a.lora_B.weight": torch.zeros(8, 4)})
