"""LoRA weight sync over a torch.distributed process group of its own (gloo on CPU, NCCL on
GPUs), and the address it listens on.

The sender (learner rank 0) and the receivers (rollout engines) form a stateless group on a
TCPStore that the sender opens on its node's Ray address: never the learner's DeepSpeed group,
and never ``init_process_group`` (the default group is DeepSpeed's). A push sends the header's
length, the pickled header, then one broadcast per dtype bucket (:mod:`cluster.weight_sync`).

Across hosts, gloo resolves the host name and may pick the loopback interface, so that a peer
on another host dials its own 127.0.0.1: :func:`pin_socket_interface` sets
``GLOO_SOCKET_IFNAME`` (``NCCL_SOCKET_IFNAME``) to the interface that holds the node's Ray IP.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import time
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from cluster.weight_sync import (
    COLLECTIVE,
    DEFAULT_BUCKET_BYTES,
    SyncHeader,
    SyncStats,
    WeightReceiver,
    WeightSender,
    alloc_buckets,
    as_bytes,
    make_header,
    pack_bucket,
    unpack,
)


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
