"""Weight sync: the learner's LoRA tensors to the rollout engines, versioned, in dtype buckets.

Only the adapter moves (tens to hundreds of MB, never the base model). One push is:

1. a header first -- ``SyncHeader(version, metas, buckets)``: every tensor's name, shape and
   dtype, and the bucket plan (which tensors sit where in which flat buffer);
2. then the tensors, packed into contiguous flat buffers, one dtype per buffer, each buffer at
   most ``bucket_bytes`` (a tensor larger than that gets a buffer of its own). The receiver
   allocates the buffers from the header and hands back views into them (no second copy).

Buffers travel as their raw bytes (``view(torch.uint8)``), so every dtype arrives bit for bit
whatever the backend supports (gloo lacks the float8 types, for one).

Ends and transports
-------------------
Each transport has two ends with one method each: ``WeightSender.push(version, tensors) ->
SyncStats`` and ``WeightReceiver.receive(ticket) -> (version, tensors)``; the rollout side then
calls ``engine.update_adapter(version, tensors)``, which swaps the whole adapter under the
engine's lock, between two generations (nothing is written into the live adapter before that),
and every completion carries the version it was sampled with.

- ``"gloo"`` / ``"nccl"`` (``cluster.weight_sync_dist``): a torch.distributed group of learner rank 0 and the N
  engines (ranks 1..N); ``push`` and the N ``receive`` calls are one collective and must run
  concurrently (``sync_round`` does that). The group is *stateless*: a ``ProcessGroupGloo`` /
  ``ProcessGroupNCCL`` built on its own ``TCPStore``, never the default group, so it lives beside
  the learner's DeepSpeed group (``init_process_group`` would refuse: the default group exists).
- ``"cuda_ipc"`` (``cluster.weight_sync_ipc``): engines on the learner's own GPU; NCCL cannot put
  two ranks on one device. ``push`` returns handles to the buckets in the learner's GPU memory.
- ``"object_store"``: ``ray.put`` of the header and the buckets (numpy bytes, so same-node readers
  map them without a copy); the fallback when no torch.distributed backend fits.
For the last two, ``push`` returns a ticket (in ``SyncStats.ticket``) that the controller passes
to every ``receive``. :meth:`cluster.placement.Plan.transport` picks one from the placement;
``cluster.transports.make_sender`` / ``make_receiver`` build the ends by name.

Addresses across hosts: see ``cluster.weight_sync_dist`` (the store listens on the node's Ray
IP, and the socket interface is pinned to the one that holds it).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 64 << 20
TRANSPORTS = ("nccl", "gloo", "cuda_ipc", "object_store")
COLLECTIVE = frozenset({"nccl", "gloo"})  # push and receives must run at the same time


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of the adapter: its state-dict name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return _prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of a single dtype: ``names[i]`` occupies elements
    ``offsets[i] : offsets[i] + numel`` of a 1-D buffer of ``numel`` elements."""

    dtype: torch.dtype
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class SyncHeader:
    """What a receiver needs before the bytes: the version, every tensor, the bucket plan."""

    version: int
    metas: tuple[TensorMeta, ...]
    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


@dataclass(frozen=True)
class SyncStats:
    """One push as the sender saw it: payload bytes, seconds from the call to the last byte
    handed over (pack included), bucket count; ``ticket``: what receivers need from this push
    (None for the collective transports); ``verified``: whether every engine's adapter was
    then checked equal to the learner's (:func:`adapter_digest`; None: not checked)."""

    version: int
    bytes: int
    seconds: float
    buckets: int
    ticket: Any = None
    verified: bool | None = None

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes) over ``seconds``."""
        return self.bytes / max(self.seconds, 1e-9) / 1e9


# ---------------------------------------------------------------------------- pure functions


def describe(tensors: dict[str, Tensor]) -> tuple[TensorMeta, ...]:
    """The metas of ``tensors``, in the dict's order."""
    return tuple(TensorMeta(k, tuple(v.shape), v.dtype) for k, v in tensors.items())


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> tuple[Bucket, ...]:
    """Group ``metas`` by dtype (in order of first appearance), keeping their order inside a
    dtype, and cut a new bucket whenever the next tensor would take it past ``bucket_bytes``."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    by_dtype: dict[torch.dtype, list[TensorMeta]] = {}
    for m in metas:
        by_dtype.setdefault(m.dtype, []).append(m)
    buckets: list[Bucket] = []
    for dtype, group in by_dtype.items():
        cap = max(1, bucket_bytes // _itemsize(dtype))
        names: list[str] = []
        offsets: list[int] = []
        size = 0
        for m in group:
            if names and size + m.numel > cap:
                buckets.append(Bucket(dtype, tuple(names), tuple(offsets), size))
                names, offsets, size = [], [], 0
            names.append(m.name)
            offsets.append(size)
            size += m.numel
        if names:
            buckets.append(Bucket(dtype, tuple(names), tuple(offsets), size))
    return tuple(buckets)


def make_header(version: int, tensors: dict[str, Tensor],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncHeader:
    metas = describe(tensors)
    return SyncHeader(int(version), metas, plan_buckets(metas, bucket_bytes))


def pack_bucket(tensors: dict[str, Tensor], bucket: Bucket) -> Tensor:
    """The bucket's flat buffer (1-D, ``bucket.dtype``), on the tensors' device: one copy."""
    parts = [tensors[n].detach().reshape(-1) for n in bucket.names]
    bad = [n for n, p in zip(bucket.names, parts) if p.dtype != bucket.dtype]
    if bad:
        raise TypeError(f"{bad[:3]} are not {bucket.dtype} as the header says")
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def alloc_buckets(header: SyncHeader, device: str | torch.device = "cpu") -> list[Tensor]:
    """Empty buffers for the header's buckets, to receive into."""
    return [torch.empty(b.numel, dtype=b.dtype, device=device) for b in header.buckets]


def unpack(header: SyncHeader, buffers: Sequence[Tensor]) -> dict[str, Tensor]:
    """Every tensor of ``header`` as a view into ``buffers`` (no copy), in the header's order."""
    if len(buffers) != len(header.buckets):
        raise ValueError(f"{len(buffers)} buffers for {len(header.buckets)} buckets")
    shapes = {m.name: m.shape for m in header.metas}
    views: dict[str, Tensor] = {}
    for b, buf in zip(header.buckets, buffers):
        if buf.dtype != b.dtype or buf.dim() != 1 or buf.numel() != b.numel:
            raise ValueError(f"buffer {buf.dtype} {tuple(buf.shape)} does not fit bucket "
                             f"{b.dtype} [{b.numel}]")
        for name, off in zip(b.names, b.offsets):
            shape = shapes[name]
            views[name] = buf[off: off + _prod(shape)].view(shape)
    return {m.name: views[m.name] for m in header.metas}


def adapter_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order): equal
    digests mean bit-for-bit equal adapters, wherever each side lives."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(as_bytes(t.reshape(-1)).numpy().tobytes())
    return digest.hexdigest()


def as_bytes(flat: Tensor) -> Tensor:
    """A 1-D contiguous buffer's raw bytes (a view): what goes over the wire."""
    return flat.view(torch.uint8)


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------- the interface


class WeightSender(ABC):
    """The learner's end: sends a full set of adapter tensors, tagged with ``version``."""

    @abstractmethod
    def push(self, version: int, tensors: dict[str, Tensor]) -> SyncStats: ...


class WeightReceiver(ABC):
    """An engine's end: the next push's version and tensors (views into fresh buffers, which
    nothing else writes into; apply them with ``engine.update_adapter``). ``ticket``: the
    push's ``SyncStats.ticket`` (None for the collective transports)."""

    @abstractmethod
    def receive(self, ticket: Any = None) -> tuple[int, dict[str, Tensor]]: ...


def sync_round(kind: str, push: Callable[[], Any], receives: Sequence[Callable[[Any], Any]],
               get: Callable[[list], list] | None = None) -> tuple[SyncStats, list[Any]]:
    """Run one push on Ray actors: ``push()`` and each ``receives[i](ticket)`` return ObjectRefs
    (e.g. ``lambda: learner.push_weights.remote(v)``, ``lambda t: engine.sync.remote(t)``),
    gathered by ``get`` (a list of refs to their values; default ``ray.get``). Collective
    transports start every end at once; the others hand the push's ticket on."""
    import ray

    get = get or ray.get
    if kind in COLLECTIVE:
        refs = [push(), *(r(None) for r in receives)]
        stats, *done = get(refs)
        return stats, done
    stats = get([push()])[0]
    return stats, get([r(stats.ticket) for r in receives])


# ---------------------------------------------------------------------------- Ray object store


@dataclass(frozen=True)
class ObjectStoreTicket:
    """The ObjectRef of one push's ``(header, [bucket bytes as numpy uint8])``; nested in a
    dataclass so that Ray hands the ref itself to the receiver, which fetches it."""

    ref: Any


class ObjectStoreSender(WeightSender):
    """``ray.put`` of the header and the buckets. Keeps only the latest payload referenced."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        self._latest: Any = None

    def push(self, version: int, tensors: dict[str, Tensor]) -> SyncStats:
        import ray

        start = time.perf_counter()
        header = make_header(version, tensors, self.bucket_bytes)
        arrays = [as_bytes(pack_bucket(tensors, b).cpu()).numpy() for b in header.buckets]
        self._latest = ray.put((header, arrays))
        return SyncStats(header.version, header.nbytes, time.perf_counter() - start,
                         len(header.buckets), ObjectStoreTicket(self._latest))


class ObjectStoreReceiver(WeightReceiver):
    """Fetches a push by its ticket. On ``device="cpu"`` the tensors are views of Ray's shared
    memory (read-only: copy out of them, never into them); elsewhere one copy to ``device``."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def receive(self, ticket: Any = None) -> tuple[int, dict[str, Tensor]]:
        import warnings

        import ray

        if not isinstance(ticket, ObjectStoreTicket):
            raise TypeError(f"the object store needs the push's ObjectStoreTicket, got {ticket!r}")
        header, arrays = ray.get(ticket.ref)
        with warnings.catch_warnings():  # the arrays are read-only shared memory, by design
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            buffers = [torch.from_numpy(a).to(self.device).view(b.dtype)
                       for a, b in zip(arrays, header.buckets)]
        return header.version, unpack(header, buffers)
