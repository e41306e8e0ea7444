"""actors/learner.py on a tiny random Llama (saved to a temporary folder), DeepSpeed on CPU/gloo.

Covers: the step trains the LoRA tensors only and advances the policy version; micro-batching by
token budget gives the gradient and loss of one big batch (every aggregation mode, shared-prefix
and plain); a NaN skips the step without touching weights or optimizer state (ZeRO 0, 1, 2);
save -> PeftModel.from_pretrained gives identical logits; the reference (adapter disabled) is the
base model; a few steps on hand-made groups raise the rewarded token's probability.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from actors.learner import Learner
from actors.lr_schedule import lr_factor
from actors.models import load_causal_lm
from actors.shared_prefix import RowBatch, pack_micro_batches, plain_logits, split_group
from rl.grpo import token_logprobs
from rl.records import TrainGroup
from rl.sft import merge_on_shared_head

PAD = 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_learner(path, **kw):
    args = dict(lora_rank=4, lora_alpha=8, lr=1e-2, weight_decay=0.0, warmup_steps=0,
                total_steps=100, lr_schedule="constant", max_grad_norm=1.0, tis_cap=None, seed=0)
    args.update(kw)
    return Learner(path, **args)


def group(prompt, completions, advantages, **kw):
    return TrainGroup(prompt_ids=list(prompt), completions=[list(c) for c in completions],
                      advantages=list(advantages),
                      rollout_logprobs=kw.get("rollout") or [[-1.0] * len(c) for c in completions],
                      truncated=kw.get("truncated") or [False] * len(completions),
                      policy_version=0)


def groups_ab():
    return [group(range(5, 17), [[20, 21, 22], [23], [24, 25, 26, 27, 28], [29, 30]],
                  [1.0, -1.0, 0.5, -0.5], truncated=[False, False, True, False]),
            group(range(40, 46), [[50], [51, 52, 53], [54, 55]], [0.7, -0.2, -0.5])]


def snapshot(learner):
    return {n: p.detach().clone() for n, p in learner.module.named_parameters()}


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_lr_factor_schedules():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "linear") == 1.0 and lr_factor(10, 2, 10, "linear") == 0.0
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not one of"):
        lr_factor(0, 0, 1, "step")


def test_packing_respects_the_budget_and_keeps_every_row_in_order():
    g1, g2 = groups_ab()
    assert len(pack_micro_batches([g1, g2], 10_000)) == 1
    # g1 alone costs 12 + 4 * 4 = 28 tokens with a shared prefix; a budget of 20 splits it.
    units = split_group(g1, 20, shared_prefix=True)
    assert [len(u.completions) for u in units] == [2, 2]
    batches = pack_micro_batches([g1, g2], 20)
    rows = [c for b in batches for u in b for c in u.completions]
    assert rows == [tuple(c) for c in g1.completions + g2.completions]
    assert len(batches) == 3
    # one row over the budget still goes alone rather than vanishing
    assert [len(u.completions) for u in split_group(g1, 1, True)] == [1, 1, 1, 1]


# --------------------------------------------------------------------------------------------
# The step


def test_step_trains_lora_only_and_advances_the_version(tiny_model):
    learner = make_learner(tiny_model)
    before = snapshot(learner)
    stats = learner.train_step(groups_ab())
    assert not stats.skipped and learner.policy_version == 1 and stats.skipped_total == 0
    assert stats.tokens == 17 and stats.micro_batches == 1 and stats.grad_norm > 0
    assert math.isfinite(stats.loss) and stats.entropy > 0 and stats.lr == pytest.approx(1e-2)
    after = snapshot(learner)
    lora = {n for n in before if "lora_" in n}
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in lora)
    exported = learner.export_adapter()
    assert set(exported) == set(get_peft_model_state_dict(learner.module))
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in exported.values())


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "plain"])
def test_micro_batching_gives_the_one_batch_gradient(tiny_model, agg, shared):
    kw = dict(loss_aggregation=agg, constant_normaliser=6, mask_truncated=True,
              shared_prefix=shared, tis_cap=2.0, kl_coef=0.1, lora_dropout=0.0)
    big, small = make_learner(tiny_model, **kw), make_learner(tiny_model, **kw)
    big.train_step(groups_ab())  # a nonzero adapter, so that the KL term has a gradient
    small.train_step(groups_ab())
    small.micro_batch_tokens = 12
    a, b = big.backward_batch(groups_ab()), small.backward_batch(groups_ab())
    assert a.micro_batches == 1 and b.micro_batches >= 4
    assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-7) and a.tokens == b.tokens == 12
    ga, gb = big.gradients(), small.gradients()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("budget", [10_000, 12], ids=["nan_first", "nan_after_a_backward"])
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_nan_skips_the_step_and_leaves_weights_and_optimizer_alone(tiny_model, zero_stage, budget):
    learner = make_learner(tiny_model, zero_stage=zero_stage, micro_batch_tokens=budget)
    fresh = make_learner(tiny_model, zero_stage=zero_stage)
    before = snapshot(learner)
    bad = groups_ab()
    bad[1] = group(range(40, 46), [[50], [51, 52, 53]], [float("nan"), 1.0])
    stats = learner.train_step(bad)
    assert stats.skipped and stats.skipped_total == 1 and learner.policy_version == 0
    assert math.isnan(stats.loss)
    assert all(torch.equal(before[n], p) for n, p in learner.module.named_parameters())
    # the next good step is exactly the step of a learner that never saw the bad batch
    learner.micro_batch_tokens = 10_000
    assert not learner.train_step(groups_ab()).skipped and learner.policy_version == 1
    fresh.train_step(groups_ab())
    for (n, p), q in zip(learner.module.named_parameters(), fresh.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nan_gradient_with_a_finite_loss_is_caught(tiny_model, zero_stage):
    learner = make_learner(tiny_model, zero_stage=zero_stage)
    before = snapshot(learner)
    p = learner.params[0]
    handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    stats = learner.train_step(groups_ab())
    handle.remove()
    assert stats.skipped and math.isfinite(stats.loss) and math.isnan(stats.grad_norm)
    assert all(torch.equal(before[n], q) for n, q in learner.module.named_parameters())


def test_save_load_gives_identical_logits_in_transformers_and_peft(tiny_model, tmp_path):
    learner = make_learner(tiny_model)
    for _ in range(2):
        learner.train_step(groups_ab())
    out = learner.save_adapter(tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    ids = torch.tensor([[5, 6, 7, 8, 9, 20, 21]])
    learner.module.eval()
    with torch.no_grad():
        expected = learner.module(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_causal_lm(tiny_model), out).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    other = make_learner(tiny_model, seed=1)
    other.load_adapter(out)
    exported, ours = other.export_adapter(), learner.export_adapter()
    assert all(torch.equal(exported[k], ours[k]) for k in ours)
    # and the loaded weights are the ones the optimizer steps from
    other.train_step(groups_ab())
    assert other.policy_version == 1
    with pytest.raises(ValueError, match="do not match"):
        make_learner(tiny_model, lora_rank=8, init_adapter=str(out))
    resumed = make_learner(tiny_model, init_adapter=str(out))
    assert all(torch.equal(resumed.export_adapter()[k], ours[k]) for k in ours)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_stages_load_and_step_like_stage_0(tiny_model, tmp_path, zero_stage):
    source = make_learner(tiny_model, seed=3)
    source.train_step(groups_ab())
    path = source.save_adapter(tmp_path / "a")
    plain, zero = make_learner(tiny_model), make_learner(tiny_model, zero_stage=zero_stage)
    for learner in (plain, zero):
        learner.load_adapter(path)  # ZeRO keeps float32 copies: they must follow the load
        assert not learner.train_step(groups_ab()).skipped
    a, b = plain.export_adapter(), zero.export_adapter()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_reference_is_the_base_model(tiny_model):
    learner = make_learner(tiny_model)
    learner.train_step(groups_ab())
    batch = RowBatch.build([list(range(5, 17))], [0, 0], [[20, 21, 22], [23, 24]])
    tokens, _ = batch.completion_tokens("cpu", PAD)
    ref = learner.reference_logprobs(batch, tokens)
    with torch.no_grad():
        base = token_logprobs(plain_logits(load_causal_lm(tiny_model), batch, PAD), tokens)
        policy = token_logprobs(plain_logits(learner.module, batch, PAD), tokens)
    torch.testing.assert_close(ref, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-4)  # the adapter is not zero any more
    stats = learner.train_step(groups_ab())
    assert stats.kl == 0.0  # kl_coef 0: no reference pass, no KL reported


def test_bfloat16_base_keeps_float32_lora(tiny_model):
    learner = make_learner(tiny_model, precision="bfloat16")
    dtypes = {n: p.dtype for n, p in learner.module.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    assert not learner.train_step(groups_ab()).skipped


def test_bad_arguments_are_errors(tiny_model):
    with pytest.raises(ValueError, match="zero_stage"):
        make_learner(tiny_model, zero_stage=3)
    with pytest.raises(ValueError, match="constant_normaliser"):
        make_learner(tiny_model, loss_aggregation="constant")
    with pytest.raises(ValueError, match="loss_aggregation"):
        make_learner(tiny_model, loss_aggregation="mean")


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model):
    plain = make_learner(tiny_model, shared_prefix=False)
    ckpt = make_learner(tiny_model, gradient_checkpointing=True)
    assert not ckpt.shared_prefix
    plain.backward_batch(groups_ab())
    ckpt.backward_batch(groups_ab())
    ga, gb = plain.gradients(), ckpt.gradients()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-8)


def test_a_few_steps_raise_the_rewarded_tokens_probability(tiny_model):
    learner = make_learner(tiny_model, lr=2e-2, kl_coef=0.01, tis_cap=2.0)
    prompt, target, others = list(range(5, 15)), 42, [43, 44, 45, 46, 47, 48, 49]
    batch = RowBatch.build([prompt], [0], [[target]])
    tokens, _ = batch.completion_tokens("cpu", PAD)

    def p_target():
        return float(token_logprobs(plain_logits(learner.module, batch, PAD), tokens).exp())

    completions = [[target]] + [[o] for o in others]
    advantages = [7 / 8 * 2.6] + [-1 / 8 * 2.6] * 7  # one success in eight, std-scaled
    with torch.no_grad():
        start = p_target()
    stats = [learner.train_step([group(prompt, completions, advantages)]) for _ in range(5)]
    with torch.no_grad():
        end = p_target()
    assert end > 2 * start, (start, end)
    assert stats[0].kl == pytest.approx(0.0, abs=1e-6) and stats[-1].kl > 0
    assert learner.policy_version == 5


# --------------------------------------------------------------------------------------------
# actors/distributed.py


def test_extensions_dir_defaults_into_the_environment(monkeypatch):
    import sys
    from pathlib import Path

    from actors import distributed

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert distributed.torch_extensions_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert str(distributed.torch_extensions_dir()) == "/somewhere/else"


def test_single_process_env_keeps_a_launchers_values(monkeypatch):
    from actors import distributed

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    added = distributed.set_single_process_env()
    assert "MASTER_PORT" not in added and added["WORLD_SIZE"] == "1"


def test_one_process_group_builds_no_op(tiny_model):
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops

    make_learner(tiny_model)  # the process group exists from here on
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert ds_comm.cdb.shm_comm_op is None


def test_stale_locks_are_found(tmp_path):
    from actors.distributed import stale_extension_locks

    (tmp_path / "op_a").mkdir()
    (tmp_path / "op_a" / "lock").write_text("")
    (tmp_path / "op_b").mkdir()
    (tmp_path / "op_b" / "lock").write_text("")
    (tmp_path / "op_b" / "op_b.so").write_text("")
    assert stale_extension_locks(tmp_path) == [tmp_path / "op_a" / "lock"]


def test_a_chosen_port_does_not_leak_to_later_processes(tiny_model, monkeypatch):
    """The port the learner chose is bound by its process group: it must not stay in this
    process's environment, where a Ray cluster or subprocess started later would inherit it."""
    import os

    monkeypatch.delenv("MASTER_PORT", raising=False)
    make_learner(tiny_model)
    assert "MASTER_PORT" not in os.environ


def test_sft_objective_is_the_mean_token_nll_and_steps_at_the_sft_lr(tiny_model):
    """objective="sft": the loss is the mean negative log-likelihood of the completion tokens
    (advantages ignored), its gradient that of the plain NLL; the first sft_steps steps run at
    sft_lr, then GRPO's schedule starts from its own step 0 (warm-up included)."""
    learner = make_learner(tiny_model, lr=1e-2, sft_steps=2, sft_lr=1e-3, warmup_steps=2,
                           lr_schedule="linear", total_steps=10)
    batch = [group(range(5, 17), [[20, 21, 22]], [123.0]), group(range(40, 46), [[50, 51]], [-9.0])]
    acc = learner.backward_batch(batch, "sft")
    grads = {n: g.clone() for n, g in learner.gradients().items()}
    learner.engine.zero_grad()
    nll, count = 0.0, 0
    for g in batch:
        logits = plain_logits(learner.module, RowBatch.build([g.prompt_ids], [0], g.completions), PAD)
        logp = token_logprobs(logits, torch.tensor(g.completions), 1.0)
        nll, count = nll - logp.sum(), count + logp.numel()
    (nll / count).backward()
    assert acc.loss == pytest.approx(float(nll / count), rel=1e-5) and acc.tokens == 5
    for name, grad in learner.gradients().items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name
    learner.engine.zero_grad()
    # Merged on their shared head (rl.sft), examples give the same loss and gradient.
    sharing = [group(range(5, 17), [[20, 21, 22]], [0.0]), group(range(5, 14), [[30]], [0.0]),
               group([*range(5, 10), 60, 61], [[31, 32]], [0.0])]
    apart = learner.backward_batch(sharing, "sft")
    apart_grads = {n: g.clone() for n, g in learner.gradients().items()}
    learner.engine.zero_grad()
    assert len(merge_on_shared_head(sharing)) == 1
    merged = learner.backward_batch(merge_on_shared_head(sharing), "sft")
    assert merged.tokens == apart.tokens == 6 and merged.loss == pytest.approx(apart.loss, rel=1e-5)
    for name, grad in learner.gradients().items():
        assert torch.allclose(grad, apart_grads[name], atol=1e-6), name
    learner.engine.zero_grad()
    lrs = [learner.train_step(batch, "sft").lr for _ in range(2)]
    lrs += [learner.train_step(groups_ab()).lr for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 1e-3, 0.0, 5e-3, 1e-2])
    with pytest.raises(ValueError, match="objective"):
        learner.train_step(batch, "dpo")
