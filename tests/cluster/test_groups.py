"""cluster.groups.EngineGroup when an engine restarts in the middle of a generate call.

Ray retries the call on the restarted engine (``max_task_retries``), which holds its initial
adapter again: the completions come back stamped with version 0 while the run is at a later
version. The group must not hand those to the loop (the async mode would train on a rollout
older than its bound): it pushes the adapter and samples again. The engine here is a real Ray
actor that behaves as a restarted one does on its first call; the transport is a stand-in that
records pushes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from cluster.groups import EngineGroup
from rl.records import Completion, Prompt, SamplingParams


@ray.remote(num_cpus=0)
class RestartsMidCall:
    """Holds ``version``; its first generate is served as by a restarted engine (version 0)."""

    def __init__(self, version: int):
        self.version, self.calls = version, 0

    def policy_version(self) -> int:
        return self.version

    def load(self, version: int) -> None:
        self.version = version

    def generate(self, prompts, n, sampling):
        self.calls += 1
        if self.calls == 1:
            self.version = 0  # restarted during the call: the initial adapter
        return [Completion(i, s, [1], [-0.5], "x", "stop", self.version) for i in range(len(prompts))
                for s in range(n)]


class RecordingPush:
    def __init__(self, engines, version: int):
        self.engines, self.version, self.pushes, self.opened = engines, version, 0, 0

    def open(self) -> None:
        self.opened += 1

    def push(self, get):
        get([engine.load.remote(self.version) for engine in self.engines])
        self.pushes += 1
        return SimpleNamespace(version=self.version)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_completions_of_an_engine_restarted_mid_call_are_resampled_after_a_push(local_ray, capsys):
    engines = [RestartsMidCall.remote(3), RestartsMidCall.remote(3)]
    push = RecordingPush(engines, 3)
    group = EngineGroup(engines, push)
    prompts = [Prompt([1, 2], "a"), Prompt([3], "b"), Prompt([4], "c")]
    out = group.generate(prompts, 2, SamplingParams(max_new_tokens=1, temperature=1.0))
    assert {c.policy_version for c in out} == {3}  # never the restarted engines' version 0
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, s) for i in range(3) for s in range(2)]
    assert push.opened == 1 and push.pushes == 1  # one push to the restarted engines, then again
    assert ray.get([e.policy_version.remote() for e in engines]) == [3, 3]
    assert "restarted mid-call (served version [0], the run is at 3)" in capsys.readouterr().out
