"""torch.distributed / DeepSpeed start-up for the learner: process-group defaults, the op cache.

DeepSpeed needs a process group even for one process. :func:`init_distributed` fills in the
``torchrun``-style variables (MASTER_ADDR, MASTER_PORT on a free port, RANK, LOCAL_RANK,
WORLD_SIZE = 1) where they are absent, and starts DeepSpeed's backend with gloo on CPU (NCCL on
a GPU), once per process.

The C++ op. On the CPU accelerator DeepSpeed's ``TorchBackend`` JIT-compiles its shared-memory
collective op, ``deepspeed_shm_comm`` (``csrc/cpu/comm/shm*.cpp``, ~75 s on 2 cores), the first
time a process group is created: it speeds up all-reduce between processes on one host. With a
single process there is nothing to share memory with, so :func:`init_distributed` marks that op
unavailable for world size 1 (``deepspeed.ops.__compatible_ops__``, a dict DeepSpeed caches for
such edits) and no compiler runs; collectives then go through plain gloo. Multi-process CPU
learners still use it: ``python -m scripts.prepare_env --only deepspeed-cpu-ops`` builds it once
at install time (:func:`build_shm_comm_op`). Our own AdamW is handed to DeepSpeed, so its
``fused_adam`` / ``cpu_adam`` ops are never built either.

Built ops go to ``$TORCH_EXTENSIONS_DIR``; when the user did not set it, this module sets it (on
import, before DeepSpeed is imported) to ``<venv>/torch_extensions`` so the build belongs to the
environment, not to whichever home directory ran first. A compile that was killed leaves a
``lock`` file behind that makes every later build wait forever; :func:`stale_extension_locks`
finds such files so the caller can name them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
SHM_COMM_OP = "deepspeed_shm_comm"


def torch_extensions_dir() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, set to ``sys.prefix/torch_extensions`` when absent or empty."""
    if not os.environ.get(EXTENSIONS_ENV):
        os.environ[EXTENSIONS_ENV] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ[EXTENSIONS_ENV])


torch_extensions_dir()  # on import: before deepspeed (imported lazily below) builds anything


def stale_extension_locks(root: Path | None = None) -> list[Path]:
    """``lock`` files of op folders under the extensions dir that hold no built library: a build
    is running right now, or one was killed and every later build will wait on it forever."""
    root = root if root is not None else torch_extensions_dir()
    if not root.is_dir():
        return []
    return [lock for lock in sorted(root.rglob("lock"))
            if not any(lock.parent.glob("*.so"))]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> dict[str, str]:
    """Set the process-group variables that are absent to a one-process group; returns what
    was set (a launcher's values are left alone)."""
    defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    added = {k: v for k, v in defaults.items() if not os.environ.get(k)}
    if not os.environ.get("MASTER_PORT"):
        added["MASTER_PORT"] = str(free_port())
    os.environ.update(added)
    return added


def _skip_shm_comm_op() -> None:
    """Make DeepSpeed's TorchBackend skip building the shared-memory op (one process: unused)."""
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    if SHM_COMM_OP not in ops:  # DeepSpeed renamed or dropped it: fail loudly, not silently
        raise RuntimeError(f"deepspeed.ops.__compatible_ops__ has no {SHM_COMM_OP!r}; "
                           "update actors/distributed.py for this DeepSpeed version")
    ops[SHM_COMM_OP] = False


def init_distributed(device: str = "cpu") -> None:
    """Start DeepSpeed's process group once per process (gloo on CPU, nccl on CUDA)."""
    added = set_single_process_env()
    try:
        _init_deepspeed(device)
    finally:
        # The group holds that port now (or never needed it). A port we chose must not leak
        # into processes started later from this one (a Ray cluster this driver starts, a
        # subprocess): they would take it for a launcher's and fail to bind it.
        if "MASTER_PORT" in added:
            del os.environ["MASTER_PORT"]


def _init_deepspeed(device: str) -> None:
    import torch.distributed as dist

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", kind)  # read once, when DeepSpeed first picks one
    import deepspeed
    import deepspeed.comm
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != kind:
        raise RuntimeError(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but "
                           f"the learner's device is {device!r}; set DS_ACCELERATOR={kind} "
                           "before DeepSpeed is first used in this process")
    if deepspeed.comm.is_initialized() and dist.is_initialized():
        return
    if int(os.environ["WORLD_SIZE"]) == 1:
        _skip_shm_comm_op()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    locks = stale_extension_locks()
    if locks:
        log.warning("torch extension builds may wait on these lock files (delete them if no "
                    "build is running): %s", ", ".join(map(str, locks)))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def build_shm_comm_op() -> str:
    """Compile DeepSpeed's CPU shared-memory collective op into the extensions dir (once).

    Returns a line saying what happened. Under an exclusive lock of its own it first removes a
    ``lock`` left in the op's folder by a killed build (torch would wait on it forever); run it
    when no learner is starting, as at install time.
    """
    import fcntl

    root = torch_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if accelerator != "cpu" or builder is None:
        return f"not needed: DeepSpeed's accelerator is {accelerator!r}, not the CPU"
    if not builder.is_compatible():
        return f"{SHM_COMM_OP} is not buildable here (see DeepSpeed's ds_report)"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{SHM_COMM_OP}.prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        for stale in stale_extension_locks(root):
            if stale.parent.name == SHM_COMM_OP:
                log.warning("removing %s, left by an interrupted build", stale)
                stale.unlink()
        already = any((root / SHM_COMM_OP).glob("*.so"))
        builder.load(verbose=False)  # compiles, or loads what is there
    return f"{SHM_COMM_OP} {'already built' if already else 'built'} in {root / SHM_COMM_OP}"


# ---------------------------------------------------------------------------- data parallel


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(value: float) -> float:
    """``value`` summed over the learner ranks (itself with one rank)."""
    if world_size() == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every learner rank: one decision all ranks share (a rank
    that stepped alone would wait forever in the gradient all-reduce)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
