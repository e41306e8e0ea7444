"""The trainer's actor groups on a real local Ray cluster (CPU), with a tiny model, once per
weight-sync transport the trainer uses on CPU (the object store, auto's pick on one node, and
gloo, its pick across nodes).

After every step the engines hold the learner's adapter bit for bit under its version; a
killed verifier and a killed rollout engine are restarted (the gloo group rebuilt with the new
engine) and the run completes.
"""

import pytest
import ray
import torch

from cluster.build import build_ray
from rl.config import load_config
from rl.loop import LoopSettings, TrainItem, train
from rl.records import Prompt, SamplingParams
from verifiers.rewards import Example

from tests.tiny import build_word_model


@pytest.fixture(scope="module", params=["object_store", "gloo"])
def ray_run(tmp_path_factory, request):
    path, tokenizer = build_word_model(tmp_path_factory.mktemp("word-llama"))
    run = tmp_path_factory.mktemp("run")
    config = load_config(None, [f"model.name_or_path={path}", "lora.rank=4", "lora.alpha=8",
                                "learner.lr=0.01", "learner.warmup_fraction=0", "rollout.num_engines=2",
                                "cluster.num_verifiers=2", "cluster.cpus_per_learner=1",
                                "cluster.cpus_per_engine=0.5", "upstream.provider=local",
                                f"upstream.model={path}", f"logging.run_dir={run}",
                                f"cluster.weight_sync={request.param}"])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    parts = build_ray(config, run)
    assert parts.engine.sync.kind == request.param
    try:
        yield parts, tokenizer
    finally:
        parts.shutdown()
        ray.shutdown()


def _items(tokenizer):
    texts = ["red blue", "one two", "cat dog", "sun moon"]
    return [TrainItem(f"p{i}", Prompt(tokenizer(t)["input_ids"], t, ""), Example(truth=0), "synthetic")
            for i, t in enumerate(texts)]


def _assert_engines_match(parts):
    tensors = parts.learner.export_adapter()
    for state in parts.engine.adapter_states():
        assert state.keys() == tensors.keys()
        assert all(torch.equal(state[name], tensors[name]) for name in tensors)


class Sink:
    def log(self, step, metrics):
        pass




@pytest.mark.slow
def test_engines_follow_the_learner_bit_for_bit_and_faults_are_survived(ray_run):
    parts, tokenizer = ray_run
    settings = LoopSettings(steps=1, prompts_per_step=2, group_size=4,
                            sampling=SamplingParams(max_new_tokens=2, temperature=1.0, seed=0),
                            filter_zero_variance=False)
    versions = []

    def after_step(step, metrics, stream):
        _assert_engines_match(parts)
        versions.append((metrics["policy_version"], parts.engine.policy_version))
        assert metrics["sync/bytes"] == sum(t.numel() * t.element_size()
                                            for t in parts.learner.export_adapter().values())

    items = _items(tokenizer)
    train(items, parts.engine, parts.learner, parts.score, settings, Sink(), on_step_end=after_step)
    ray.kill(parts.score.actors[0], no_restart=False)  # a verifier crash: restarted, task retried
    ray.kill(parts.engine.actors[1], no_restart=False)  # an engine crash: restarted, re-synced
    settings = LoopSettings(steps=3, prompts_per_step=2, group_size=4,
                            sampling=SamplingParams(max_new_tokens=2, temperature=1.0, seed=0),
                            filter_zero_variance=False)
    train(items, parts.engine, parts.learner, parts.score, settings, Sink(), on_step_end=after_step,
          start_step=1)
    assert [v for v, _ in versions] == [1, 2, 3]
    assert all(learner == engine for learner, engine in versions)
    states = ray.get([a.policy_version.remote() for a in parts.engine.actors])
    assert states == [3, 3]


@pytest.mark.slow
def test_async_rollouts_on_ray_lag_at_most_one_version(ray_run):
    parts, tokenizer = ray_run
    start = parts.learner.policy_version
    settings = LoopSettings(steps=4, prompts_per_step=2, group_size=4,
                            sampling=SamplingParams(max_new_tokens=2, temperature=1.0, seed=0),
                            filter_zero_variance=False, max_policy_lag=1)

    def after_step(step, metrics, stream):
        _assert_engines_match(parts)  # the rollouts ahead only read the weights
        assert parts.engine.policy_version == metrics["policy_version"]

    history = train(_items(tokenizer), parts.engine, parts.learner, parts.score, settings, Sink(),
                    on_step_end=after_step)
    assert [m["policy_version"] for m in history] == [start + 1, start + 2, start + 3, start + 4]
    lags = [m["async/policy_lag"] for m in history]
    assert lags[0] == 0 and set(lags) <= {0, 1}
    assert 1 in lags  # a batch made while the step before it learned (all of them, in practice)


@pytest.mark.slow
def test_an_engine_killed_with_rollouts_in_flight_never_feeds_a_stale_rollout(ray_run):
    """Async mode (lag bound 1): engine 0 is killed while the rollouts of the next step are being
    made (right after a step ends, when the rollouts-ahead thread is sampling). No step trains on
    a rollout older than the bound, the versions stay consecutive, the engines end on the
    learner's adapter. (When the kill lands inside a generate call, cluster.groups resamples
    after a push: tests/cluster/test_groups.py.)"""
    import threading
    import time

    parts, tokenizer = ray_run
    start = parts.learner.policy_version
    settings = LoopSettings(steps=start + 5, prompts_per_step=2, group_size=4,  # steps counts from 0
                            sampling=SamplingParams(max_new_tokens=2, temperature=1.0, seed=0),
                            filter_zero_variance=False, max_policy_lag=1)
    kills = []

    def after_step(step, metrics, stream):
        assert parts.engine.policy_version == metrics["policy_version"]
        if step in (start + 1, start + 3):  # the batch of a later step is being sampled now
            killer = threading.Thread(target=lambda: (time.sleep(0.01), ray.kill(parts.engine.actors[0],
                                                                                 no_restart=False)))
            killer.start()
            kills.append(killer)

    history = train(_items(tokenizer), parts.engine, parts.learner, parts.score, settings, Sink(),
                    on_step_end=after_step, start_step=start)
    for killer in kills:
        killer.join()
    assert len(kills) == 2
    assert [m["policy_version"] for m in history] == list(range(start + 1, start + 6))
    assert {m["async/policy_lag"] for m in history} <= {0, 1}
    _assert_engines_match(parts)
    assert ray.get([a.policy_version.remote() for a in parts.engine.actors]) == [start + 5] * 2
