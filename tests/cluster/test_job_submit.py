"""The trainer as users run it: `ray start --head`, then `ray job submit` of scripts/train.py.

A real local Ray cluster (its own temp dir and ports), the real job server, the smoke config
on CPU; the job's run folder must hold the metrics, a PEFT checkpoint and the results.
"""

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


def _job_status(address: str, job_id: str, env: dict) -> str:
    """RUNNING until `ray job status` reports an end ("Job 'x' succeeded" / failed / stopped)."""
    out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                         env=env, capture_output=True, text=True, timeout=60).stdout.lower()
    for status in ("succeeded", "failed", "stopped"):
        if f"' {status}" in out or f": {status}" in out:
            return status.upper()
    return "RUNNING"


@pytest.mark.slow
def test_ray_job_submit_trains_and_writes_the_run(ray_head, tmp_path):
    address, env = ray_head
    run = tmp_path / "run"
    job_id = f"smoke-{os.getpid()}"
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--submission-id", job_id, "--no-wait", "--", sys.executable, "scripts/train.py",
               "--config", "configs/smoke.yaml", "--set", f"logging.run_dir={run}",
               "--set", "sft.steps=2", "--set", "sft.batch_size=4"]  # the warm-start on the learner actor
    for _ in range(60):  # the head (and its job agent) come up a while after the process starts
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if submit.returncode == 0 or not any(m in submit.stderr for m in ("No available agent", "onnect")):
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-3000:]
    deadline = time.time() + 900
    while (status := _job_status(address, job_id, env)) == "RUNNING":
        assert time.time() < deadline, "the job did not finish in 15 minutes"
        time.sleep(5)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "placement:" in logs and "step    1" in logs and "SFT warm-start: 2 steps" in logs
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["after"]["overall"]["total"] == 8
    assert results["sft"]["steps"] == 2 and (run / "sft" / "adapter" / "adapter_config.json").exists()
    assert len((run / "sft_metrics.jsonl").read_text().splitlines()) == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "checkpoints" / "step_000002" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "report" / "report.md").exists()


def _submit(address, env, job_id, *sets):
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--submission-id", job_id, "--no-wait", "--", sys.executable, "scripts/train.py",
               "--config", "configs/smoke.yaml", *(arg for s in sets for arg in ("--set", s))]
    submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert submit.returncode == 0, submit.stderr[-3000:]


def _wait(address, env, job_id, timeout_s=900) -> str:
    deadline = time.time() + timeout_s
    while (status := _job_status(address, job_id, env)) == "RUNNING":
        assert time.time() < deadline, f"job {job_id} did not finish in {timeout_s} s"
        time.sleep(3)
    return status


def _adapter(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step:06d}" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkilled_driver_resumes_exactly(ray_head, tmp_path):
    """SIGKILL the job's driver after its second checkpoint, resubmit with resume: the step
    counter and the data order continue, and the final adapter equals an uninterrupted run's."""

    address, env = ray_head
    common = ["algorithm.steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "eval.at_start=false",
              "eval.n_items=2", "data.n_per_type=10"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _submit(address, env, f"whole-{os.getpid()}", *common, f"logging.run_dir={whole}")
    assert _wait(address, env, f"whole-{os.getpid()}") == "SUCCEEDED"

    _submit(address, env, f"broken-{os.getpid()}", *common, f"logging.run_dir={broken}")
    deadline = time.time() + 600
    while not (broken / "checkpoints" / "step_000002" / "meta.json").exists():
        assert time.time() < deadline, "no second checkpoint in 10 minutes"
        time.sleep(0.5)
    driver = subprocess.run(["pgrep", "-f", f"logging.run_dir={broken}"], capture_output=True, text=True).stdout
    for pid in driver.split():
        os.kill(int(pid), signal.SIGKILL)
    assert _wait(address, env, f"broken-{os.getpid()}") in ("FAILED", "STOPPED")

    _submit(address, env, f"resumed-{os.getpid()}", *common, f"logging.run_dir={broken}", "checkpoint.resume=true")
    assert _wait(address, env, f"resumed-{os.getpid()}") == "SUCCEEDED"
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
