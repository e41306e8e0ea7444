"""actors/shared_prefix.py: the shared-prompt pass equals the plain per-sequence computation.

A tiny random Llama with a LoRA adapter whose B matrices are random (so the adapter matters and
every LoRA tensor gets a gradient). The reference is the most literal computation possible: each
prompt + completion run alone, the completion's logits sliced out by hand. Both attention
implementations run: the left-padded prompts give padding rows that attend to nothing, which
eager and SDPA treat differently (neither may leak into the logits or gradients).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from actors.shared_prefix import (
    RowBatch, completion_logits, expand_cache, plain_logits, shared_prefix_logits,
)
from rl.grpo import token_logprobs

PAD = 0


def tiny_lora_model(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, tie_word_embeddings=True, attn_implementation=attn)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    peft = get_peft_model(model, lora)
    peft.train()
    return peft


def reference_logprobs(model, batch: RowBatch) -> list[torch.Tensor]:
    """One forward per row: log-probs of that completion's tokens, [C_i] each."""
    out = []
    for p, c in zip(batch.row_prompt, batch.completions):
        prompt = list(batch.prompts[p])
        ids = torch.tensor([prompt + list(c)])
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : len(prompt) + len(c) - 1]
        out.append(token_logprobs(logits, torch.tensor([list(c)]))[0])
    return out


def batched_logprobs(model, batch: RowBatch, shared: bool) -> list[torch.Tensor]:
    logits = completion_logits(model, batch, PAD, shared_prefix=shared)
    tokens, lengths = batch.completion_tokens("cpu", PAD)
    lp = token_logprobs(logits, tokens)
    return [lp[i, : int(n)] for i, n in enumerate(lengths)]


def lora_grads(model, logprobs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    # A weighted sum so that every row and token matters differently.
    loss = sum((i + 1) * lp.mul(torch.linspace(1, 2, len(lp))).sum()
               for i, lp in enumerate(logprobs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return grads


BATCHES = {
    # one group, varied completion lengths (1 token included): padding in the continuation
    "one_group": RowBatch.build([[5, 6, 7, 8, 9, 10, 11]], [0, 0, 0, 0],
                                [[12, 13, 14], [15], [16, 17, 18, 19, 20], [21, 22]]),
    # two groups of different prompt lengths: right-padded prompts inside the cache
    "two_groups": RowBatch.build([[3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31, 32]], [0, 0, 1, 1, 1],
                                 [[40, 41], [42, 43, 44, 45], [46], [47, 48, 49], [50, 51]]),
    # every completion a single token: no continuation forward at all
    "single_tokens": RowBatch.build([[60, 61, 62]], [0, 0, 0], [[63], [64], [65]]),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(BATCHES))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "plain_batched"])
def test_logprobs_and_grads_match_per_sequence(name, shared, attn):
    model = tiny_lora_model(attn=attn)
    batch = BATCHES[name]
    ref = reference_logprobs(model, batch)
    got = batched_logprobs(model, batch, shared)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5)
    ref_grads = lora_grads(model, reference_logprobs(model, batch))
    got_grads = lora_grads(model, batched_logprobs(model, batch, shared))
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * 7 * 2
    for n in ref_grads:
        rel = (got_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp(min=1e-12)
        assert rel < 1e-4, (n, float(rel))


def test_shared_and_plain_agree_under_no_grad_and_adapter_disabled():
    model = tiny_lora_model()
    batch = BATCHES["two_groups"]
    with torch.no_grad(), model.disable_adapter():
        a = shared_prefix_logits(model, batch, PAD)
        b = plain_logits(model, batch, PAD)
    tokens, lengths = batch.completion_tokens("cpu", PAD)
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(token_logprobs(a, tokens)[mask], token_logprobs(b, tokens)[mask],
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shared, expected", [(True, [(2, 1), (5, 3)]), (False, [(5, 4)])],
                         ids=["shared", "plain_batched"])
def test_only_the_scored_positions_reach_the_lm_head(shared, expected):
    model = tiny_lora_model()
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        completion_logits(model, BATCHES["two_groups"], PAD, shared_prefix=shared)
    finally:
        hook.remove()
    assert seen == expected  # [rows, positions]: prompts' last tokens, then the continuations


def test_expand_cache_is_a_view_and_leaves_the_prompt_cache_alone():
    model = tiny_lora_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    keys_before = [layer.keys for layer in cache.layers]
    grown = expand_cache(cache, 3)
    assert all(layer.keys.shape[0] == 3 for layer in grown.layers)
    assert all(g.keys.data_ptr() == k.data_ptr() for g, k in zip(grown.layers, keys_before))
    assert all(layer.keys.requires_grad for layer in grown.layers)
    # a continuation forward appends to the expanded cache only
    model(input_ids=torch.tensor([[9], [10], [11]]), past_key_values=grown, use_cache=True)
    assert grown.get_seq_length() == 5 and cache.get_seq_length() == 4
    assert all(layer.keys is k for layer, k in zip(cache.layers, keys_before))


def test_row_batch_validation():
    with pytest.raises(ValueError, match="at least one token"):
        RowBatch.build([[1, 2]], [0], [[]])
    with pytest.raises(ValueError, match="out of range"):
        RowBatch.build([[1, 2]], [1], [[3]])
