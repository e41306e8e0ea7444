"""actors/chain.py: decisions, input checks, reading an adapter folder, and the chain on a tiny
random Llama (the embedded tokenizer) behind a table-driven upstream. The embedded model runs
the chain end to end in tests/scripts/test_chain_cli.py."""

from __future__ import annotations

import json
import math
import re
import threading
from fractions import Fraction

import pytest
import torch

from actors.chain import (
    Chain, ChainInputError, adapter_settings, build_engine, chain_from_adapter, check_expression, decide,
)
from actors.models import load_causal_lm, load_tokenizer
from actors.rollout_hf import HFRolloutEngine
from actors.upstream import AnswerCache, Provider, Reply, RetryPolicy, UpstreamClient
from rl.config import dump_config, load_config
from rl.prompts import adapter_prompt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core box: one thread is steadier
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class TableProvider(Provider):
    """Replies from a table keyed by the user prompt; counts calls."""

    name, model, endpoint = "table", "table-model", "memory"

    def __init__(self, replies: dict[str, str]):
        self.replies, self.calls, self.retry = replies, 0, RetryPolicy(max_attempts=1)

    async def call(self, request):
        self.calls += 1
        return Reply(self.replies.get(request.prompt.removeprefix("Evaluate: "), "no idea"), "end_turn", 10, 2)


def make_client(tmp_path, replies):
    provider = TableProvider(replies)
    cache = AnswerCache(tmp_path / "cache.sqlite")
    return provider, cache, UpstreamClient(provider, cache)


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("completion, api, expected", [
    (r"\boxed{CORRECT}", Fraction(7), ("CORRECT", Fraction(7), False)),
    (r"\boxed{\text{correct}}", Fraction(0), ("CORRECT", Fraction(0), False)),
    (r"\boxed{CORRECT}", None, ("CORRECT", None, False)),  # accepting no answer leaves none
    (r"\boxed{-3/4}", Fraction(7), ("override", Fraction(-3, 4), False)),
    (r"\boxed{12", Fraction(7), ("none", Fraction(7), True)),  # unterminated: the upstream's stands
    (r"\boxed{INCORRECT}", Fraction(7), ("none", Fraction(7), True)),
    ("", None, ("none", None, True)),
])
def test_decide(completion, api, expected):
    assert decide(completion, api) == expected


@pytest.mark.parametrize("bad, message", [
    ("", "expressions[0]: is empty"), ("   ", "is empty"), (7, "must be a string, got int"),
    ("3 θ x", "unexpected character 'x' at position 4"), ("3 θ", "ends with an operator at position 2"),
    ("θ 3", "expected an integer at position 0"), ("1" * 10_001, "is 10001 characters; at most 300"),
    ("1" * 31, "an operand has 31 digits; at most 30"), ("4 β 0", "divides by zero"),
])
def test_check_expression_names_the_problem(bad, message):
    with pytest.raises(ChainInputError, match=re.escape(message)):
        check_expression(bad, "expressions[0]")


def test_settings_of_the_base_model():
    s = adapter_settings(None)
    assert (s.path, s.base_model, s.lora_rank, s.target_modules, s.run_config) == (None, "embedded", 1, "all-linear", None)
    assert (s.condition, s.response_prefix, s.stop, s.max_new_tokens) == ("D", "", (), 256)
    s = adapter_settings(None, condition="A", response_prefix="\\boxed{", stop=["}"], max_new_tokens=4)
    assert (s.condition, s.response_prefix, s.stop, s.max_new_tokens) == ("A", "\\boxed{", ("}",), 4)


def _checkpoint(tmp_path, tiny_path, *, rslora=False):
    """A run folder with a resolved config and a PEFT checkpoint of non-zero LoRA tensors."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    config = load_config(None, [f"model.name_or_path={tiny_path}", "data.condition=B", "rollout.stop=['}']",
                                "rollout.response_prefix=\\boxed{", "eval.max_new_tokens=5", "upstream.max_tokens=9"])
    dump_config(config, run / "config.yaml")
    engine = HFRolloutEngine(tiny_path, lora_rank=1, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    state = {k: torch.randn_like(v) for k, v in engine.adapter_state().items()}
    folder = run / "checkpoints" / "step_000002"
    folder.mkdir(parents=True)
    save_file(state, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "r": 1, "lora_alpha": 3, "target_modules": ["v_proj", "q_proj"], "use_rslora": rslora,
        "base_model_name_or_path": "/nowhere"}))
    return folder, state


def test_checkpoint_brings_lora_shape_and_the_runs_prompt_settings(tmp_path, tiny_path):
    folder, _ = _checkpoint(tmp_path, tiny_path)
    s = adapter_settings(folder)
    assert (s.lora_rank, s.lora_alpha, s.target_modules) == (1, 3.0, ("q_proj", "v_proj"))
    assert (s.condition, s.response_prefix, s.stop, s.max_new_tokens) == ("B", "\\boxed{", ("}",), 5)
    assert s.upstream_max_tokens == 9 and adapter_settings(folder, upstream_max_tokens=3).upstream_max_tokens == 3
    assert s.base_model == str(tiny_path) and s.run_config == tmp_path / "run" / "config.yaml"
    assert adapter_settings(folder, condition="D", response_prefix="").condition == "D"
    assert adapter_settings(folder, response_prefix="").response_prefix == ""


def test_checkpoint_without_a_run_and_with_rslora(tmp_path, tiny_path):
    folder, _ = _checkpoint(tmp_path, tiny_path, rslora=True)
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    s = adapter_settings(moved, base_model=str(tiny_path))
    assert s.run_config is None and s.condition == "D" and s.max_new_tokens == 256 and s.upstream_max_tokens is None
    assert s.lora_alpha == pytest.approx(3.0 * math.sqrt(1))
    assert adapter_settings(moved).base_model == "embedded"  # the recorded base is not a folder here
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        adapter_settings(tmp_path)


def test_loaded_checkpoint_is_the_engines_adapter(tmp_path, tiny_path):
    folder, state = _checkpoint(tmp_path, tiny_path)
    _, cache, client = make_client(tmp_path, {})
    with chain_from_adapter(client, folder) as chain:
        loaded = chain.engine.adapter_state()
        assert chain.adapter == str(folder) and chain.condition == "B"
        assert chain.sampling.max_new_tokens == 5 and chain.upstream_max_tokens == 9
    cache.close()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- the chain


def test_chain_answers_in_order_through_the_cache(tmp_path, tiny_path):
    provider, cache, client = make_client(tmp_path, {"3 θ 4": "7", "10 α 3": "The answer is 13."})
    chain = chain_from_adapter(client, None, base_model=str(tiny_path), response_prefix="\\boxed{",
                               stop=["}"], max_new_tokens=4)
    try:
        first = chain.answer_batch([" 3 θ 4", "10 α 3", "2 γ 6"])
        again = chain.answer_batch(["3 θ 4"])
        with pytest.raises(ChainInputError, match=r"expressions\[1\]: unexpected character 'x'"):
            chain.answer_batch(["1 θ 1", "2 x 2"])
        assert chain.answer_batch([]) == []
    finally:
        chain.close()
        cache.close()
    assert [a.expression for a in first] == ["3 θ 4", "10 α 3", "2 γ 6"]
    assert [a.upstream_answer for a in first] == ["7", "13", None]
    assert first[1].upstream_text == "The answer is 13." and first[2].upstream_text == "no idea"
    assert provider.calls == 3 and again[0].upstream_cached and not first[0].upstream_cached
    for a in first:
        assert a.completion.startswith("\\boxed{") and a.decision in ("CORRECT", "override", "none")
        assert (a.decision, _fraction(a.final_answer), a.fallback) == decide(a.completion, _fraction(a.upstream_answer))
        assert a.latency_s > 0 and json.loads(json.dumps(a.to_json())) == a.to_json()
    assert chain.describe()["upstream"] == {"provider": "table", "model": "table-model"}


def _fraction(text):
    return None if text is None else Fraction(text)


def test_base_model_mode_is_the_plain_model(tmp_path, tiny_path):
    _, cache, client = make_client(tmp_path, {"3 θ 4": "7"})
    with chain_from_adapter(client, None, base_model=str(tiny_path), max_new_tokens=6) as chain:
        answer = chain.answer_batch(["3 θ 4"])[0]
        prompt = adapter_prompt(chain.engine.tokenizer, "3 θ 4", Fraction(7), "D")
    cache.close()
    model = load_causal_lm(tiny_path)
    out = model.generate(torch.tensor([prompt.token_ids]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                         pad_token_id=model.config.pad_token_id)
    expected = load_tokenizer(tiny_path).decode(out[0, len(prompt.token_ids):], skip_special_tokens=True)
    assert answer.completion == expected


def test_threads_share_one_chain(tmp_path, tiny_path):
    provider, cache, client = make_client(tmp_path, {f"{i} θ 1": str(i + 1) for i in range(6)})
    results: dict[int, list] = {}
    with chain_from_adapter(client, None, base_model=str(tiny_path), max_new_tokens=2) as chain:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, chain.answer_batch([f"{i} θ 1"])))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    cache.close()
    assert {i: r[0].upstream_answer for i, r in results.items()} == {i: str(i + 1) for i in range(6)}
    assert provider.calls == 6


def test_a_closed_chain_refuses(tmp_path, tiny_path):
    _, cache, client = make_client(tmp_path, {})
    engine = build_engine(adapter_settings(None, base_model=str(tiny_path)))
    chain = Chain(client, engine, max_new_tokens=2)
    chain.close()
    chain.close()  # idempotent
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        chain.answer_batch(["1 θ 1"])
    with pytest.raises(ValueError, match="condition 'E'"):
        Chain(client, engine, condition="E")


def test_doctests():
    import doctest

    import actors.chain

    failures, tried = doctest.testmod(actors.chain, verbose=False)
    assert failures == 0 and tried >= 5
