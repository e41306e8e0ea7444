"""What runs inside each actor: thin hosts around the plain classes of ``actors/``.

A host builds its object inside the actor process (so model weights are loaded where they are
used, never pickled through the driver), sets the process's torch thread count from the CPUs
the actor reserved (two OpenMP pools on two cores run far slower than one), and turns
attributes into methods, which is all Ray can call. ``ray.remote`` is applied where a group is
built (:mod:`cluster.groups`); every host also works as a plain object in-process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from typing import Sequence


def _set_threads(cpus: float) -> None:
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _pin_interface(name: str | None) -> None:
    """Use network interface ``name`` for gloo and NCCL (None: the one holding the node's Ray
    address, found when a group is built: cluster/weight_sync_dist.py)."""
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = name


def _files_of(save) -> dict[str, bytes]:
    """What ``save(folder)`` writes, as a value (rl/files.py): the driver writes it where it
    runs, so that nothing passes between hosts through a filesystem."""
    from rl.files import folder_files

    with tempfile.TemporaryDirectory(prefix="api-adapter-") as tmp:
        save(tmp)
        return folder_files(tmp)


def _close(end) -> None:
    """Close a weight-sync end that holds a connection (a process group); others hold none."""
    if end is not None and hasattr(end, "close"):
        end.close()


class EngineHost:
    """A rollout engine (``kind``: hf or vllm, :mod:`actors.engines`) in its own actor."""

    def __init__(self, kind: str, engine_kwargs: dict, cpus: float = 1.0, socket_interface: str | None = None):
        from actors.engines import build_engine

        _set_threads(cpus)
        _pin_interface(socket_interface)
        self.engine = build_engine(kind, engine_kwargs)
        self.receiver = None

    def generate(self, prompts, n, sampling):
        return self.engine.generate(prompts, n, sampling)

    def open_weight_sync(self, kind: str, address=None, rank: int = 1, world_size: int = 2,
                         timeout_s: float = 300.0) -> None:
        """Become rank ``rank`` of a weight-sync transport (closing the previous one)."""
        from cluster.transports import make_receiver

        _close(self.receiver)
        self.receiver = make_receiver(kind, address, rank, world_size, str(self.engine.device), timeout_s)

    def sync(self, ticket) -> int:
        """Receive the learner's push (its ticket, or None on a collective transport) and swap
        the adapter in between generations."""
        version, tensors = self.receiver.receive(ticket)
        self.engine.update_adapter(version, tensors)
        return self.engine.policy_version

    def load_adapter(self, version: int, tensors: dict) -> int:
        """Swap in tensors sent by the driver (through the object store)."""
        self.engine.update_adapter(version, tensors)
        return self.engine.policy_version

    def adapter_state(self) -> dict:
        return {name: t.clone() for name, t in self.engine.adapter_state().items()}

    def adapter_digest(self) -> tuple[int, str]:
        from cluster.weight_sync import adapter_digest

        return self.engine.policy_version, adapter_digest(self.engine.adapter_state())

    def policy_version(self) -> int:
        return self.engine.policy_version


class LearnerHost:
    """One rank of the DeepSpeed + PEFT learner in its own actor.

    Started in two calls, since the ranks meet at rank 0's address: :meth:`rendezvous` (on
    rank 0: its node's Ray IP and a free port there), then :meth:`start` on every rank at once,
    which builds the learner inside DeepSpeed's process group of ``world_size`` ranks -- never
    a port or rank inherited from whatever environment started the Ray cluster."""

    def __init__(self, learner_kwargs: dict, cpus: float = 1.0, rank: int = 0, world_size: int = 1,
                 socket_interface: str | None = None):
        _set_threads(cpus)
        _pin_interface(socket_interface)
        self.kwargs, self.rank, self.world_size = learner_kwargs, rank, world_size
        self.learner = self.sender = None

    def rendezvous(self) -> tuple[str, int]:
        from actors.distributed import free_port

        if self.world_size == 1:
            return "127.0.0.1", free_port()
        from cluster.weight_sync_dist import node_ip

        ip = node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def start(self, address: tuple[str, int]) -> int:
        """Build the learner as rank ``rank`` of the group at ``address``; its policy version."""
        from actors.learner import Learner

        if self.world_size > 1:  # gloo must use the interface that holds this node's Ray IP
            from cluster.weight_sync_dist import node_ip, pin_socket_interface

            pin_socket_interface("gloo", node_ip())
        os.environ.update(MASTER_ADDR=address[0], MASTER_PORT=str(address[1]), RANK=str(self.rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(self.world_size))
        self.learner = Learner(**self.kwargs)
        return self.learner.policy_version

    def train_step(self, groups, objective="grpo"):
        stats = self.learner.train_step(groups, objective)
        return stats, self.learner.policy_version

    def export_adapter(self) -> tuple[int, dict]:
        return self.learner.policy_version, self.learner.export_adapter()

    def open_weight_sync(self, kind: str, world_size: int, timeout_s: float = 300.0):
        """Become the sending end (rank 0) of a weight-sync transport to ``world_size - 1``
        engines, closing the previous one; returns the address receivers join (or None)."""
        from cluster.transports import make_sender

        _close(self.sender)
        self.sender = make_sender(kind, world_size, str(self.learner.device), timeout_s)
        return getattr(self.sender, "address", None)

    def push_weights(self):
        """Send the adapter under the current version; the sender's SyncStats (with its ticket)."""
        return self.sender.push(self.learner.policy_version, self.learner.export_adapter())

    def adapter_digest(self) -> tuple[int, str]:
        from cluster.weight_sync import adapter_digest

        return self.learner.policy_version, adapter_digest(self.learner.export_adapter())

    def adapter_files(self) -> dict[str, bytes]:
        """The PEFT adapter folder's files (the driver writes them: LearnerGroup.save_adapter)."""
        return _files_of(self.learner.save_adapter)

    def state_files(self) -> dict[str, bytes]:
        """This rank's part of a checkpoint (Learner.save_state), as files."""
        return _files_of(self.learner.save_state)

    def configure_stage(self, **settings) -> None:
        self.learner.configure_stage(**settings)

    def load_state_files(self, files: dict[str, bytes]) -> int:
        """Resume from a checkpoint's files, sent by the driver; the policy version."""
        from rl.files import write_files

        with tempfile.TemporaryDirectory(prefix="api-adapter-") as tmp:
            self.learner.load_state(write_files(tmp, files))
        return self.learner.policy_version

    def policy_version(self) -> int:
        return self.learner.policy_version


class VerifierHost:
    """Scores completions with a reward from the registry (CPU only, no torch)."""

    def __init__(self, reward: str):
        from verifiers.rewards import get_reward

        self.reward = get_reward(reward)

    def score(self, pairs: Sequence) -> list:
        return [self.reward(text, example) for text, example in pairs]


class UpstreamHost:
    """The one owner of the answer cache: every upstream call of a run goes through here."""

    def __init__(self, provider_kwargs: dict, cache_path: str, concurrency: int, max_requests: int | None = None):
        from actors.upstream import AnswerCache, UpstreamClient, build_provider

        self.cache = AnswerCache(cache_path)
        self.client = UpstreamClient(build_provider(**provider_kwargs), self.cache, concurrency=concurrency,
                                     max_requests=max_requests)

    async def answer_all(self, requests) -> list:
        return await self.client.answer_all_with_progress(list(requests))

    def tally(self) -> dict:
        return dict(vars(self.client.tally))

    async def close(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.cache.close)
