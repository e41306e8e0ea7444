"""Learner.save_state / load_state: a fresh learner that loads a saved state takes the same next
step as the learner that saved it (ZeRO 0 and 2), with the LR-schedule position, counters and
torch RNG (LoRA dropout on) restored; a mismatched configuration is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors.learner import Learner
from rl.records import TrainGroup


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-state")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_learner(path, **kw):
    # warm-up + linear decay: the LR-schedule position matters; dropout: the torch RNG matters.
    args = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2, weight_decay=0.01,
                warmup_steps=4, total_steps=10, lr_schedule="linear", mask_truncated=True,
                tis_cap=None, seed=0)
    args.update(kw)
    return Learner(path, **args)


def groups(offset=0):
    return [TrainGroup(prompt_ids=list(range(5 + offset, 15 + offset)),
                       completions=[[20, 21, 22], [23], [24, 25]], advantages=[1.0, -1.0, 0.3],
                       rollout_logprobs=[[-1.0] * 3, [-1.0], [-1.0] * 2],
                       truncated=[False] * 3, policy_version=0)]


def nothing_to_train():
    """Every completion truncated under mask_truncated: no token, a skipped step."""
    return [TrainGroup(prompt_ids=[5, 6], completions=[[7], [8]], advantages=[1.0, -1.0],
                       rollout_logprobs=[[-1.0], [-1.0]], truncated=[True, True], policy_version=0)]


def lora(learner):
    return learner.export_adapter()


@pytest.mark.parametrize("stage", [0, 2])  # 1 and 2: the same DeepSpeed ZeRO optimizer
def test_a_loaded_state_takes_the_same_next_step(tiny_model, tmp_path, stage):
    a = make_learner(tiny_model, zero_stage=stage)
    a.train_step(groups())
    assert a.train_step(nothing_to_train()).skipped
    a.train_step(groups(3))
    a.save_state(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    step_a = a.train_step(groups(1))  # draws dropout masks from the saved RNG state

    b = make_learner(tiny_model, zero_stage=stage)  # reseeds the torch RNG
    b.load_state(tmp_path)
    assert (b.policy_version, b.skipped_total) == (2, 1)
    assert b.engine.global_steps == a.engine.global_steps - 1
    step_b = b.train_step(groups(1))
    assert step_b.lr == pytest.approx(step_a.lr) and step_b.lr == pytest.approx(5e-3)
    assert step_b.loss == pytest.approx(step_a.loss, abs=1e-6)
    expected, got = lora(a), lora(b)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7)
    assert (b.policy_version, b.skipped_total) == (a.policy_version, a.skipped_total) == (3, 1)


def test_a_state_from_another_configuration_is_refused(tiny_model, tmp_path):
    make_learner(tiny_model).save_state(tmp_path)
    other = make_learner(tiny_model, lr=2e-2, zero_stage=1)
    with pytest.raises(ValueError, match="zero_stage: 0 vs 1.*base_lrs"):
        other.load_state(tmp_path)
