"""Seconds per GRPO step on one host and on three, and the weight sync over the link (as root).

    python scripts/bench_hosts.py                   # the main job's config, 6 steps per layout
    python scripts/bench_hosts.py --steps 8 --out runs/bench/hosts.json

Each layout is a fresh cluster of hosts on this machine (cluster/local_hosts.py: own network
namespace, address, PID namespace and disk each) and the same job, submitted on the head with
``ray job submit``: the main job's config with bench_async.py's changes (every step does the
same work; no warm-start, no evaluation) and ``cluster.placement_strategy=SPREAD``.

- ``1 host``: one node with 2 CPUs holds the driver, the learner and the engine; ``auto``
  weight sync picks the object store (one node).
- ``3 hosts``: the head (0 CPUs) holds the driver; learner and engine go to the two workers
  and the adapter crosses the veth link over gloo.

Reported per layout, over the steps after ``--warmup``: the median seconds per step and per
phase (bench_async.py's ``summarize``), the transport, and the median push time and bytes of
the weight sync. Every host shares this machine's cores, so the three hosts are not three
times the compute: the comparison shows what crossing hosts costs, not what it gains.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local_hosts import LocalHosts, unavailable  # noqa: E402
from scripts.bench_async import overrides, summarize  # noqa: E402
from scripts.bench_results import machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"1 host": (2,), "3 hosts": (0, 2, 2)}


def run_layout(name: str, cpus, config: str, steps: int, base: Path, cache: Path) -> tuple[list[dict], str]:
    """The job on a fresh cluster of ``len(cpus)`` hosts; its step metrics and job log."""
    with LocalHosts(len(cpus), base / name.replace(" ", "_")) as hosts:
        hosts.start_ray(cpus)
        sets = [*overrides(steps), "cluster.placement_strategy=SPREAD", f"upstream.cache_path={cache}",
                f"logging.run_dir={hosts.run_dir / 'bench'}"]
        job = hosts.submit(f"bench-{name.replace(' ', '')}-{os.getpid()}", REPO,
                           [sys.executable, "scripts/train.py", "--config", config,
                            *(a for s in sets for a in ("--set", s))])
        status, logs = job.wait(timeout_s=3600), job.logs()
        if status != "SUCCEEDED":
            raise SystemExit(f"{name}: the job {status.lower()}:\n{logs[-3000:]}")
        lines = (hosts.hosts[0].run_folder / "bench" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()], logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the main job's config")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per layout")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--base", type=Path, default=Path("/tmp/api-adapter-bench-hosts"),
                        help="folder for the hosts' disks")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_hosts.json")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        raise SystemExit(f"error: {why}")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    cache = REPO / "runs" / "bench_hosts" / "upstream.sqlite"  # outside the hosts' private run folders
    layouts = {}
    for name, cpus in LAYOUTS.items():
        start = time.perf_counter()
        rows, logs = run_layout(name, cpus, args.config, args.steps, args.base, cache)
        timed = rows[args.warmup:]
        transport = re.search(r"weight sync: (\w+)", logs)
        layouts[name] = {**summarize(rows, args.warmup), "hosts": len(cpus), "cpus": list(cpus),
                         "transport": transport.group(1) if transport else None,
                         "sync_push_s_median": statistics.median(r["sync/push_seconds"] for r in timed),
                         "sync_bytes": timed[-1]["sync/bytes"], "wall_s": time.perf_counter() - start}
        m = layouts[name]
        print(f"{name}: {m['s_per_step']:.2f} s/step (median of {m['steps_timed']}); weight sync over "
              f"{m['transport']}: {m['sync_bytes'] / 1e6:.1f} MB in {m['sync_push_s_median'] * 1e3:.0f} ms "
              f"(timing/sync {m['phases_median_s']['sync'] * 1e3:.0f} ms)", flush=True)
    result = {"config": args.config, "overrides": [*overrides(args.steps), "cluster.placement_strategy=SPREAD"],
              "steps": args.steps, "warmup": args.warmup, "layouts": layouts,
              "machine": machine(),
              "command": "python scripts/bench_hosts.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
