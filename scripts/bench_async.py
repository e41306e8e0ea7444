"""Seconds per GRPO step, synchronous against asynchronous, for the main job's config on Ray.

    python scripts/bench_async.py                       # 10 steps per mode, lags 0 and 1
    python scripts/bench_async.py --steps 6 --lags 0,1,2 --out runs/bench/async.json

Each mode is ``scripts/train.py --config configs/quickstart.yaml`` in a subprocess of its own
(a fresh local Ray cluster, the learner, one rollout engine and the verifiers as actors), with
``algorithm.async_off_policy_steps`` set to the lag and these changes, so that every step does
the same work and only the steps are timed:

- no warm-start, no evaluation before training (``sft.steps=0``, ``eval.at_start=false``) and
  one held-out item at the end;
- ``algorithm.filter_zero_variance=false``: every step samples 4 prompts x 8 completions once
  and learns on all of them (with the zero-variance filter, refill rounds make the work per
  step depend on what the policy happens to answer);
- a fixed number of steps (``--steps``), no time budget, no checkpoints but the last.

Reported per mode, from the run's ``metrics.jsonl``, over the steps after the first
(``--warmup``; the first ones pay for lazy initialisation): the median seconds per step
(``time/train_seconds`` differences: what a user waits), the median of each phase
(``timing/rollout`` and ``verify`` run in the rollout thread in async mode, ``learn``, ``sync``,
and ``rollout_wait``: how long the learner still waited for its batch), and the policy lags
seen. The upstream's answers are fetched once into a shared cache (``--cache``) before the
first mode, so no mode pays for them. Results go to ``--out`` as JSON, with the machine's
load average: on a shared machine the times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: this checkout first

from scripts.bench_results import machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "verify", "advantages", "learn", "sync", "rollout_wait")


def overrides(steps: int) -> list[str]:
    """What every mode changes in the main job's config (besides the lag, run folder and cache)."""
    return [f"algorithm.steps={steps}", "algorithm.max_train_seconds=null", "algorithm.filter_zero_variance=false",
            "algorithm.max_refill_rounds=0",
            "sft.steps=0", "eval.at_start=false", "eval.n_items=1", "checkpoint.every_steps=0", "cluster.mode=ray"]


def run_mode(config: str, steps: int, lag: int, run_dir: Path, cache: Path) -> list[dict]:
    """Train ``steps`` steps at ``lag`` in a subprocess; the run's step metrics."""
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", config]
    for item in [*overrides(steps), f"algorithm.async_off_policy_steps={lag}",
                 f"upstream.cache_path={cache}", f"logging.run_dir={run_dir}"]:
        command += ["--set", item]
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"lag {lag}: scripts/train.py exited with {done.returncode}; see {log}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarize(rows: list[dict], warmup: int) -> dict:
    """Medians over the steps after ``warmup``."""
    clock = [0.0] + [r["time/train_seconds"] for r in rows]
    per_step = [b - a for a, b in zip(clock, clock[1:])][warmup:]
    timed = rows[warmup:]
    phases = {p: statistics.median(r.get(f"timing/{p}", 0.0) for r in timed) for p in PHASES}
    return {"steps_timed": len(per_step), "s_per_step": statistics.median(per_step),
            "s_per_step_mean": statistics.fmean(per_step), "phases_median_s": phases,
            "policy_lags": sorted({r.get("async/policy_lag", 0) for r in rows})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the main job's config")
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--lags", default="0,1", help="comma-separated values of async_off_policy_steps")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench_async")
    parser.add_argument("--cache", type=Path, help="upstream answer cache (default: RUNS_DIR/upstream.sqlite)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_async.json")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    lags = [int(x) for x in args.lags.split(",")]
    cache = args.cache or args.runs_dir / "upstream.sqlite"
    modes = {}
    for lag in lags:
        start = time.perf_counter()
        rows = run_mode(args.config, args.steps, lag, args.runs_dir / f"lag{lag}", cache)
        modes[f"lag{lag}"] = {**summarize(rows, args.warmup), "wall_s": time.perf_counter() - start}
        m = modes[f"lag{lag}"]
        print(f"lag {lag}: {m['s_per_step']:.2f} s/step (median of {m['steps_timed']}), phases "
              + ", ".join(f"{p} {s:.2f}" for p, s in m["phases_median_s"].items()) + f"; lags seen {m['policy_lags']}",
              flush=True)
    base = modes.get("lag0")
    if base:
        for name, m in modes.items():
            m["speedup_vs_sync"] = base["s_per_step"] / m["s_per_step"]
            print(f"{name}: {m['speedup_vs_sync']:.2f}x the synchronous step rate")
    result = {"config": args.config, "overrides": overrides(args.steps),
              "steps": args.steps, "warmup": args.warmup, "modes": modes,
              "machine": machine(),
              "command": "python scripts/bench_async.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
