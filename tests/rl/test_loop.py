"""The loop's wiring with in-memory stand-ins for the engine and learner (the real ones are
tested in tests/actors and together in the learning test)."""

from dataclasses import dataclass

import pytest

from rl.loop import ItemStream, LoopSettings, TrainItem, train
from rl.records import Completion, Prompt, SamplingParams
from verifiers.rewards import Example, get_reward


class ScriptedEngine:
    """Answers item k's prompt with the texts in ``answers[k]`` (cycled over the group)."""

    def __init__(self, answers):
        self.answers, self.policy_version, self.updates, self.calls = answers, 0, [], []

    def generate(self, prompts, n, sampling):
        self.calls.append(len(prompts))
        out = []
        for p_index, prompt in enumerate(prompts):
            texts = self.answers[prompt.text]
            for s in range(n):
                text = texts[s % len(texts)]
                out.append(Completion(p_index, s, [1] * len(text), [-0.5] * len(text), text, "stop",
                                      self.policy_version))
        return out

    def update_adapter(self, version, tensors):
        self.updates.append(version)
        self.policy_version = version


@dataclass
class Stats:
    loss: float


class RecordingLearner:
    def __init__(self):
        self.policy_version, self.batches = 0, []

    def train_step(self, groups):
        self.batches.append(groups)
        self.policy_version += 1
        return Stats(loss=0.5)

    def export_adapter(self):
        return {"w": self.policy_version}


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, metrics))


def score(pairs):
    return [get_reward("binary")(text, example) for text, example in pairs]


def _items(kinds):
    """kinds: 'mixed' (one right, one wrong answer) or 'flat' (always right)."""
    items, answers = [], {}
    for k, kind in enumerate(kinds):
        prompt = Prompt([k], f"p{k}", response_prefix="\\boxed{")
        answers[prompt.text] = ["7}", "8}"] if kind == "mixed" else ["7}"]
        items.append(TrainItem(f"u{k}", prompt, Example(truth=7, api_answer=7), "custom"))
    return items, ScriptedEngine(answers)


def test_step_learns_syncs_and_logs():
    items, engine = _items(["mixed"] * 4)
    learner, sink = RecordingLearner(), Sink()
    settings = LoopSettings(steps=3, prompts_per_step=2, group_size=4, sampling=SamplingParams())
    history = train(items, engine, learner, score, settings, sink)
    assert [step for step, _ in sink.rows] == [0, 1, 2]
    assert engine.updates == [1, 2, 3] and history[-1]["policy_version"] == 3
    group = learner.batches[0][0]
    assert group.rewards == [1.0, 0.0, 1.0, 0.0]
    assert group.advantages == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-4)
    metrics = history[0]
    assert metrics["reward/mean"] == 0.5 and metrics["reward/custom"] == 0.5
    assert metrics["groups/kept"] == 2 and metrics["groups/zero_variance_dropped"] == 0
    assert {"timing/rollout", "timing/verify", "timing/learn", "timing/sync"} <= set(metrics)
    assert metrics["sample"]["completion"] in ("\\boxed{7}", "\\boxed{8}")


def test_zero_variance_groups_are_dropped_and_refilled():
    items, engine = _items(["flat", "mixed", "flat", "mixed", "flat", "flat"])
    learner = RecordingLearner()
    settings = LoopSettings(steps=1, prompts_per_step=2, group_size=2, sampling=SamplingParams(),
                            max_refill_rounds=5, seed=3)
    metrics = train(items, engine, learner, score, settings, Sink())[0]
    assert metrics["groups/kept"] == 2 == len(learner.batches[0])
    assert metrics["groups/zero_variance_dropped"] == metrics["groups/sampled"] - 2
    assert all(set(g.rewards) == {0.0, 1.0} for g in learner.batches[0])


def test_refill_bound_then_no_learning_step():
    items, engine = _items(["flat"] * 3)
    learner = RecordingLearner()
    settings = LoopSettings(steps=1, prompts_per_step=2, group_size=2, sampling=SamplingParams(),
                            max_refill_rounds=1)
    metrics = train(items, engine, learner, score, settings, Sink())[0]
    assert engine.calls == [2, 2]  # the first round and one refill
    assert learner.batches == [] and engine.updates == [] and metrics["policy_version"] == 0
    assert metrics["groups/zero_variance_dropped"] == 4


def test_item_stream_without_shuffle_keeps_the_order_every_epoch():
    items, _ = _items(["flat"] * 3)
    stream = ItemStream(items, seed=0, shuffle=False)
    assert [next(stream).uid for _ in range(7)] == ["u0", "u1", "u2", "u0", "u1", "u2", "u0"]


def test_item_stream_reshuffles_every_epoch_and_resumes_at_a_position():
    items = list(range(5))
    stream = ItemStream(items, seed=0)
    epochs = [[next(stream) for _ in items] for _ in range(3)]
    assert all(sorted(e) == items for e in epochs) and epochs[0] != epochs[1]
    assert stream.position == 15
    resumed = ItemStream(items, seed=0, position=7)
    assert [next(resumed) for _ in range(8)] == sum(epochs, [])[7:15]


def test_periodic_evaluation_metrics_are_logged_with_the_step():
    items, engine = _items(["mixed"] * 2)
    sink = Sink()
    settings = LoopSettings(steps=2, prompts_per_step=1, group_size=2, sampling=SamplingParams())
    train(items, engine, RecordingLearner(), score, settings, sink,
          evaluate=lambda step: {"eval/overall": 0.5} if step == 1 else {})
    assert "eval/overall" not in sink.rows[0][1] and sink.rows[1][1]["eval/overall"] == 0.5


def test_tensorboard_tracker_writes_events_and_jsonl(tmp_path):
    from rl.metrics import sinks_for

    sink = sinks_for("tensorboard", tmp_path)
    sink.log(0, {"reward/mean": 0.5, "sample": {"completion": "x", "reward": 1.0}, "policy_version": 1})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert '"reward/mean": 0.5' in (tmp_path / "metrics.jsonl").read_text()


def test_a_stall_is_measured_and_warned_about(capsys):
    """Every group flat (always right here) for stall_steps steps in a row: the metric counts the
    streak, the job log gets a warning at the bound and every bound after; a step with signal
    resets it."""
    items, engine = _items(["flat"] * 2)
    sink = Sink()
    settings = LoopSettings(steps=5, prompts_per_step=2, group_size=2, sampling=SamplingParams(),
                            max_refill_rounds=0, stall_steps=2)
    history = train(items, engine, RecordingLearner(), score, settings, sink)
    assert [m["groups/zero_variance_fraction"] for m in history] == [1.0] * 5
    assert [m["stall/zero_variance_steps"] for m in history] == [1, 2, 3, 4, 5]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2 and "step 1:" in warnings[0] and "for 4 steps" in warnings[1]
    assert "identical rewards" in warnings[0] and "sft.steps" in warnings[0]

    mixed_items, mixed_engine = _items(["mixed", "flat"])
    history = train(mixed_items, mixed_engine, RecordingLearner(), score,
                    LoopSettings(steps=2, prompts_per_step=2, group_size=2, sampling=SamplingParams(),
                                 max_refill_rounds=0, stall_steps=1), Sink())
    assert [m["groups/zero_variance_fraction"] for m in history] == [0.5, 0.5]
    assert [m["stall/zero_variance_steps"] for m in history] == [0, 0]
    assert "WARNING" not in capsys.readouterr().err


def test_rollout_metrics_per_symbol_and_entropy_estimate():
    items, answers = [], {}
    for k, (expression, truth) in enumerate([("3 θ 4", 7), ("3 + 4", 7), ("9 γ 1 θ 0", 9)]):
        prompt = Prompt([k], f"p{k}", response_prefix="\\boxed{")
        answers[prompt.text] = ["7}", "9}"]
        items.append(TrainItem(f"u{k}", prompt, Example(truth=truth, api_answer=None, question=expression),
                               "standard" if "+" in expression else "custom"))
    history = train(items, ScriptedEngine(answers), RecordingLearner(), score,
                    LoopSettings(steps=1, prompts_per_step=3, group_size=2, sampling=SamplingParams()), Sink())
    metrics = history[0]
    assert metrics["reward/symbol/θ"] == 0.5 and metrics["reward/symbol/γ"] == 0.5
    assert metrics["reward/symbol/+"] == 0.5 and "reward/symbol/α" not in metrics
    assert metrics["rollout/entropy"] == pytest.approx(0.5)  # the engine's log-probs are all -0.5


def test_a_time_budget_ends_the_run_after_the_step_that_crosses_it(monkeypatch):
    import rl.loop

    clock = iter(range(0, 1000, 10))  # every perf_counter call advances 10 s
    monkeypatch.setattr(rl.loop.time, "perf_counter", lambda: float(next(clock)))
    items, engine = _items(["mixed"] * 2)
    settings = LoopSettings(steps=50, prompts_per_step=1, group_size=2, sampling=SamplingParams(),
                            time_budget_s=100)
    history = train(items, engine, RecordingLearner(), score, settings, Sink(), spent_s=45.0)
    assert 1 <= len(history) < 50
    seconds = [m["time/train_seconds"] for m in history]
    assert seconds[-1] >= 100 > seconds[-2] if len(seconds) > 1 else seconds[-1] >= 100
    assert seconds[0] > 45.0
