"""actors/rollout_hf.py: the decode loop against transformers' generate and a teacher-forced pass.

A tiny random Llama (2 layers, hidden 64) with the embedded model's real tokenizer is saved once
per module into a temporary folder; the engine loads it like any model folder. The embedded
model itself appears in one slow test (timings printed with -s, never asserted).
"""

from __future__ import annotations

import time

import pytest
import torch

from actors.models import load_causal_lm
from rl.interfaces import RolloutEngine
from actors.rollout_hf import HFRolloutEngine, _eos_ids, filter_top_k_top_p
from rl.records import Prompt, SamplingParams

from tests.tiny import build_chat_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are microseconds; on a busy 2-core machine two OpenMP threads
    waiting on each other made them ~40x slower (800 us vs 20 us for an [8, 64] x [64, 64])."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_chat_llama(tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.1)


@pytest.fixture(scope="module")
def engine(tiny_path):
    return HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS, seed=0)


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["What is 2 + 2?", "Expression: 12 θ 7 | API answer: none →",
             "Say something long enough to make this prompt clearly longer than the others."]
    tok = engine.tokenizer
    return [Prompt(tok(t, add_special_tokens=False)["input_ids"], t) for t in texts]


def _hf_generate(model, prompts, max_new, pad_id):
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p.token_ids)) + p.token_ids for p in prompts])
    mask = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad_id)
    return out[:, width:].tolist()


def _tokens(completions):
    return [c.token_ids for c in completions]


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_greedy_matches_hf_generate(engine, prompts, tiny_path):
    # min_new_tokens keeps generate from stopping at EOS; the random model rarely emits it.
    base = load_causal_lm(tiny_path)
    expected = _hf_generate(base, prompts, GREEDY.max_new_tokens, engine.pad_id)
    got = engine.generate(prompts, 1, GREEDY)
    assert [c.prompt_index for c in got] == [0, 1, 2]
    assert _tokens(got) == expected
    assert all(c.finish_reason == "length" and c.policy_version == 0 for c in got)
    assert [c.text for c in got] == [engine.tokenizer.decode(t) for t in expected]
    # Chunking (one group per chunk) and duplicate prompts change nothing.
    engine.max_batch_tokens = 1
    try:
        again = engine.generate(prompts + [prompts[0]], 2, GREEDY)
    finally:
        engine.max_batch_tokens = 32768
    assert _tokens(again) == [t for t in expected + [expected[0]] for _ in range(2)]


def test_logprobs_match_teacher_forcing(engine, prompts):
    for sp in (SamplingParams(max_new_tokens=6, temperature=0.7, seed=1),
               SamplingParams(max_new_tokens=6, temperature=1.3, top_k=20, top_p=0.9, seed=2)):
        got = engine.generate(prompts, 3, sp)
        assert len(got) == 9 and [(c.prompt_index, c.sample_index) for c in got][:4] == [
            (0, 0), (0, 1), (0, 2), (1, 0)]
        for c in got:
            p = prompts[c.prompt_index].token_ids
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([p + c.token_ids])).logits[0]
            logp = torch.log_softmax(logits.float() / sp.temperature, dim=-1)
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(c.token_ids))
            ref = logp[positions, torch.tensor(c.token_ids)]
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4), (c.logprobs, ref)


def test_prefix_reuse_same_as_none(engine, prompts):
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    reuse = [engine.generate(prompts, 4, sp) for sp in (GREEDY, sampled)]
    engine.prefix_reuse = False
    try:
        plain = [engine.generate(prompts, 4, sp) for sp in (GREEDY, sampled)]
    finally:
        engine.prefix_reuse = True
    for a, b in zip(reuse, plain):
        assert _tokens(a) == _tokens(b)
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_stop_strings_end_rows(engine, prompts):
    full = engine.generate(prompts, 1, GREEDY)
    tok = engine.tokenizer
    stop = next(s for s in (tok.decode(full[0].token_ids[3:5]).strip(),) if s)

    def cut(tokens):  # the shortest prefix whose text contains the stop string
        for m in range(1, len(tokens) + 1):
            if stop in tok.decode(tokens[:m], skip_special_tokens=True):
                return tokens[:m], "stop"
        return tokens, "length"

    got = engine.generate(prompts, 1, SamplingParams(max_new_tokens=10, temperature=0.0,
                                                     stop=(stop, "never-seen-stop")))
    for c, f in zip(got, full):
        assert (c.token_ids, c.finish_reason) == cut(f.token_ids)
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 5 and stop in got[0].text
    assert len(got[0].logprobs) == len(got[0].token_ids)


def test_eos_ends_rows(engine, prompts):
    full = engine.generate(prompts, 1, GREEDY)
    eos = full[1].token_ids[4]  # pretend this row's 5th token is an EOS
    saved = engine.eos_ids
    engine.eos_ids = saved | {eos}
    try:
        got = engine.generate(prompts, 1, GREEDY)
    finally:
        engine.eos_ids = saved
    for c, f in zip(got, full):
        k = f.token_ids.index(eos) + 1 if eos in f.token_ids else len(f.token_ids)
        assert c.token_ids == f.token_ids[:k]
        assert c.finish_reason == ("stop" if eos in f.token_ids else "length")
    assert got[1].token_ids[-1] == eos and len(got[1].token_ids) <= 5


def test_eos_ids_from_tokenizer_and_generation_config():
    from types import SimpleNamespace as NS

    model = NS(generation_config=NS(eos_token_id=[2, 7]))
    assert _eos_ids(NS(eos_token_id=9), model) == {2, 7, 9}
    assert _eos_ids(NS(eos_token_id=None), NS(generation_config=NS(eos_token_id=2))) == {2}


def test_top_k_1_equals_greedy(engine, prompts):
    greedy = engine.generate(prompts, 1, GREEDY)
    top1 = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1))
    assert _tokens(top1) == [t for t in _tokens(greedy) for _ in range(2)]
    for c in top1:  # at T = 1 the sampler's log-probs are the greedy ones
        g = greedy[c.prompt_index]
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(g.logprobs), atol=1e-5)


def test_filters():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, -1.0]]), -1)
    k2 = filter_top_k_top_p(logp, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False], [True, True, True, False]]
    p = filter_top_k_top_p(logp, top_p=0.5)  # row 0: 0.66 > 0.5 alone; row 1: 0.98 alone
    assert torch.isfinite(p).tolist() == [[True, False, False, False], [False, False, True, False]]
    p8 = filter_top_k_top_p(logp, top_p=0.8)
    assert torch.isfinite(p8).tolist()[0] == [True, True, False, False]


def test_seeds_reproduce(tiny_path, engine, prompts):
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    a, b = engine.generate(prompts, 3, sp), engine.generate(prompts, 3, sp)
    assert a == b
    c = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, temperature=1.0, seed=12))
    assert _tokens(c) != _tokens(a)
    # No per-call seed: the engine's own generator, seeded at construction, runs on.
    free = SamplingParams(max_new_tokens=8, temperature=1.0)
    e1 = HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS, seed=5)
    e2 = HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS, seed=5)
    first = e1.generate(prompts, 2, free)
    assert first == e2.generate(prompts, 2, free)
    assert _tokens(e1.generate(prompts, 2, free)) != _tokens(first)


def test_update_adapter(tiny_path, prompts, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    engine = HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS)
    before = engine.generate(prompts, 1, GREEDY)
    state = engine.adapter_state()
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if "lora_B" in k)
    g = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in state.items()}
    with pytest.raises(KeyError, match="missing"):
        engine.update_adapter(1, dict(list(new.items())[1:]))
    bad_key = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        engine.update_adapter(1, {**new, bad_key: torch.zeros(3, 3)})
    assert engine.policy_version == 0 and all(
        torch.equal(v, state[k]) for k, v in engine.adapter_state().items())

    engine.update_adapter(7, new)
    after = engine.generate(prompts, 1, GREEDY)
    assert engine.policy_version == 7 and all(c.policy_version == 7 for c in after)
    assert _tokens(after) != _tokens(before)
    # The same tensors in a plain PeftModel give the same greedy tokens through generate.
    peft = get_peft_model(load_causal_lm(tiny_path), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")).eval()
    assert not set_peft_model_state_dict(peft, new).unexpected_keys
    assert _tokens(after) == _hf_generate(peft, prompts, GREEDY.max_new_tokens, engine.pad_id)
    # A saved adapter folder loads as the initial adapter.
    peft.save_pretrained(tmp_path / "adapter")
    loaded = HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS,
                             init_adapter=tmp_path / "adapter")
    assert loaded.policy_version == 0 and _tokens(loaded.generate(prompts, 1, GREEDY)) == _tokens(after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_matches_cpu(tiny_path, engine, prompts):
    gpu = HFRolloutEngine(tiny_path, lora_rank=4, lora_alpha=8, target_modules=TARGETS,
                          device="cuda")
    assert _tokens(gpu.generate(prompts, 1, GREEDY)) == _tokens(engine.generate(prompts, 1, GREEDY))
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=4)
    a, b = gpu.generate(prompts, 4, sp), gpu.generate(prompts, 4, sp)
    assert a == b and all(len(c.logprobs) == len(c.token_ids) for c in a)


@pytest.mark.slow
def test_embedded_model_condition_d():
    from rl.prompts import BOXED_PREFIX, adapter_prompt

    engine = HFRolloutEngine("embedded", lora_rank=16, lora_alpha=32, target_modules=TARGETS)
    tok = engine.tokenizer
    items = [("25 - 14", 11), ("7 θ 8 γ 2", 30), ("81 β 9 α 3", None), ("6 × 7", 42)]
    ps = [adapter_prompt(tok, e, a, "D", response_prefix=BOXED_PREFIX) for e, a in items]
    engine.generate(ps[:1], 1, SamplingParams(max_new_tokens=2, temperature=0.0))  # warm-up
    greedy = engine.generate(ps, 1, SamplingParams(max_new_tokens=8, temperature=0.0, stop=("}",)))
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, stop=("}",), seed=0)
    t0 = time.perf_counter()
    sampled = engine.generate(ps, 8, sp)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(c.token_ids) for c in sampled)
    print(f"\nprompt tokens: {[len(p.token_ids) for p in ps]}")
    for (e, a), c in zip(items, greedy):
        print(f"greedy  {e!r} api={a}: {BOXED_PREFIX + c.text!r} ({c.finish_reason})")
    print("sampled:", [BOXED_PREFIX + c.text for c in sampled[:8]])
    print(f"G=8 x 4 prompts, <=8 new tokens: {seconds:.2f} s, {n_tokens} tokens, "
          f"{n_tokens / seconds:.1f} tokens/s")
    assert len(sampled) == 32 and all(1 <= len(c.token_ids) <= 8 for c in sampled)
    assert all(len(c.token_ids) <= 8 for c in greedy)


def test_shared_prompt_head_runs_once_and_changes_nothing(engine):
    """Prompts that share a long head (as every adapter prompt shares its few-shot lines): the
    head is computed once for the chunk, the tails padded after it; tokens and log-probs equal
    the per-prompt prefill's, and the model saw the head once."""
    tok = engine.tokenizer
    head = "Examples: 3 θ 4 → 7; 10 α 3 → 7; 2 γ 6 → 12. Now the question follows here. "
    tails = ["Expression: 12 θ 7 →", "Expression: 5 β 5 | API answer: 1 →", "Q: 2 α 9?"]
    prompts = [Prompt(tok(head + t, add_special_tokens=False)["input_ids"], head + t) for t in tails]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5)
    calls = []
    hook = engine.model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        shared = [engine.generate(prompts, 3, sp) for sp in (GREEDY, sampled)]
    finally:
        hook.remove()
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    assert calls[0][0] == 1 and calls[0][1] >= min(n_head - 1, 16)  # the head alone, batch 1
    assert calls[1][0] == 3 and calls[1][1] < max(len(p.token_ids) for p in prompts) - 10
    engine.prefix_reuse = False
    try:
        plain = [engine.generate(prompts, 3, sp) for sp in (GREEDY, sampled)]
    finally:
        engine.prefix_reuse = True
    for a, b in zip(shared, plain):
        assert _tokens(a) == _tokens(b)
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)
