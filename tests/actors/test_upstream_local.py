"""The local provider's micro-batching on a tiny random Llama with the embedded tokenizer
(the embedded model itself runs in tests/scripts/test_run_baseline.py, marked slow)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.models import load_tokenizer
from actors.upstream import UpstreamRequest
from actors.upstream.local import LocalProvider


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("embedded")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class Recording(LocalProvider):
    """Records each batch's size; ``explode`` makes generation fail."""

    def __init__(self, *args, explode: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.explode = explode

    def _generate(self, requests):
        self.batches.append(len(requests))
        if self.explode:
            raise RuntimeError("out of memory")
        return super()._generate(requests)


def run(provider, requests):
    async def go():
        try:
            return await asyncio.gather(*(provider.answer(r) for r in requests))
        finally:
            await provider.aclose()
    return asyncio.run(go())


REQUESTS = [UpstreamRequest.symbol(f"{i} θ {3 * i} γ 2", max_tokens=3 + i % 3 * 4) for i in range(10)]


def test_batched_answers_equal_one_at_a_time(tiny_model):
    batched = Recording(tiny_model, batch_size=4, threads=1)  # one thread: steadier on a busy CI box
    together = run(batched, REQUESTS)
    alone = run(Recording(tiny_model, batch_size=1, threads=1), REQUESTS)
    assert batched.batches == [4, 4, 2]
    assert [a.text for a in together] == [a.text for a in alone]
    for request, answer in zip(REQUESTS, together):
        assert answer.output_tokens <= request.max_tokens and answer.input_tokens > 30
        assert answer.stop_reason in ("end_turn", "max_tokens") and not answer.failed
        assert answer.provider == "local" and answer.model == tiny_model
    assert batched.endpoint.startswith("local:/")


def test_failures_are_recorded_not_raised(tiny_model):
    exploding = Recording(tiny_model, explode=True)
    answers = run(exploding, REQUESTS[:3] + [UpstreamRequest("q", temperature=0.7)])
    assert all(a.failed and a.answer is None for a in answers)
    assert "out of memory" in answers[0].error and "greedily" in answers[3].error
    assert exploding.batches == [3]  # no retry of a failed generation


def test_threads_are_given_back(tiny_model):
    before = torch.get_num_threads()
    run(LocalProvider(tiny_model, threads=1), REQUESTS[:1])
    assert torch.get_num_threads() == before
