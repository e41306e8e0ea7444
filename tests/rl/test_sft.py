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
