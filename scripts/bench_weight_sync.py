"""Weight sync time and bandwidth on a local Ray cluster (CPU): gloo broadcast and object store.

    python scripts/bench_weight_sync.py                    # the four cases below, 2 engines
    python scripts/bench_weight_sync.py --engines 1 --repeats 10 --out runs/bench/sync.json

Adapters (synthetic tensors with PEFT's names and shapes: A [r, in], B [out, r] per projection):
- ``embedded``: the embedded SmolLM2-135M's LoRA as trained here -- rank 16 on all 7 linear
  projections of 30 layers (hidden 576, intermediate 1536, 9 heads / 3 KV heads of dim 64):
  4.88M parameters, float32 as the learner exports them (19.5 MB);
- ``qwen3-8b``: rank 32 on the same 7 projections of Qwen3-8B (36 layers, hidden 4096,
  intermediate 12288, 32 heads / 8 KV heads of dim 128): 87.3M parameters, bfloat16 (175 MB).

A learner actor pushes the adapter ``--repeats`` times (after one untimed push that builds the
gloo group) to ``--engines`` engine actors, each of which receives and copies the tensors into
its own adapter under a lock (what ``HFRolloutEngine.update_adapter`` does). Reported per case
(medians over repeats): ``push``, the sender's time (pack + send; for the object store pack +
``ray.put``); ``recv`` / ``apply``, the slowest engine's time in ``receive`` (for gloo this
includes waiting for the sender) and in the copy into its adapter; ``round``, the controller's
wall time from the push call until every engine has applied it (and its min), with ``GB/s`` =
payload bytes / round (per engine: every engine gets the whole payload). On one node gloo goes
through loopback TCP and the object store through shared memory; across nodes both cross the
network instead. The machine's load average is recorded with the results: on a shared machine
the times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterShape:
    """A decoder's LoRA: rank ``rank`` on all 7 linear projections of every layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rank: int
    dtype: str


ADAPTERS = {
    "embedded": AdapterShape(30, 576, 1536, 9, 3, 64, rank=16, dtype="float32"),
    "qwen3-8b": AdapterShape(36, 4096, 12288, 32, 8, 128, rank=32, dtype="bfloat16"),
}
CASES = (("embedded", "gloo"), ("embedded", "object_store"),
         ("qwen3-8b", "gloo"), ("qwen3-8b", "object_store"))


def lora_shapes(s: AdapterShape) -> dict[str, tuple[int, ...]]:
    """PEFT state-dict names -> shapes, in ``get_peft_model_state_dict``'s order."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    dims = {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv),
            "o_proj": (q, s.hidden), "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
    out: dict[str, tuple[int, ...]] = {}
    for i in range(s.layers):
        for proj in PROJECTIONS:
            part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            d_in, d_out = dims[proj]
            prefix = f"base_model.model.model.layers.{i}.{part}.{proj}"
            out[f"{prefix}.lora_A.weight"] = (s.rank, d_in)
            out[f"{prefix}.lora_B.weight"] = (d_out, s.rank)
    return out


class _Learner:
    """Holds a synthetic adapter and pushes it."""

    def __init__(self, shape: AdapterShape, kind: str, world: int, bucket_bytes: int) -> None:
        import torch

        from cluster.weight_sync import ObjectStoreSender
        from cluster.weight_sync_dist import TorchDistributedSender

        torch.set_num_threads(1)
        dtype = getattr(torch, shape.dtype)
        g = torch.Generator().manual_seed(0)
        self.tensors = {k: torch.randn(v, generator=g).to(dtype)
                        for k, v in lora_shapes(shape).items()}
        self.sender = (TorchDistributedSender(world, "gloo", bucket_bytes=bucket_bytes)
                       if kind == "gloo" else ObjectStoreSender(bucket_bytes))

    def address(self):
        return self.sender.address

    def push(self, version: int):
        return self.sender.push(version, self.tensors)


class _Engine:
    """Receives and copies into its own adapter under a lock, as update_adapter does."""

    def __init__(self, shape: AdapterShape, kind: str, address, rank: int, world: int) -> None:
        import threading

        import torch

        from cluster.weight_sync import ObjectStoreReceiver
        from cluster.weight_sync_dist import TorchDistributedReceiver

        torch.set_num_threads(1)
        dtype = getattr(torch, shape.dtype)
        self.slots = {k: torch.zeros(v, dtype=dtype) for k, v in lora_shapes(shape).items()}
        self.lock = threading.Lock()
        self.version = -1
        self.receiver = (TorchDistributedReceiver(address, rank, world, "gloo")
                         if kind == "gloo" else ObjectStoreReceiver())

    def sync(self, ticket) -> tuple[int, float, float]:
        """Returns the version and the seconds spent receiving and applying."""
        start = time.perf_counter()
        version, tensors = self.receiver.receive(ticket)
        received = time.perf_counter()
        with self.lock:
            for k, v in tensors.items():
                self.slots[k].copy_(v)
            self.version = version
        return version, received - start, time.perf_counter() - received


def run_case(ray, name: str, kind: str, engines: int, repeats: int, bucket_bytes: int) -> dict:
    from cluster.weight_sync import sync_round

    shape, world = ADAPTERS[name], engines + 1
    learner = ray.remote(_Learner).options(num_cpus=0).remote(shape, kind, world, bucket_bytes)
    address = ray.get(learner.address.remote()) if kind == "gloo" else None
    hosts = [ray.remote(_Engine).options(num_cpus=0).remote(shape, kind, address, r, world)
             for r in range(1, world)]
    try:
        push_s, round_s, recv_s, apply_s = [], [], [], []
        for version in range(repeats + 1):  # version 0: untimed, builds the gloo group
            start = time.perf_counter()
            stats, applied = sync_round(kind, lambda: learner.push.remote(version),
                                        [lambda t, h=h: h.sync.remote(t) for h in hosts])
            elapsed = time.perf_counter() - start
            if [a[0] for a in applied] != [version] * engines:
                raise RuntimeError(f"engines applied {applied}, expected version {version}")
            if version:
                push_s.append(stats.seconds)
                round_s.append(elapsed)
                recv_s.append(max(a[1] for a in applied))
                apply_s.append(max(a[2] for a in applied))
    finally:
        for actor in (learner, *hosts):
            ray.kill(actor)
    params = sum(a * b for a, b in lora_shapes(shape).values())
    med = statistics.median(round_s)
    return {
        "adapter": name, "transport": kind, "engines": engines, "params": params,
        "dtype": shape.dtype, "mb": stats.bytes / 1e6, "buckets": stats.buckets,
        "push_s_median": statistics.median(push_s), "receive_s_median": statistics.median(recv_s),
        "apply_s_median": statistics.median(apply_s), "round_s_median": med,
        "round_s_min": min(round_s), "gbps_median": stats.bytes / med / 1e9,
        "gbps_best": stats.bytes / min(round_s) / 1e9, "repeats": repeats,
        "shape": asdict(shape),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'adapter':<10} {'transport':<13} {'params':>8} {'MB':>7} {'bkts':>4} "
            f"{'push ms':>8} {'recv ms':>8} {'apply ms':>8} {'round ms':>9} {'min ms':>8} "
            f"{'GB/s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['adapter']:<10} {r['transport']:<13} {r['params'] / 1e6:>7.2f}M "
              f"{r['mb']:>7.1f} {r['buckets']:>4} {r['push_s_median'] * 1e3:>8.1f} "
              f"{r['receive_s_median'] * 1e3:>8.1f} {r['apply_s_median'] * 1e3:>8.1f} "
              f"{r['round_s_median'] * 1e3:>9.1f} {r['round_s_min'] * 1e3:>8.1f} "
              f"{r['gbps_median']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=2, help="engine actors receiving each push")
    p.add_argument("--repeats", type=int, default=5, help="timed pushes per case")
    p.add_argument("--bucket-mib", type=int, default=64, help="bucket size cap, MiB")
    p.add_argument("--cases", nargs="*", default=[f"{a}:{t}" for a, t in CASES],
                   help="adapter:transport pairs (adapters: %s)" % ", ".join(ADAPTERS))
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_weight_sync.json")
    args = p.parse_args(argv)
    cases = [tuple(c.split(":")) for c in args.cases]
    bad = [c for c in cases if len(c) != 2 or c[0] not in ADAPTERS
           or c[1] not in ("gloo", "object_store")]
    if bad:
        p.error(f"unknown cases {bad}; adapters {list(ADAPTERS)}, transports gloo, object_store")

    import ray
    import torch

    ray.init(num_cpus=max(2, args.engines + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        rows = [run_case(ray, a, t, args.engines, args.repeats, args.bucket_mib << 20)
                for a, t in cases]
    finally:
        ray.shutdown()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "machine": {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__,
        "ray": ray.__version__,
    }}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
