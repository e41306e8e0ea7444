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

- ``"gloo"`` / ``"nccl"``: a torch.distributed group of learner rank 0 (rank 0 here) and the N
  engines (ranks 1..N); ``push`` and the N ``receive`` calls are one collective and must run
  concurrently (``sync_round`` does that). The group is *stateless*: a ``ProcessGroupGloo`` /
  ``ProcessGroupNCCL`` built on its own ``TCPStore``, never the default group, so it lives beside
  the learner's DeepSpeed group (``init_process_group`` would refuse: the default group exists).
- ``"cuda_ipc"`` (``cluster.weight_sync_ipc``): engines on the learner's own GPU; NCCL cannot put
  two ranks on one device. ``push`` returns handles to the buckets in the learner's GPU memory.
- ``"object_store"``: ``ray.put`` of the header and the buckets (numpy bytes, so same-node readers
  map them without a copy); the fallback when no torch.distributed backend fits.
For the last two, ``push`` returns a ticket (in ``SyncStats.ticket``) that the controller passes
to every ``receive``. ``choose_transport`` picks one from the placement.

Addresses across hosts
----------------------
The group's store listens on the learner's node IP as Ray knows it
(``ray.util.get_node_ip_address()``), never "localhost". Gloo picks the address each rank
announces from the hostname unless told otherwise, and on many hosts the hostname resolves to
127.0.0.1, so peers on other nodes would dial their own loopback. Each end therefore sets
``GLOO_SOCKET_IFNAME`` (``NCCL_SOCKET_IFNAME`` for NCCL's bootstrap) to the interface that holds
its node IP, unless the variable is already set (an explicit choice wins).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
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
    (None for the collective transports)."""

    version: int
    bytes: int
    seconds: float
    buckets: int
    ticket: Any = None

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


def choose_transport(shared_card: bool, gpus: bool,
                     backend_available: Callable[[str], bool] | None = None) -> str:
    """The transport for an engine placed relative to the learner.

    shared_card: the engine runs on the learner's GPU (fractional packing); gpus: both ends hold
    GPUs; backend_available: ``torch.distributed.is_backend_available`` unless given.

    >>> choose_transport(True, True, lambda b: True)
    'cuda_ipc'
    >>> choose_transport(False, True, lambda b: True)
    'nccl'
    >>> choose_transport(False, False, lambda b: b == "gloo")
    'gloo'
    >>> choose_transport(False, True, lambda b: False)
    'object_store'
    """
    if shared_card and not gpus:
        raise ValueError("shared_card=True needs gpus=True: only GPUs are shared")
    available = backend_available or torch.distributed.is_backend_available
    if shared_card:
        return "cuda_ipc"
    if gpus and available("nccl"):
        return "nccl"
    if not gpus and available("gloo"):
        return "gloo"
    return "object_store"


def sync_round(kind: str, push: Callable[[], Any], receives: Sequence[Callable[[Any], Any]]
               ) -> tuple[SyncStats, list[Any]]:
    """Run one push on Ray actors: ``push()`` and each ``receives[i](ticket)`` return ObjectRefs
    (e.g. ``lambda: learner.push_weights.remote(v)``, ``lambda t: engine.sync.remote(t)``).
    Collective transports start every end at once; the others hand the push's ticket on."""
    import ray

    if kind in COLLECTIVE:
        stats_ref = push()
        done = [r(None) for r in receives]
        return ray.get(stats_ref), ray.get(done)
    stats = ray.get(push())
    return stats, ray.get([r(stats.ticket) for r in receives])


# ---------------------------------------------------------------------------- addresses


def node_ip() -> str:
    """This node's IP as Ray knows it (the address other nodes reach it at)."""
    import ray

    return ray.util.get_node_ip_address()


def interface_for_ip(ip: str) -> str | None:
    """The name of the network interface holding IPv4 address ``ip`` (Linux), else None.
    Primary addresses via the SIOCGIFADDR ioctl; secondary ones via ``ip -o -4 addr``."""
    import fcntl

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
            if addr == ip:
                return name
    try:
        lines = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                               timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    for line in lines:  # "4: eth0    inet 10.0.0.2/24 brd ... scope global eth0"
        fields = line.split()
        if len(fields) > 3 and fields[2] == "inet" and fields[3].split("/")[0] == ip:
            return fields[1]
    return None


def pin_socket_interface(backend: str, ip: str) -> str:
    """Set ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` to the interface holding ``ip`` unless
    already set; returns the interface the backend will use."""
    var = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}[backend]
    if os.environ.get(var):
        return os.environ[var]
    name = interface_for_ip(ip)
    if name is None:
        raise RuntimeError(f"no network interface holds {ip}; set {var} to the one peers reach")
    os.environ[var] = name
    return name


# ---------------------------------------------------------------------------- torch.distributed


class _Group:
    """A stateless process group (not the default group) on its own TCPStore; rank 0 hosts it."""

    def __init__(self, backend: str, address: tuple[str, int], rank: int, world_size: int,
                 store: Any, timeout: timedelta) -> None:
        if backend not in COLLECTIVE:
            raise ValueError(f"backend must be one of {sorted(COLLECTIVE)}, got {backend!r}")
        self.backend, self.address, self.rank, self.world_size = backend, address, rank, world_size
        self.timeout = timeout
        self.store = store
        self.pg: Any = None
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else torch.device("cpu"))

    def connect(self, ip: str) -> None:
        """Build the group; blocks until every rank has called it."""
        if self.pg is not None:
            return
        import torch.distributed as dist

        pin_socket_interface(self.backend, ip)
        if self.store is None:
            self.store = dist.TCPStore(self.address[0], self.address[1], self.world_size,
                                       is_master=False, timeout=self.timeout)
        store = dist.PrefixStore("weight_sync", self.store)
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, self.timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
            self.pg.eager_connect_single_device(self.device)

    def broadcast(self, t: Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def close(self) -> None:
        if self.pg is not None:
            self.pg.shutdown()
        self.pg = self.store = None


class TorchDistributedSender(WeightSender):
    """Rank 0 of a group of the learner and ``world_size - 1`` engines (see the module
    docstring). The store starts here, on a free port of this node's IP (``address``); pass that
    to the receivers. The group is built on the first push (or ``connect()``), which must meet
    every receiver's first ``receive`` (or ``connect()``)."""

    def __init__(self, world_size: int, backend: str = "gloo", *, host: str | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        self.ip = host or node_ip()
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(self.ip, 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        self.group = _Group(backend, (self.ip, store.port), 0, world_size, store, timeout)
        self.bucket_bytes = bucket_bytes

    @property
    def address(self) -> tuple[str, int]:
        return self.group.address

    def connect(self) -> None:
        self.group.connect(self.ip)

    def push(self, version: int, tensors: dict[str, Tensor]) -> SyncStats:
        start = time.perf_counter()
        self.connect()
        header = make_header(version, tensors, self.bucket_bytes)
        blob = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
        dev = self.group.device
        self.group.broadcast(torch.tensor([blob.numel()], dtype=torch.int64, device=dev))
        self.group.broadcast(blob.to(dev))
        for bucket in header.buckets:  # packed one at a time: at most one bucket extra in memory
            if bucket.numel:
                self.group.broadcast(as_bytes(pack_bucket(tensors, bucket).to(dev)))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return SyncStats(header.version, header.nbytes, time.perf_counter() - start,
                         len(header.buckets))

    def close(self) -> None:
        self.group.close()


class TorchDistributedReceiver(WeightReceiver):
    """Rank ``rank`` (1..world_size-1) of the sender's group, at the sender's ``address``."""

    def __init__(self, address: tuple[str, int], rank: int, world_size: int,
                 backend: str = "gloo", *, host: str | None = None,
                 timeout_s: float = 600.0) -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self.ip = host or node_ip()
        self.group = _Group(backend, tuple(address), rank, world_size, None,
                            timedelta(seconds=timeout_s))

    def connect(self) -> None:
        self.group.connect(self.ip)

    def receive(self, ticket: Any = None) -> tuple[int, dict[str, Tensor]]:
        self.connect()
        dev = self.group.device
        size = torch.zeros(1, dtype=torch.int64, device=dev)
        self.group.broadcast(size)
        blob = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
        self.group.broadcast(blob)
        header: SyncHeader = pickle.loads(blob.cpu().numpy().tobytes())
        buffers = alloc_buckets(header, dev)
        for buf in buffers:
            if buf.numel():
                self.group.broadcast(as_bytes(buf))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return header.version, unpack(header, buffers)

    def close(self) -> None:
        self.group.close()


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
