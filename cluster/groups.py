"""Actor groups on Ray, and the driver-side handles that give them the loop's interfaces.

The loop in ``rl/loop.py`` talks to one rollout engine, one learner and one scorer.
:class:`EngineGroup`, :class:`LearnerGroup` and :class:`VerifierPool` are those three, backed by
groups of actors: they fan a call out to every actor and gather the results once, and they
slice the data before it is put in the object store (each engine receives only its prompts).

Faults: verifier actors restart when they die and their tasks are retried (``max_restarts``,
``max_task_retries``), so a crashed verifier costs a retry, not the run. Rollout engines
restart too (they reload the base model; before the next generation the weight-sync
transport is opened anew, every rank of a gloo/NCCL group included, and the current adapter
pushed); a generate call that was running on an engine that died is retried once by Ray, on
the restarted engine, which then still holds its initial adapter: completions stamped with
another version than the group's are never returned, the call is made again after the push
(so the async mode never trains on a rollout older than its bound). An engine
whose node leaves the cluster cannot restart where the plan pinned it: it is dropped, the
transport rebuilt with the rest, and its prompts go to the engines that remain (the run goes
on while one is left). A dead learner ends the run (its optimizer state lives only there):
resume from the last checkpoint.

Nothing passes between hosts through a filesystem: the learner's adapter and checkpoint files
come to the driver as values and are written where it runs (and sent back on resume).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Sequence

import ray

from rl.files import folder_files, write_files

if TYPE_CHECKING:
    from cluster.weight_sync import SyncStats



def make_group(cls, count: int, options: Callable[[int], dict], *args, **kwargs) -> list:
    """``count`` actors of ``cls``, the i-th created with ``options(i)``."""
    remote_cls = ray.remote(cls)
    return [remote_cls.options(**options(i)).remote(*args, **kwargs) for i in range(count)]


def _shards(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, near-equal slices of ``range(n_items)``."""
    size, extra = divmod(n_items, n_shards)
    bounds, start = [], 0
    for shard in range(n_shards):
        stop = start + size + (shard < extra)
        bounds.append(range(start, stop))
        start = stop
    return bounds


class EngineLost(Exception):
    """Engines were dropped because their node left the cluster: redo the call without them."""


class EngineRestarted(Exception):
    """An engine restarted during the call and served its initial adapter: push, then redo it."""


class EngineGroup:
    """Rollout engines as one :class:`rl.interfaces.RolloutEngine`; ``sync``: the learner's
    weight-sync transport to them (:class:`LearnerPush`); ``nodes``: each engine's Ray node
    (its loss is watched every ``liveness_s`` while a call waits); ``verify``: after every push,
    check each engine's adapter against the learner's by digest (``SyncStats.verified``)."""

    def __init__(self, actors: Sequence, sync: LearnerPush, nodes: Sequence[str] | None = None,
                 verify: bool = False, liveness_s: float = 5.0, grace_s: float = 45.0):
        self.actors = list(actors)
        self.nodes = list(nodes) if nodes is not None else [None] * len(self.actors)
        self.sync, self.verify, self.liveness_s, self.grace_s = sync, verify, liveness_s, grace_s
        self.policy_version = ray.get(self.actors[0].policy_version.remote())

    def _drop_lost(self) -> bool:
        """Drop the engines whose node has left the cluster and rebuild the transport with the
        others (they hold the current adapter: no push needed); whether any was dropped."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        lost = [i for i, node in enumerate(self.nodes) if node is not None and node not in alive]
        if not lost:
            return False
        for i in reversed(lost):
            ray.kill(self.actors[i], no_restart=True)
            del self.actors[i], self.nodes[i]
        print(f"rollout engines {lost} lost with their node; going on with {len(self.actors)}", flush=True)
        if not self.actors:
            raise RuntimeError("every rollout engine's node has left the cluster")
        self.sync.engines = list(self.actors)
        self.sync.open()
        return True

    def _gather(self, refs: list) -> list:
        """``ray.get(refs)``, watching the engines' nodes while waiting: a call to an engine
        whose node is gone never returns (the engine waits to restart on it), so every
        ``liveness_s`` the nodes are checked. On a lost node (also one Ray notices up to
        ``grace_s`` after an engine died), the engines are dropped and :class:`EngineLost`
        raised; any other error goes to the caller as it is."""
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=self.liveness_s)
            if pending and self._drop_lost():
                raise EngineLost
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as error:
            if error.actor_id not in {actor._actor_id.hex() for actor in self.actors}:
                raise  # not an engine (the learner, mid-push): nothing to wait for
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                if self._drop_lost():
                    raise EngineLost from None
                time.sleep(self.liveness_s)
            raise

    def _resync_restarted(self) -> None:
        """An engine that restarted came back with the initial adapter and no transport: open
        the transport anew (a collective group must be rebuilt with every rank) and push."""
        versions = self._gather([actor.policy_version.remote() for actor in self.actors])
        if any(v != self.policy_version for v in versions):
            self.sync.open()
            self.policy_version = self.sync.push(self._gather).version

    def _retrying(self, call: Callable):
        while True:
            try:
                return call()
            except (EngineLost, EngineRestarted):
                continue

    def generate(self, prompts, n, sampling):
        return self._retrying(lambda: self._generate(prompts, n, sampling))

    def _generate(self, prompts, n, sampling):
        self._resync_restarted()
        shards = [s for s in _shards(len(prompts), len(self.actors)) if len(s)]
        refs = [actor.generate.remote([prompts[i] for i in shard], n, sampling)
                for actor, shard in zip(self.actors, shards)]
        completions = []
        for shard, part in zip(shards, self._gather(refs)):
            completions += [dataclasses.replace(c, prompt_index=shard.start + c.prompt_index) for c in part]
        stale = {c.policy_version for c in completions} - {self.policy_version}
        if stale:
            print(f"rollout engine restarted mid-call (served version {sorted(stale)}, the run is at "
                  f"{self.policy_version}): pushing the adapter and sampling again", flush=True)
            raise EngineRestarted
        return completions

    def sync_from(self, learner) -> SyncStats:
        """The learner's current adapter, sent by its actor straight to every engine."""
        return self._retrying(lambda: self._sync_from(learner))

    def _sync_from(self, learner) -> SyncStats:
        self._resync_restarted()
        stats = self.sync.push(self._gather)
        self.policy_version = stats.version
        if self.verify:
            digest = learner.adapter_digest()
            held = self._gather([actor.adapter_digest.remote() for actor in self.actors])
            wrong = [i for i, d in enumerate(held) if d != (stats.version, digest)]
            if wrong:
                raise RuntimeError(f"after the push of version {stats.version}, engines {wrong} hold "
                                   f"another adapter than the learner's: {held}")
            stats = dataclasses.replace(stats, verified=True)
        return stats

    def update_adapter(self, version: int, tensors: dict) -> None:
        """Tensors held by the driver, through the object store (one ``ray.put``)."""
        ref = ray.put(tensors)
        versions = ray.get([actor.load_adapter.remote(version, ref) for actor in self.actors])
        assert all(v == version for v in versions), f"engines report versions {versions}, sent {version}"
        self.policy_version = version

    def adapter_states(self) -> list[dict]:
        return ray.get([actor.adapter_state.remote() for actor in self.actors])


class LearnerGroup:
    """Data-parallel learner ranks as one :class:`rl.interfaces.Learner`.

    A step's groups are dealt to the ranks by size (largest first, each to the rank with the
    fewest tokens so far), every rank runs its share at once, and DeepSpeed's all-reduce in the
    step averages their gradients, each rank's loss weighted by its share of the batch's
    normaliser (actors/learner.py), so N ranks take the step one rank would. The weights stay
    equal on every rank: rank 0 exports, pushes and saves the adapter; every rank saves its
    own optimizer state."""

    def __init__(self, actors: Sequence):
        self.actors = list(actors)
        self.actor = self.actors[0]
        address = ray.get(self.actor.rendezvous.remote())
        versions = ray.get([actor.start.remote(address) for actor in self.actors])
        assert len(set(versions)) == 1, f"learner ranks start at versions {versions}"
        self.policy_version = versions[0]

    def _deal(self, groups) -> list[list]:
        shares = [[] for _ in self.actors]
        tokens = [0] * len(self.actors)
        for group in sorted(groups, key=_tokens, reverse=True):
            rank = tokens.index(min(tokens))
            shares[rank].append(group)
            tokens[rank] += _tokens(group)
        return shares

    def train_step(self, groups, objective="grpo"):
        if len(self.actors) == 1:
            stats, self.policy_version = ray.get(self.actor.train_step.remote(groups, objective))
            return stats
        results = ray.get([actor.train_step.remote(share, objective)
                           for actor, share in zip(self.actors, self._deal(groups))])
        versions = {version for _, version in results}
        assert len(versions) == 1, f"learner ranks disagree on the version: {versions}"
        self.policy_version = versions.pop()
        return merge_stats([stats for stats, _ in results])

    def export_adapter(self) -> dict:
        version, tensors = ray.get(self.actor.export_adapter.remote())
        assert version == self.policy_version
        return tensors

    def adapter_digest(self) -> str:
        version, digest = ray.get(self.actor.adapter_digest.remote())
        assert version == self.policy_version
        return digest

    def save_adapter(self, path) -> str:
        """Rank 0's adapter folder, written here (where the driver runs)."""
        return str(write_files(path, ray.get(self.actor.adapter_files.remote())))

    def save_state(self, folder) -> None:
        """Every rank's part of a checkpoint, written here (rank 0 adds the adapter)."""
        for files in ray.get([actor.state_files.remote() for actor in self.actors]):
            write_files(folder, files)

    def configure_stage(self, **settings) -> None:
        """A curriculum stage's settings on every rank (rl/curriculum.py)."""
        ray.get([actor.configure_stage.remote(**settings) for actor in self.actors])

    def load_state(self, folder) -> None:
        files = ray.put(folder_files(folder))  # read here, sent to every rank's host
        versions = ray.get([actor.load_state_files.remote(files) for actor in self.actors])
        assert len(set(versions)) == 1, f"learner ranks loaded versions {versions}"
        self.policy_version = versions[0]


def _tokens(group) -> int:
    return len(group.prompt_ids) + sum(len(c) for c in group.completions)


def merge_stats(parts: Sequence):
    """One step's stats from its ranks' (actors/learner.py's LearnStats): tokens add up, the
    loss is the ranks' mean (each rank's is its share of the batch loss times the ranks, which
    the gradient all-reduce averages), the per-token means are token-weighted, the gradient
    norm is rank 0's (before the all-reduce), the GPU memory peak the largest rank's."""
    tokens = sum(p.tokens for p in parts)
    weighted = lambda name: sum(getattr(p, name) * p.tokens for p in parts) / max(1, tokens)  # noqa: E731
    return dataclasses.replace(parts[0], loss=sum(p.loss for p in parts) / len(parts), tokens=tokens,
                               kl=weighted("kl"),
                               clip_fraction=weighted("clip_fraction"), entropy=weighted("entropy"),
                               micro_batches=sum(p.micro_batches for p in parts),
                               seconds=max(p.seconds for p in parts),
                               gpu_peak_gb=max((p.gpu_peak_gb for p in parts if p.gpu_peak_gb is not None),
                                               default=None))


class VerifierPool:
    """Scores (text, example) pairs on CPU verifier actors, chunked round the pool."""

    def __init__(self, actors: Sequence):
        self.actors = list(actors)

    def __call__(self, pairs: Sequence) -> list:
        shards = [s for s in _shards(len(pairs), len(self.actors)) if len(s)]
        refs = [actor.score.remote([pairs[i] for i in shard]) for actor, shard in zip(self.actors, shards)]
        return [result for part in ray.get(refs) for result in part]


class LearnerPush:
    """Weight sync from the learner actor to the engine actors over ``kind`` (``gloo``,
    ``nccl``, ``cuda_ipc`` or ``object_store``, :mod:`cluster.weight_sync`): the tensors go
    from the learner's process to the engines' without passing through the driver. The learner
    is rank 0 and engine i rank i + 1 of a collective transport."""

    def __init__(self, kind: str, learner_actor, engine_actors: Sequence, timeout_s: float = 300.0):
        self.kind, self.learner, self.engines, self.timeout_s = kind, learner_actor, list(engine_actors), timeout_s
        self.open()

    def open(self) -> None:
        """(Re)build both ends, the learner's first (it hosts a collective group's store), then
        every engine's; a collective group connects on the first push."""
        world = len(self.engines) + 1
        address = ray.get(self.learner.open_weight_sync.remote(self.kind, world, self.timeout_s))
        ray.get([engine.open_weight_sync.remote(self.kind, address, rank, world, self.timeout_s)
                 for rank, engine in enumerate(self.engines, start=1)])

    def push(self, get: Callable = ray.get) -> SyncStats:
        """One push; ``get`` gathers the ObjectRefs (EngineGroup's watches the engines' nodes)."""
        from cluster.weight_sync import sync_round

        stats, versions = sync_round(self.kind, self.learner.push_weights.remote,
                                     [lambda ticket, e=e: e.sync.remote(ticket) for e in self.engines], get)
        assert all(v == stats.version for v in versions), f"engines report {versions}, pushed {stats.version}"
        return stats


def engine_options(plan, pg, index: int) -> dict:
    from cluster.placement import scheduling_for

    return {**scheduling_for(plan, pg, "rollout", index), "max_restarts": 2, "max_task_retries": 1}


def learner_options(plan, pg, index: int) -> dict:
    from cluster.placement import scheduling_for

    return {**scheduling_for(plan, pg, "learner", index), "max_restarts": 0}


def verifier_options(plan, pg, index: int) -> dict:
    from cluster.placement import scheduling_for

    return {**scheduling_for(plan, pg, "verifier", index), "max_restarts": -1, "max_task_retries": 3}

