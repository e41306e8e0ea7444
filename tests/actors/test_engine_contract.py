"""One contract suite, three engines: ``hf``, ``vllm`` (an adapter version per LoRA id) and
``vllm-merged`` (the LoRA merged into the weights), on the embedded model, fp32, CPU.

Each engine is built from a config (``cluster.build.engine_spec``) with a LoRA shape that is not
the default (rank 8, alpha 24, three of the seven projections: tests/actors/engine_contract.py),
and must agree with the reference: transformers + PEFT with the same adapter (greedy
``generate``, the prompts left-padded) and the learner's own log-prob functions
(``completion_logits`` + ``token_logprobs``). The prompts carry a ~140-token system message, so
with vLLM they fill a whole KV block (128 tokens) and its prefix cache is in play: an engine that
served a new adapter version from stale cached blocks fails here. vLLM runs in this process
(single-process mode) when it is installed; scripts/install.sh installs it on CPU machines, so
CI runs all three.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from actors.models import load_tokenizer
from rl.records import SamplingParams

from tests.actors.engine_contract import (GREEDY, SAMPLED, TARGETS, engine_config, learner_logprobs, lora_shapes,
                                          random_versions, reference_model, render_prompts, set_adapter)

pytestmark = pytest.mark.slow

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NEEDS_VLLM = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
ENGINES = ["hf", pytest.param("vllm", marks=NEEDS_VLLM), pytest.param("vllm-merged", marks=NEEDS_VLLM)]
VERSIONS = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return render_prompts(tokenizer)


@pytest.fixture(scope="module")
def reference():
    return reference_model()


@pytest.fixture(scope="module")
def versions(reference):
    return random_versions(reference, VERSIONS)


@pytest.fixture(scope="module")
def expected(reference, versions, prompts, tokenizer):
    """Greedy tokens of the reference per version (``generate``, the prompts left-padded)."""
    width = max(len(p.token_ids) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p.token_ids)) + p.token_ids for p in prompts])
    mask = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prompts])
    out = []
    with torch.no_grad():
        for tensors in versions:
            set_adapter(reference, tensors)
            y = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                                   max_new_tokens=GREEDY.max_new_tokens)
            out.append([_until_eos(row[width:].tolist(), tokenizer.eos_token_id) for row in y])
    return out


def _until_eos(tokens, eos):
    """generate pads a row that ended early; the engines stop at EOS (and keep it)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    from actors.engines import build_engine
    from cluster.build import engine_spec

    threads = torch.get_num_threads()
    built = build_engine(*engine_spec(engine_config(request.param)))
    assert torch.get_num_threads() == threads  # vLLM must leave the process's threads alone
    yield built
    getattr(built, "close", lambda: None)()


def test_lora_shape_comes_from_the_config(engine, reference):
    want = lora_shapes(reference)
    assert {k: tuple(v.shape) for k, v in engine.adapter_state().items()} == want
    assert all(any(f".{t}." in k for t in TARGETS) for k in want)


def test_greedy_equals_transformers_peft_across_versions(engine, versions, expected, prompts):
    for version, (tensors, want) in enumerate(zip(versions, expected), start=1):
        engine.update_adapter(version, tensors)
        got = engine.generate(prompts, 1, GREEDY)
        assert [c.token_ids for c in got] == want, f"version {version}"
        assert {c.policy_version for c in got} == {version} == {engine.policy_version}


def test_an_update_between_identical_requests_changes_the_answer_as_it_must(engine, versions, expected, prompts):
    engine.update_adapter(101, versions[0])
    before = engine.generate(prompts, 1, GREEDY)
    engine.update_adapter(102, versions[1])
    after = engine.generate(prompts, 1, GREEDY)
    assert [c.token_ids for c in before] == expected[0] and [c.token_ids for c in after] == expected[1]
    assert expected[0] != expected[1]  # the update had something to change
    assert {c.policy_version for c in before} == {101} and {c.policy_version for c in after} == {102}


def test_sampled_logprobs_are_the_learners(engine, versions, reference, prompts):
    engine.update_adapter(7, versions[2])
    set_adapter(reference, versions[2])
    got = engine.generate(prompts[:2], 4, SAMPLED)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(i, s) for i in range(2) for s in range(4)]
    assert len({tuple(c.token_ids) for c in got}) > 2  # n samples, not one repeated
    worst = 0.0
    for i, prompt in enumerate(prompts[:2]):
        rows = [c for c in got if c.prompt_index == i]
        learner = learner_logprobs(reference, prompt, [c.token_ids for c in rows], SAMPLED.temperature)
        for r, c in enumerate(rows):
            diff = (learner[r, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-3, worst
    again = engine.generate(prompts[:2], 4, SAMPLED)  # the seed makes the call reproducible
    assert [c.token_ids for c in again] == [c.token_ids for c in got]


def test_stop_strings_and_eos_end_completions(engine, versions, prompts, tokenizer):
    engine.update_adapter(8, versions[3])
    free = engine.generate(prompts, 1, SamplingParams(max_new_tokens=24, temperature=0.0))
    text = free[2].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = engine.generate(prompts[2:3], 1, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop in cut.text and len(cut.token_ids) < 24
    assert cut.token_ids == free[2].token_ids[: len(cut.token_ids)]
    for c in free:  # EOS is kept in token_ids and ends the row
        eos = c.token_ids[-1] == tokenizer.eos_token_id
        assert c.finish_reason == ("stop" if eos else "length")
