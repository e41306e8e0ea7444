"""The trainer as users run it: `ray start --head`, then `ray job submit` of scripts/train.py.

A real local Ray cluster (its own temp dir and ports), the real job server, the smoke config
on CPU; the job's run folder must hold the metrics, a PEFT checkpoint and the results.
"""

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head of our own: its own ports (another cluster on this machine must not collide with
    its dashboard agent) and its own process group, so teardown stops only this cluster."""
    temp = Path("/tmp") / f"rayt{os.getpid()}"  # short: Ray's socket paths have a length limit
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "node-manager-port",
                                             "object-manager-port", "ray-client-server-port")}
    # Ray 2.5x+ enables token auth for local clusters; give the cluster and the CLI one token.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=3",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp}",
                             *(f"--{name}={port}" for name, port in ports.items())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address, env, log: Path, job_id: str, *sets) -> subprocess.Popen:
    """``ray job submit`` of the smoke config, left running to follow the job to its end (one
    client streaming the log into ``log``: no polling). Waits first for the head's job agent,
    which comes up a while after the head."""
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--submission-id", job_id, "--", sys.executable, "scripts/train.py",
               "--config", "configs/smoke.yaml", *(arg for s in sets for arg in ("--set", s))]
    for _ in range(60):
        ready = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=120)
        if ready.returncode == 0:
            break
        time.sleep(5)
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(job: subprocess.Popen, timeout_s=900) -> str:
    """SUCCEEDED, or FAILED (failed or stopped: the client's exit status)."""
    return "SUCCEEDED" if job.wait(timeout=timeout_s) == 0 else "FAILED"


def _adapter(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step:06d}" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_job_trains_and_a_sigkilled_driver_resumes_exactly(ray_head, tmp_path):
    """A submitted job trains (with the SFT warm-start on the learner actor), checkpoints,
    evaluates and reports. Then SIGKILL another job's driver after its second checkpoint and
    resubmit it with resume: the step counter and the data order continue, and the final
    adapter equals the uninterrupted run's."""

    address, env = ray_head
    common = ["algorithm.steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "eval.at_start=false",
              "eval.n_items=2", "data.n_per_type=10",
              "sft.steps=2", "sft.batch_size=4"]  # the warm-start on the learner actor
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    job = _submit(address, env, tmp_path / "whole.log", f"whole-{os.getpid()}", *common, f"logging.run_dir={whole}")
    status, logs = _wait(job), (tmp_path / "whole.log").read_text(errors="replace")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "placement:" in logs and "grpo 2/4" in logs and "sft warm-start 2/2" in logs and "SFT warm-start: 2 steps" in logs
    results = json.loads((whole / "results.json").read_text())
    assert results["steps"] == 4 and results["after"]["overall"]["total"] == 2
    assert results["sft"]["steps"] == 2 and (whole / "sft" / "adapter" / "adapter_config.json").exists()
    assert len((whole / "sft_metrics.jsonl").read_text().splitlines()) == 2
    assert len((whole / "metrics.jsonl").read_text().splitlines()) == 4
    assert (whole / "report" / "report.md").exists()

    job = _submit(address, env, tmp_path / "broken.log", f"broken-{os.getpid()}", *common, f"logging.run_dir={broken}")
    deadline = time.time() + 600
    while not (broken / "checkpoints" / "step_000002" / "meta.json").exists():
        assert time.time() < deadline, "no second checkpoint in 10 minutes"
        time.sleep(0.5)
    driver = subprocess.run(["pgrep", "-f", f"logging.run_dir={broken}"], capture_output=True, text=True).stdout
    for pid in driver.split():
        if int(pid) != job.pid:  # the driver, not our submit client
            os.kill(int(pid), signal.SIGKILL)
    assert _wait(job) == "FAILED"

    job = _submit(address, env, tmp_path / "resumed.log", f"resumed-{os.getpid()}", *common,
                  f"logging.run_dir={broken}", "checkpoint.resume=true")
    assert _wait(job) == "SUCCEEDED", (tmp_path / "resumed.log").read_text(errors="replace")[-4000:]
    results = json.loads((broken / "results.json").read_text())
    assert results["resumed_from_step"] >= 2 and results["steps"] == 4
    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps[-1] == 3 and steps[-(4 - results["resumed_from_step"]):] == list(range(results["resumed_from_step"], 4))
    reference = {row["step"]: row for row in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines())}
    for row in rows[-(4 - results["resumed_from_step"]):]:
        assert row["data/position"] == reference[row["step"]]["data/position"]
        assert row["sample"]["uid"] == reference[row["step"]]["sample"]["uid"]
    a, b = _adapter(whole, 4), _adapter(broken, 4)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_job_with_two_vllm_engines_trains_and_syncs(ray_head, tmp_path):
    """``rollout.engine: vllm`` as a submitted job: the learner and two vLLM engine actors with
    half a CPU each, a warm-start, then asynchronous GRPO (a batch is sampled while the learner
    takes the step before, and the learner's importance weights use vLLM's log-probs). Every
    push, the warm-start's included, is checked on both engines (``cluster.verify_sync``: each
    engine's adapter and version equal the learner's, else the job fails); every step learns.
    (A run with a vLLM engine resuming from its checkpoint, on another host: test_multi_host.)"""
    address, env = ray_head
    run = tmp_path / "vllm"
    sets = ["rollout.engine=vllm", "rollout.num_engines=2", "cluster.cpus_per_engine=0.5",
            "cluster.verify_sync=true", "algorithm.async_off_policy_steps=1",
            "algorithm.filter_zero_variance=false",  # every step learns and syncs, whatever the rewards
            "sft.steps=2", "sft.batch_size=4", "checkpoint.every_steps=1", "eval.at_start=false",
            "eval.n_items=2", "data.n_per_type=10", f"logging.run_dir={run}"]
    job = _submit(address, env, tmp_path / "first.log", f"vllm-{os.getpid()}", *sets)
    assert _wait(job) == "SUCCEEDED", (tmp_path / "first.log").read_text(errors="replace")[-4000:]
    placement = json.loads((run / "placement.json").read_text())
    assert {name for name in placement if name.startswith("rollout")} == {"rollout:0", "rollout:1"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r.get("async/policy_lag", 0) <= 1 for r in rows)
    assert all(r["sync/verified"] == 1 and not r["learn/skipped"] and "learn/loss" in r for r in rows)
    assert rows[-1]["policy_version"] >= 2  # the warm-start's version and on
    adapter = _adapter(run, 2)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # the LoRA moved
    saved = json.loads((run / "checkpoints" / "step_000002" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # portable
