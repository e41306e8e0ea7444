"""rl/distill.py: the self-distillation filter keeps exactly the samples the rules allow."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rl.distill import dedupe, effect_report, keep_sample, sample_targets, write_report
from rl.evaluation import EvalRow
from rl.loop import TrainItem
from rl.records import Completion, Prompt
from verifiers.rewards import Example

# (completion, gold, kept?): the rule is exact AND `#### n` is the last non-empty line AND no
# text after the marker.
TABLE = [
    ("48 / 2 = 24\n24 + 48 = 72\n#### 72", 72, True),
    ("\nNatalia sold 72 clips.\n#### 72\n\n", 72, True),           # trailing blank lines are not text
    ("#### 1,007", 1007, True),                                   # thousands separator
    ("48 / 2 = 24\n#### 70", 72, False),                          # wrong number
    ("#### 72\nThat is the total.", 72, False),                   # text after the marker, marker not last
    ("So the total is #### 72", 72, False),                       # marker not alone on the last line
    ("#### 72 clips", 72, False),                                 # text after the marker on its line
    ("The answer is 72.", 72, False),                             # missing marker (though the number is right)
    ("The answer is \\boxed{72}", 72, False),                     # boxed only
    ("\\boxed{72}\n#### 70", 72, False),                          # the marker's number decides: wrong
    ("#### 72\n#### 72", 72, False),                              # a second marker is trailing text
    ("", 72, False),                                              # nothing
]


@pytest.mark.parametrize("completion, gold, kept", TABLE)
def test_the_filter_keeps_exactly_the_allowed_samples(completion, gold, kept):
    assert keep_sample(completion, gold) is kept


def _item(uid, gold):
    return TrainItem(uid, Prompt([1, 2], "p", ""), Example(truth=gold, question=uid), "gsm8k")


def test_dedupe_keeps_the_first_of_each_question_and_text():
    a, b = _item("a", 1), _item("b", 1)
    pairs = [(a, "x\n#### 1"), (a, "x\n#### 1 "), (b, "x\n#### 1"), (a, "y\n#### 1")]
    assert [(i.uid, t) for i, t in dedupe(pairs)] == [("a", "x\n#### 1"), ("b", "x\n#### 1"), ("a", "y\n#### 1")]


@dataclass
class _Engine:
    texts: list

    def generate(self, prompts, n, sampling):
        return [Completion(p, s, [], [], self.texts[(p * n + s) % len(self.texts)], "stop", 0)
                for p in range(len(prompts)) for s in range(n)]


def test_sample_targets_filters_and_counts():
    engine = _Engine(["\n#### 72", "\n#### 72", "#### 71", "72 \\boxed{72}"])
    kept, stats = sample_targets(engine, [_item("q", 72)], sampling=None, n_samples=4)
    assert [t for _, t in kept] == ["\n#### 72"]
    assert (stats.samples, stats.kept, stats.unique) == (4, 2, 1)


def _rows(correct):
    return [EvalRow(uid=str(i), category="gsm8k", expression="", truth="1", api_answer=None, api_correct=False,
                    completion="", answer=None, decision=None, correct=c, reward=float(c))
            for i, c in enumerate(correct)]


def test_a_regression_shows_as_a_negative_interval(tmp_path):
    before, after = _rows([True] * 40 + [False] * 10), _rows([False] * 30 + [True] * 10 + [False] * 10)
    report = effect_report(before, after, iterations=2000)
    assert report["sum_delta"] == -30 and report["ci_high"] < 0 and report["verdict"] == "hurt"
    assert "hurt" in report["line"] and "-30" in report["line"]
    better = effect_report(after, before, iterations=2000)
    assert better["ci_low"] > 0 and better["verdict"] == "helped"
    path = write_report(tmp_path, report, [])
    assert '"verdict": "hurt"' in path.read_text()
