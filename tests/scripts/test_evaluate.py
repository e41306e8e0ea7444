"""scripts/evaluate.py end to end on a tiny random Llama (with the embedded tokenizer, so the
adapter prompt has a chat template): the upstream alone, the base model and one PEFT adapter
over 4 generated symbol items, a local upstream on the same tiny model; and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.evaluate import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core box: one thread is steadier
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model folder, adapter folder, test file)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.models import load_tokenizer
    from verifiers.symbol_data import build_symbol_dataset, write_jsonl

    root = tmp_path_factory.mktemp("evaluate")
    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model_path = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_path)
    tok.save_pretrained(model_path)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_path = root / "adapter_a"
    get_peft_model(LlamaForCausalLM.from_pretrained(model_path), lora).save_pretrained(adapter_path)
    _, test = build_symbol_dataset(n_per_type=4, seed=0, test_fraction=0.5)
    data = root / "test.jsonl"
    write_jsonl(test, data)
    return model_path, adapter_path, data


def test_upstream_base_and_adapter_side_by_side(tiny, tmp_path, capsys):
    model, adapter, data = tiny
    out = tmp_path / "eval"
    argv = ["--data", str(data), "--limit", "4", "--upstream-only", "--base", "--adapter", str(adapter),
            "--base-model", str(model), "--model", str(model), "--max-tokens", "4", "--max-new-tokens", "3",
            "--response-prefix", "\\boxed{", "--cache", str(tmp_path / "cache.sqlite"), "--out", str(out)]
    assert main(argv) == 0
    document = json.loads((out / "summary.json").read_text())
    assert list(document["subjects"]) == ["upstream", "base", "adapter_a"]
    for name, summary in document["subjects"].items():
        assert summary["overall"]["total"] == 4
        for file in ("results.json", "report.md", "plots/category_accuracy.png"):
            assert (out / name / file).is_file(), (name, file)
    records = json.loads((out / "adapter_a" / "results.json").read_text())["records"]
    assert len(records) == 4 and all(r["completion"].startswith("\\boxed{") for r in records)
    assert all(r["decision"] is None for r in json.loads((out / "upstream" / "results.json").read_text())["records"])
    assert "| adapter_a |" in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "upstream: 4 answers (0 from the cache)" in printed and "| subject |" in printed
    # again without a response prefix (none is null, not ""): upstream answers from the cache
    again = [a for a in argv[:-2] if a not in ("--response-prefix", "\\boxed{")] + ["--out", str(tmp_path / "again")]
    assert main(again) == 0
    assert "upstream: 4 answers (4 from the cache)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "no/such/folder"], "not an adapter folder"),
    ([], "nothing to evaluate"),
    (["--base", "--samples", "4"], "needs --temperature > 0"),
])
def test_bad_flags_exit_2_before_anything_loads(extra, message, tiny, capsys):
    assert main(["--data", str(tiny[2]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from scripts.evaluate import build_parser; build_parser().format_help(); "
            "print(sorted({'torch', 'transformers', 'actors.chain', 'rl.evaluation'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gsm8k_subjects_get_the_answer_boundary_metrics(tiny, tmp_path, capsys):
    """--task gsm8k: the base model answers with the strict prompt, the (local, tiny) upstream
    with its GSM8K request; both are scored with the boundary metrics and the table shows them."""
    model, _, _ = tiny
    out = tmp_path / "gsm"
    argv = ["--task", "gsm8k", "--data", str(REPO / "rl" / "data" / "gsm8k" / "test.jsonl"), "--limit", "3",
            "--upstream-only", "--base", "--base-model", str(model), "--model", str(model), "--max-tokens", "4",
            "--max-new-tokens", "4", "--cache", str(tmp_path / "cache.sqlite"), "--out", str(out)]
    assert main(argv) == 0
    document = json.loads((out / "summary.json").read_text())
    for name in ("upstream", "base"):
        summary = document["subjects"][name]
        assert summary["categories"] == ["gsm8k"] and summary["overall"]["total"] == 3
        assert summary["boundary"]["raw"]["total"] == 3
        assert sum(summary["boundary"]["raw"]["buckets"].values()) == 3
    records = json.loads((out / "base" / "results.json").read_text())["records"]
    assert all(r["boundary"] and r["decision"] is None for r in records)
    assert "| subject | exact | strict final line | trailing text | missing |" in (out / "summary.md").read_text()
    assert "answer boundary" in capsys.readouterr().out


def test_gsm8k_upstream_rows_are_scored_on_the_final_line():
    from fractions import Fraction
    from types import SimpleNamespace

    from scripts.evaluate import upstream_rows

    task = SimpleNamespace(uid="q1", prompt="How many?", truth=Fraction(42), category="gsm8k")
    replies = [SimpleNamespace(text="6 * 7 = 42\n#### 42"), SimpleNamespace(text="#### 42\nHope this helps!"),
               SimpleNamespace(text=None)]
    rows = upstream_rows([task] * 3, replies)
    assert [r.correct for r in rows] == [True, True, False]  # exact reads the last #### line
    assert rows[0].boundary["raw"]["strict_final_line"] and not rows[0].boundary["raw"]["trailing_text"]
    assert rows[1].boundary["raw"]["trailing_text"] and not rows[1].boundary["raw"]["strict_final_line"]
    assert rows[2].boundary["raw"]["predicted"] is None
