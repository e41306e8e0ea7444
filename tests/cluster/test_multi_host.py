"""Scale-out on three hosts of one machine (cluster/local_hosts.py): each its own network
namespace and address on a shared link, its own PID namespace, its own disk at the run folder.

The trainer goes in with ``ray job submit`` on the head, as it would on rented nodes; the head
(0 CPUs) holds the driver, the learner and engines go to the two workers (SPREAD), and weights
cross the link over gloo. Skipped, with the reason, where namespaces cannot be made.
"""

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from cluster.local_hosts import LocalHosts, unavailable

ROOT = Path(__file__).resolve().parents[2]
WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"no namespaces: {WHY}")]
CPUS = (0, 2, 2)  # the head only drives; learner and engines go to the workers
COMMON = ("cluster.placement_strategy=SPREAD", "cluster.verify_sync=true", "cluster.weight_sync_timeout_s=60",
          "eval.at_start=false", "eval.n_items=2", "data.n_per_type=5",
          "algorithm.filter_zero_variance=false")  # every step learns and syncs, whatever the rewards


@pytest.fixture(scope="module")
def s3():
    """A bucket the hosts reach at the link's gateway (tests/s3_server.py)."""
    from tests.s3_server import S3Server

    with S3Server("0.0.0.0") as server:
        server.make_bucket("runs")
        yield server


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, s3):
    with LocalHosts(3, tmp_path_factory.mktemp("hosts")) as made:
        made.env.update(s3.env(made.gateway))  # the drivers' credentials and endpoint
        made.start_ray(CPUS)
        yield made


def _submit(hosts: LocalHosts, job_id: str, name: str, *sets: str):
    """Submit the smoke config on the head; the job, and the run folder as the head's disk holds it."""
    sets = [*COMMON, f"logging.run_dir={hosts.run_dir / name}", *sets]
    job = hosts.submit(f"{job_id}-{os.getpid()}", ROOT, [sys.executable, "scripts/train.py", "--config",
                                                        "configs/smoke.yaml", *(a for s in sets for a in ("--set", s))])
    return job, hosts.hosts[0].run_folder / name


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, what: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(1)


def _host_of(hosts: LocalHosts, run: Path, role: str) -> int:
    ip = json.loads((run / "placement.json").read_text())[role]["ip"]
    return next(i for i, h in enumerate(hosts.hosts) if h.ip == ip)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_smoke_run_across_three_hosts_survives_losing_an_engine_host(hosts):
    """The smallest config with two engines completes across the hosts: learner and engines on
    the two workers, every push verified bit for bit (SHA-256) across the link, only the head's
    disk holds the run. Mid-run, the host with an engine but not the learner is SIGKILLed: its
    engine is dropped and the run finishes on the other."""
    # gloo to both engines (auto would take the object store for all, one engine being on
    # the learner's host); test 2 has auto pick gloo for a lone engine across the link
    job, run = _submit(hosts, "mh-smoke", "smoke", "algorithm.steps=4", "rollout.num_engines=2",
                       "cluster.weight_sync=gloo")
    _wait_for(lambda: len(_rows(run)) >= 1, "first step")
    learner = _host_of(hosts, run, "learner:0")
    engines = {_host_of(hosts, run, f"rollout:{i}") for i in (0, 1)}
    assert engines == {1, 2} and learner in (1, 2)
    victim = next(i for i in (1, 2) if i != learner)
    hosts.hosts[victim].kill()
    status, logs = job.wait(), job.logs()
    assert status == "SUCCEEDED", logs[-4000:]
    assert "weight sync: gloo" in logs and "lost with their node; going on with 1" in logs
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(4))
    assert all(r["sync/verified"] == 1 and r["sync/bytes"] > 1e6 for r in rows)
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert (run / "checkpoints" / "step_000004" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "upstream_cache.sqlite").exists()  # the upstream actor writes on the driver's host
    for worker in hosts.hosts[1:]:
        assert _files(worker.run_folder) == [], f"{worker.name} wrote into its run folder"
    hosts.start_worker(victim, CPUS[victim])
    hosts.wait_for_nodes(3, 120)


def test_learner_host_dies_then_the_run_resumes_from_a_bucket_on_another_host(hosts):
    """The run lives in a bucket (an S3-protocol server outside the hosts). SIGKILL the
    learner's host after the first checkpoint: the job stops with a message naming the
    checkpoint in the bucket. On a fresh cluster whose head -- and so the driver -- is another
    host, whose disk never saw the run, it resumes from the bucket, with the answers already
    paid for. Here the config names the interface for gloo (``cluster.socket_interface``), and
    the one engine, on the other worker, is a vLLM engine (where vLLM is installed)."""
    from rl.storage import Store

    engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    where = f"s3://runs/learner-lost-{os.getpid()}"
    sets = ("algorithm.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=0",
            "cluster.socket_interface=eth0", f"rollout.engine={engine}", f"logging.run_dir={where}",
            f"logging.local_dir={hosts.run_dir / 'staging'}")  # each host's own disk
    bucket = Store(where)
    job, run = _submit(hosts, "mh-learner", "learner_lost", *sets)
    _wait_for(lambda: bucket.is_file("checkpoints/step_000001/meta.json") and bucket.is_file("placement.json"),
              "first checkpoint")
    placement = json.loads(bucket.read_bytes("placement.json"))
    learner = next(i for i, h in enumerate(hosts.hosts) if h.ip == placement["learner:0"]["ip"])
    hosts.hosts[learner].kill()
    status, logs = job.wait(), job.logs()
    assert status == "FAILED", logs[-4000:]
    assert "weight sync: gloo" in logs and "a Ray actor the run needs died" in logs and "checkpoint.resume=true" in logs
    assert f"the last checkpoint is {where}/checkpoints/step_00000" in logs
    assert placement["rollout:0"]["ip"] != placement["learner:0"]["ip"]

    hosts.stop_all()
    hosts.start_ray((2, 2, 0), head=2)  # the driver on host 2 now
    resumed, _ = _submit(hosts, "mh-resumed", "learner_lost", *sets, "checkpoint.resume=true")
    status, logs = resumed.wait(), resumed.logs()
    assert status == "SUCCEEDED", logs[-4000:]
    results = json.loads(bucket.read_bytes("results.json"))
    start = results["resumed_from_step"]
    assert start >= 1 and results["steps"] == 3 and f"resumed from {where}/checkpoints/step_00000{start}" in logs
    answers, cached = map(int, re.search(r"upstream: (\d+) answers \((\d+) from the cache\)", logs).groups())
    assert answers == cached > 0  # the answers paid for on host 0 came back with the run
    rows = [json.loads(line) for line in bucket.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows][-(3 - start):] == list(range(start, 3))
    assert _files(hosts.hosts[0].run_folder / "learner_lost") == []  # the run folder is the bucket
