"""Weight sync to engines on the learner's own GPU, by CUDA IPC (see ``cluster.weight_sync``).

NCCL refuses two ranks on one device, and copying through the host would cross PCIe twice, so
the learner packs the buckets into fresh buffers on its GPU and hands out IPC handles
(``torch.multiprocessing.reductions.reduce_tensor``); each engine opens them on the same card
and gets views into the learner's buffers, which ``update_adapter`` copies device to device.

The buffers are never written after the push, and the sender keeps the latest push's buffers
alive until its next push, so the controller must let every engine apply a push before it
starts the next one (``sync_round`` does).

Device numbering: Ray gives each actor its own ``CUDA_VISIBLE_DEVICES``, so the card the
learner calls ``cuda:k`` may be ``cuda:j`` to an engine. The handle carries the learner's index
(argument 6, ``storage_device``, of ``rebuild_cuda_tensor``); the receiver replaces it with the
index of the card whose UUID matches. ``tests/cluster/test_weight_sync.py`` checks that argument's
name, so a change in torch fails there rather than here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from cluster.weight_sync import (
    DEFAULT_BUCKET_BYTES, SyncHeader, SyncStats, WeightReceiver, WeightSender, make_header,
    pack_bucket, unpack,
)

DEVICE_ARG = 6  # index of ``storage_device`` in rebuild_cuda_tensor's arguments


@dataclass(frozen=True)
class IpcTicket:
    """One push: the header, one ``(rebuild_fn, args)`` per bucket, the card's UUID."""

    header: SyncHeader
    handles: tuple[tuple[Callable[..., Tensor], tuple[Any, ...]], ...]
    device_uuid: str


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int:
    """This process's index of the card with ``uuid``."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise RuntimeError(f"GPU {uuid} is not visible here: CUDA IPC needs the engine on the "
                       "learner's card (use nccl or the object store otherwise)")


class CudaIpcSender(WeightSender):
    """Packs the buckets on ``device`` (the learner's GPU) and returns their IPC handles."""

    def __init__(self, device: str | torch.device = "cuda",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bucket_bytes = bucket_bytes
        self._live: list[Tensor] = []  # the latest push's buffers, alive until the next push

    def push(self, version: int, tensors: dict[str, Tensor]) -> SyncStats:
        from torch.multiprocessing.reductions import reduce_tensor

        start = time.perf_counter()
        header = make_header(version, tensors, self.bucket_bytes)
        # clone(): a one-tensor bucket may be a view of a live parameter; handles must point at
        # memory that stays as pushed.
        buffers = [pack_bucket(tensors, b).to(self.device).clone() for b in header.buckets]
        torch.cuda.synchronize(self.device)
        handles = tuple(reduce_tensor(buf) for buf in buffers)
        self._live = buffers
        ticket = IpcTicket(header, handles, device_uuid(self.device.index))
        return SyncStats(header.version, header.nbytes, time.perf_counter() - start,
                         len(header.buckets), ticket)


class CudaIpcReceiver(WeightReceiver):
    """Opens a push's handles on the same card; the tensors are views of the learner's buffers
    (copy out of them, never into them)."""

    def receive(self, ticket: Any = None) -> tuple[int, dict[str, Tensor]]:
        if not isinstance(ticket, IpcTicket):
            raise TypeError(f"CUDA IPC needs the push's IpcTicket, got {ticket!r}")
        index = local_index(ticket.device_uuid)
        buffers = []
        for fn, args in ticket.handles:
            args = list(args)
            args[DEVICE_ARG] = index
            buffers.append(fn(*args))
        return ticket.header.version, unpack(ticket.header, buffers)
