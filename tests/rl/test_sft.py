"""rl/sft.py: the format warm-start's targets (standard-symbol items only) and its loop."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest

from rl.loop import TrainItem
from rl.records import Prompt
from rl.records import TrainGroup
from rl.sft import format_targets, merge_on_shared_head, run_sft, sft_groups
from verifiers.rewards import Example


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
    history = run_sft(learner, groups, steps=4, batch_size=3, seed=0, log=lambda s, m: logged.append(s))
    assert learner.calls == [(1, 3, "sft")] * 4 and logged == [0, 1, 2, 3]  # one merged group
    assert [round(m["sft/loss"], 2) for m in history] == [1.0, 0.5, 0.33, 0.25]
    ticks = iter([False, False, True])
    assert len(run_sft(_Learner(), groups, 10, 1, 0, lambda s, m: None, out_of_time=lambda: next(ticks))) == 2


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
