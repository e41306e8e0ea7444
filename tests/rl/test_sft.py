"""rl/sft.py: the format warm-start's targets (standard-symbol items only) and its loop."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest

from rl.loop import TrainItem
from rl.records import Prompt
from rl.records import TrainGroup
from rl.sft import (SURROGATE_SYMBOLS, format_targets, merge_on_shared_head, run_sft, sft_groups, standard_batches,
                    surrogate_batches, with_symbols)
from verifiers.rewards import Example
from verifiers.symbols import SEED_SYMBOLS, SymbolMap, evaluate


def _item(expression, truth, api, category, prefix=""):
    return TrainItem(expression, Prompt([1, 2, 3], "p" + prefix, response_prefix=prefix),
                     Example(truth=Fraction(truth), api_answer=api, question=expression), category)


def test_targets_come_from_standard_items_only_and_follow_the_format():
    items = [_item("3 + 4", 7, 7, "standard"), _item("9 - 2", 7, 5, "standard"),
             _item("3 θ 4", 7, 1, "custom"), _item("8 / 2", 4, None, "standard")]
    rewrite = format_targets(items, "D", "rewrite")
    assert [t for _, t in rewrite] == ["3 + 4 = 7 → \\boxed{CORRECT}", "9 - 2 = 7 → \\boxed{7}",
                                       "8 / 2 = 4 → \\boxed{4}"]
    assert all(item.category == "standard" for item, _ in rewrite)
    no_correct = format_targets(items, "A", "rewrite")  # condition A has no CORRECT token
    assert no_correct[0][1] == "3 + 4 = 7 → \\boxed{7}"
    boxed = format_targets([_item("3 + 4", 7, 7, "standard", "\\boxed{")], "D", "box")
    assert boxed[0][1] == "CORRECT}"  # the prompt already ends with the prefix


def test_a_prefix_the_format_does_not_start_with_and_no_standard_items_are_errors():
    with pytest.raises(ValueError, match="response prefix"):
        format_targets([_item("3 + 4", 7, 7, "standard", "\\boxed{")], "D", "rewrite")
    with pytest.raises(ValueError, match="standard-symbol items"):
        format_targets([_item("3 θ 4", 7, 7, "custom")], "D", "box")


class _Tokenizer:
    def __call__(self, text, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


@dataclass
class _Stats:
    loss: float
    entropy: float = 1.0
    tokens: int = 3
    lr: float = 0.1
    skipped: bool = False


class _Learner:
    def __init__(self):
        self.calls = []

    def train_step(self, groups, objective):
        self.calls.append((len(groups), len(groups[0].completions), objective))
        return _Stats(loss=1.0 / len(self.calls))


def test_groups_and_loop():
    pairs = format_targets([_item("3 + 4", 7, 7, "standard", "\\boxed{"), _item("2 * 3", 6, 5, "standard", "\\boxed{")],
                           "D", "box")
    groups = sft_groups(pairs, _Tokenizer())
    assert groups[1].completions == [[ord(c) for c in "6}"]] and groups[1].prompt_ids == [1, 2, 3]
    learner, logged = _Learner(), []
    history = run_sft(learner, standard_batches(groups, 3, seed=0), steps=4, log=lambda s, m: logged.append(s))
    assert learner.calls == [(1, 3, "sft")] * 4 and logged == [0, 1, 2, 3]  # one merged group
    assert [round(m["sft/loss"], 2) for m in history] == [1.0, 0.5, 0.33, 0.25]
    ticks = iter([False, False, True])
    assert len(run_sft(_Learner(), standard_batches(groups, 1, 0), 10, lambda s, m: None,
                       out_of_time=lambda: next(ticks))) == 2


def test_merge_on_shared_head_keeps_every_token_and_trains_only_targets():
    groups = [TrainGroup([1, 2, 3, 4, 5], [[9, 9]], [0.0], [[]], [False], 0),
              TrainGroup([1, 2, 3, 6], [[8]], [0.0], [[]], [False], 0),
              TrainGroup([1, 2, 3], [[7, 7, 7]], [0.0], [[]], [False], 0)]
    [merged] = merge_on_shared_head(groups)
    assert merge_on_shared_head(groups[:1] + [TrainGroup([4], [[5]], [0.0], [[]], [False], 0)])[1].prompt_ids == [4]
    assert merged.prompt_ids == [1, 2]  # the third prompt keeps one token of its own
    assert merged.completions == [[3, 4, 5, 9, 9], [3, 6, 8], [3, 7, 7, 7]]
    assert merged.context == [3, 2, 1]
    for g, prompt_part, completion in zip(groups, merged.completions, merged.completions):
        assert merged.prompt_ids + completion == g.prompt_ids + g.completions[0]


def test_with_symbols_writes_a_standard_expression_in_a_map():
    symbols = SymbolMap.permuted("λμσφ", "*/+-")
    assert with_symbols("3 + 4 * 2", symbols) == "3 σ 4 λ 2"
    assert evaluate(with_symbols("9 - 8 / 2", symbols), symbols) == evaluate("9 - 8 / 2")


def _map_shown_by(prompt_text: str) -> SymbolMap:
    """The meaning each symbol has in a prompt: read off its few-shot lines
    ("Expression: 3 λ 4 | ... → 3 * 4 = ..."), the fourth symbol by elimination."""
    names = prompt_text.split("The symbols ")[1].split(" each")[0].split(", ")
    meaning = {}
    for line in prompt_text.split("\n"):
        if line.startswith("Expression: ") and " = " in line:
            symbol = line.split("Expression: ")[1].split()[1]
            meaning[symbol] = line.split("→ ")[1].split()[1]
    [last] = set(names) - set(meaning)
    [meaning[last]] = {"+", "-", "*", "/"} - set(meaning.values())
    return SymbolMap({name: meaning[name] for name in names})


def test_surrogate_batches_teach_reading_the_examples_and_never_show_a_seed_symbol():
    from actors.models import load_tokenizer
    from verifiers.symbols import to_standard

    tok = load_tokenizer("embedded")
    items = [_item(e, evaluate(e), api, "standard") for e, api in (("3 + 4", 7), ("9 - 2", 5), ("6 * 2", 12),
                                                                    ("8 / 2", None))]
    items.append(_item("3 θ 4", 7, 7, "custom"))  # never used
    batches = surrogate_batches(items, tok, "D", "rewrite", batch_size=4, seed=0)
    symbolized, maps = 0, set()
    for _ in range(12):
        batch = next(batches)
        [merged] = merge_on_shared_head(batch)
        assert len(merged.prompt_ids) > 150  # one map per batch: the few-shot lines are a shared head
        for group in batch:
            text, target = tok.decode(group.prompt_ids), tok.decode(group.completions[0])
            assert not set("θαγβ") & set(text + target)
            shown = _map_shown_by(text)
            assert set(shown.custom) <= set(SURROGATE_SYMBOLS)
            maps.add(tuple(shown.custom.items()))
            question = text.split("Expression: ")[-1].split(" |")[0]
            rewritten, value = target.split(" = ")[0], target.split(" = ")[1].split(" →")[0]
            assert rewritten == to_standard(question, shown)  # what the examples say the symbol means
            assert evaluate(rewritten) == Fraction(value)
            symbolized += question != rewritten
    with pytest.raises(ValueError, match="condition B shows no symbol"):
        next(surrogate_batches(items, tok, "B", "rewrite", batch_size=4, seed=0))
    assert 12 <= symbolized <= 36 and len(maps) == 12  # about half of 48 questions; a fresh map per batch


# --------------------------------------------------------------------------- rationale SFT

from rl.sft import CountBatches, RationaleError, TokenBudgetBatches, eval_metrics, rationale_groups, read_rationale


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "p"}', "'completion' must be a non-empty string"),
    ('{"prompt": 3, "completion": "c"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "p", "completion": "  "}', "'completion' must be a non-empty string"),
    ('["p", "c"]', "a row must be a JSON object"),
    ('{"prompt": "p", "completion": ', "not JSON"),
])
def test_a_bad_rationale_row_names_file_line_and_key(tmp_path, line, problem):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n\n' + line + "\n")
    with pytest.raises(RationaleError, match=f"rows.jsonl:3: {problem}"):
        read_rationale(path)


def test_rationale_rows_train_only_the_completion_and_its_eos(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "ab", "completion": "cd"}\n{"prompt": "x", "completion": "y", "id": 7}\n')
    assert read_rationale(path) == [("ab", "cd"), ("x", "y")]

    class Tok(_Tokenizer):
        eos_token_id, bos_token_id = 0, None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    [group, _] = rationale_groups(read_rationale(path), Tok())
    assert group.prompt_ids == [97, 98] and group.completions == [[99, 100, 0]] and group.context == []


def _sized(n_prompt, n_completion, tag):
    return TrainGroup([tag] * n_prompt, [[tag] * n_completion], [0.0], [[]], [False], 0)


def test_token_budget_batches_fill_the_budget_and_resume_at_their_position():
    groups = [_sized(3, 2, i) for i in range(7)]  # 5 tokens each
    batches = TokenBudgetBatches(groups, max_tokens=12, seed=0)
    sizes = [len(next(batches)) for _ in range(5)]
    assert sizes == [2] * 5  # two fit in 12 tokens, a third would not
    assert TokenBudgetBatches([_sized(20, 5, 0)], 12, 0).__next__()[0].prompt_ids[0] == 0  # too big: alone
    seen = [[g.prompt_ids[0] for g in next(batches)] for _ in range(3)]
    again = TokenBudgetBatches(groups, 12, seed=0, position=10)
    assert [[g.prompt_ids[0] for g in next(again)] for _ in range(3)] == seen
    counted = CountBatches(groups, 3, seed=0)
    next(counted)
    assert counted.position == 3 and len(next(counted)) == 3


def test_run_sft_resumes_at_its_step_with_the_eval_and_the_step_hook():
    groups = [_sized(2, 1, i) for i in range(4)]
    learner, logged, ends = _Learner(), [], []
    history = run_sft(learner, CountBatches(groups, 2, 0), 5, lambda s, m: logged.append((s, m)), start_step=3,
                      evaluate=lambda step: {"eval/exact": 0.5} if step == 4 else {},
                      on_step_end=lambda step, m: ends.append(step))
    assert [s for s, _ in logged] == [3, 4] and ends == [3, 4] and len(learner.calls) == 2
    assert "eval/exact" not in history[0] and history[1]["eval/exact"] == 0.5


def test_eval_metrics_carry_the_answer_boundary_rates():
    summary = {"categories": ["gsm8k"], "gsm8k": {"accuracy": 0.5}, "overall": {"accuracy": 0.5},
               "boundary": {"raw": {"total": 4, "exact": 2, "strict_final_line": 3, "trailing_text": 1,
                                    "final_format": 4}}}
    assert eval_metrics(summary) == {"eval/overall": 0.5, "eval/gsm8k": 0.5, "eval/exact": 0.5,
                                     "eval/strict_final_line": 0.75, "eval/trailing_text": 0.25,
                                     "eval/final_format": 1.0}


def test_rationale_sft_lowers_the_loss_and_teaches_the_strict_final_line(tmp_path):
    """A random 2-layer Llama with the embedded tokenizer, LoRA only: 60 SFT steps on four
    rationale rows; the loss falls and greedy decoding then writes each row exactly, in the
    strict format (``#### n`` last, EOS right after: nothing trailing). (lr 1e-2 spiked on one
    thread and not on two, so the rate is one that converges under either.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.learner import Learner
    from actors.models import load_tokenizer
    from rl.distill import keep_sample

    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    # pad 0, not the tokenizer's pad (= EOS): a padding row of the tied embedding is zero, which
    # would pin the EOS logit at 0 where LoRA cannot move it.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    rows = [(f"Problem: {a} plus {b}?\nSolution:", f"\n{a} + {b} = {a + b}\n#### {a + b}")
            for a, b in ((2, 3), (4, 1), (6, 2), (3, 3))]
    groups = rationale_groups(rows, tok)
    learner = Learner(str(tmp_path), lora_rank=16, lora_alpha=32, lr=5e-3, weight_decay=0.0, warmup_steps=0,
                      total_steps=100, lr_schedule="constant", tis_cap=None, seed=0)
    history = run_sft(learner, CountBatches(groups, 4, 0), 60, lambda s, m: None)
    assert history[-1]["sft/loss"] < history[0]["sft/loss"] / 100
    learner.module.eval()
    for (_, target), group in zip(rows, groups):
        out = learner.module.generate(input_ids=torch.tensor([group.prompt_ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=0)
        text = tok.decode(out[0, len(group.prompt_ids):], skip_special_tokens=True)
        assert text == target and keep_sample(text, target.split("#### ")[1]), text
