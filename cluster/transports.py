"""The weight-sync transports by name: each end built from ``cluster.weight_sync``'s
object-store classes, :mod:`cluster.weight_sync_dist` (gloo, NCCL) or
:mod:`cluster.weight_sync_ipc` (CUDA IPC). Kept apart from ``cluster.weight_sync`` so that the
transports import the shared pieces from it and it imports none of them (no cycle).
"""

from __future__ import annotations

from typing import Any

from cluster.weight_sync import (COLLECTIVE, TRANSPORTS, ObjectStoreReceiver, ObjectStoreSender, WeightReceiver,
                                 WeightSender)


def make_sender(kind: str, world_size: int, device: str = "cpu", timeout_s: float = 300.0) -> WeightSender:
    """The learner's end of transport ``kind`` (``gloo``, ``nccl``, ``cuda_ipc`` or
    ``object_store``) for a group of the learner and ``world_size - 1`` engines; a collective
    transport gives up on a rank after ``timeout_s`` (a dead engine must not hang the learner)."""
    if kind in COLLECTIVE:
        from cluster.weight_sync_dist import TorchDistributedSender

        return TorchDistributedSender(world_size, kind, timeout_s=timeout_s)
    if kind == "cuda_ipc":
        from cluster.weight_sync_ipc import CudaIpcSender

        return CudaIpcSender(device)
    if kind == "object_store":
        return ObjectStoreSender()
    raise ValueError(f"weight-sync transport {kind!r} is not one of {TRANSPORTS}")


def make_receiver(kind: str, address: Any, rank: int, world_size: int, device: str = "cpu",
                  timeout_s: float = 300.0) -> WeightReceiver:
    """Engine ``rank`` (1..world_size-1)'s end of transport ``kind``; ``address``: the
    sender's (collective transports only)."""
    if kind in COLLECTIVE:
        from cluster.weight_sync_dist import TorchDistributedReceiver

        return TorchDistributedReceiver(address, rank, world_size, kind, timeout_s=timeout_s)
    if kind == "cuda_ipc":
        from cluster.weight_sync_ipc import CudaIpcReceiver

        return CudaIpcReceiver()
    if kind == "object_store":
        return ObjectStoreReceiver(device)
    raise ValueError(f"weight-sync transport {kind!r} is not one of {TRANSPORTS}")
