"""Asynchronous GRPO (rl/rollout_ahead.py) through the loop, with in-memory stand-ins for the
engine and learner (the Ray wiring is tested in tests/cluster/test_ray_trainer.py)."""

import threading

import pytest

from rl.loop import LoopSettings, train
from rl.records import Completion, SamplingParams
from tests.rl.test_loop import RecordingLearner, ScriptedEngine, Sink, _items, score

WAIT_S = 10.0


class WatchedEngine(ScriptedEngine):
    """Records, for every generate call, the engine's version and whether another call (or an
    evaluation) was running at the same time. One prompt set per step: mixed groups are never
    refilled."""

    def __init__(self, answers):
        super().__init__(answers)
        self.generated: list[tuple[int, str]] = []  # (policy version, first prompt's text)
        self.busy, self.overlaps = False, 0
        self.called = threading.Condition()

    def generate(self, prompts, n, sampling):
        self.overlaps += self.busy
        self.busy = True
        try:
            with self.called:
                self.generated.append((self.policy_version, prompts[0].text))
                self.called.notify_all()
            return super().generate(prompts, n, sampling)
        finally:
            self.busy = False


class WaitingLearner(RecordingLearner):
    """A learner whose step waits until the engine starts generating again: it finishes only if
    the next step's rollouts run while it learns (the overlap async mode promises)."""

    def __init__(self, engine: WatchedEngine, steps: int):
        super().__init__()
        self.engine, self.steps, self.overlapped = engine, steps, []

    def train_step(self, groups):
        step = len(self.batches)
        if step < self.steps - 1:  # the last step has no next one
            with self.engine.called:  # step + 1's generate call has begun
                self.overlapped.append(self.engine.called.wait_for(
                    lambda: len(self.engine.generated) >= step + 2, WAIT_S))
        return super().train_step(groups)


def _watched(kinds):
    items, scripted = _items(kinds)
    return items, WatchedEngine(scripted.answers)


def settings(steps=5, lag=1):
    return LoopSettings(steps=steps, prompts_per_step=2, group_size=2, sampling=SamplingParams(seed=0),
                        max_policy_lag=lag)


def test_next_rollouts_run_while_the_learner_learns():
    items, engine = _watched(["mixed"] * 6)
    learner, sink = WaitingLearner(engine, steps=5), Sink()
    history = train(items, engine, learner, score, settings(steps=5), sink)
    assert learner.overlapped == [True] * 4  # every step but the last had the next one generating
    assert [m["async/policy_lag"] for m in history] == [0, 1, 1, 1, 1]
    assert engine.overlaps == 0  # one generation at a time
    assert [m["policy_version"] for m in history] == [1, 2, 3, 4, 5] == engine.updates


def test_async_steps_see_the_same_items_and_positions_as_sync():
    def run(lag):
        items, engine = _items(["mixed"] * 5)
        learner, positions = RecordingLearner(), []
        train(items, engine, learner, score, settings(steps=6, lag=lag), Sink(),
              on_step_end=lambda step, metrics, at: positions.append(at.position))
        uids = [[g.prompt_ids for g in batch] for batch in learner.batches]
        return uids, positions

    assert run(1) == run(0) == run(3)


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_rollouts_never_run_more_than_the_lag_ahead(lag):
    items, engine = _watched(["mixed"] * 4)
    history = train(items, engine, RecordingLearner(), score, settings(steps=8, lag=lag), Sink())
    assert max(m["async/policy_lag"] for m in history) <= lag
    # step k's rollouts waited for steps .. k - lag - 1 to be learned and synced
    assert all(version >= step - lag for step, (version, _) in enumerate(engine.generated))


def test_a_failed_rollout_stops_the_run_with_its_error():
    items, engine = _items(["mixed"] * 4)
    generate = engine.generate

    def failing(prompts, n, sampling):
        if len(engine.calls) == 2:
            raise OSError("engine lost")
        return generate(prompts, n, sampling)

    engine.generate = failing
    learner = RecordingLearner()
    with pytest.raises(RuntimeError, match="rollouts of step 2 failed") as failed:
        train(items, engine, learner, score, settings(steps=5), Sink())
    assert isinstance(failed.value.__cause__, OSError)
    assert len(learner.batches) == 2  # the steps before it were learned


def test_evaluation_never_overlaps_a_rollout():
    items, engine = _watched(["mixed"] * 4)
    seen = []

    def evaluate(step):
        seen.append(engine.busy)
        engine.generate([items[0].prompt], 1, SamplingParams())  # the raw engine, as train.py's does
        return {"eval/overall": 0.5}

    history = train(items, engine, RecordingLearner(), score, settings(steps=6), Sink(), evaluate=evaluate)
    assert seen == [False] * 6 and engine.overlaps == 0
    assert all("eval/overall" in m for m in history)


def test_a_stopped_run_ends_its_rollout_thread():
    items, engine = _items(["mixed"] * 4)

    class Stop(Exception):
        pass

    def stop(step, metrics, at):
        if step == 1:
            raise Stop

    before = threading.active_count()
    with pytest.raises(Stop):
        train(items, engine, RecordingLearner(), score, settings(steps=50), Sink(), on_step_end=stop)
    assert threading.active_count() == before
    assert len(engine.calls) <= 3  # steps 0, 1 and at most the one ahead
