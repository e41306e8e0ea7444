"""Scale-out on three hosts of one machine (cluster/local_hosts.py): each its own network
namespace and address on a shared link, its own PID namespace, its own disk at the run folder.

The trainer goes in with ``ray job submit`` on the head, as it would on rented nodes; the head
(0 CPUs) holds the driver, the learner and engines go to the two workers (SPREAD), and weights
cross the link over gloo. Skipped, with the reason, where namespaces cannot be made.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cluster.local_hosts import LocalHosts, unavailable

ROOT = Path(__file__).resolve().parents[2]
WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"no namespaces: {WHY}")]
CPUS = (0, 2, 2)  # the head only drives; learner and engines go to the workers
# The later runs reuse the smoke run's answers: its cache is on the head's disk (the upstream
# actor runs beside the driver), so this path only works there. Tests run in file order.
SMOKE_ANSWERS = "upstream.cache_path=RUN_DIR/smoke/upstream_cache.sqlite"
COMMON = ("cluster.placement_strategy=SPREAD", "cluster.verify_sync=true", "cluster.weight_sync_timeout_s=60",
          "eval.at_start=false", "eval.n_items=2", "data.n_per_type=5",
          "algorithm.filter_zero_variance=false")  # every step learns and syncs, whatever the rewards


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with LocalHosts(3, tmp_path_factory.mktemp("hosts")) as made:
        made.start_ray(CPUS)
        yield made


def _submit(hosts: LocalHosts, job_id: str, name: str, *sets: str) -> Path:
    """Submit the smoke config on the head; the run folder as the head's disk holds it."""
    sets = [s.replace("RUN_DIR", str(hosts.run_dir)) for s in (*COMMON, f"logging.run_dir={hosts.run_dir / name}", *sets)]
    args = [a for s in sets for a in ("--set", s)]
    hosts.submit(job_id, ROOT, [sys.executable, "scripts/train.py", "--config", "configs/smoke.yaml", *args])
    return hosts.hosts[0].run_folder / name


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, what: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(1)


def _host_of(hosts: LocalHosts, run: Path, role: str):
    ip = json.loads((run / "placement.json").read_text())[role]["ip"]
    return next(i for i, h in enumerate(hosts.hosts) if h.ip == ip)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_smoke_run_across_three_hosts(hosts):
    """The smallest config completes; learner and engine on different hosts; after every step
    the engine's adapter equals the learner's bit for bit across the link; only the head's disk
    holds the run."""
    job = f"mh-smoke-{os.getpid()}"
    run = _submit(hosts, job, "smoke")
    status = hosts.wait_job(job)
    logs = hosts.job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "weight sync: gloo" in logs
    learner, engine = _host_of(hosts, run, "learner:0"), _host_of(hosts, run, "rollout:0")
    assert {learner, engine} == {1, 2}
    rows = _rows(run)
    assert len(rows) == 2 and all(r["sync/verified"] == 1 and r["sync/bytes"] > 1e6 for r in rows)
    assert json.loads((run / "results.json").read_text())["steps"] == 2
    assert (run / "checkpoints" / "step_000002" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "upstream_cache.sqlite").exists()  # the upstream actor writes on the driver's host
    for worker in hosts.hosts[1:]:
        assert _files(worker.run_folder) == [], f"{worker.name} wrote into its run folder"


def test_engine_host_dies_and_the_run_goes_on(hosts):
    """Two engines on two hosts; SIGKILL the host that has an engine but not the learner: its
    engine is dropped and the run completes on the other, weights still verified."""
    job = f"mh-engine-{os.getpid()}"
    run = _submit(hosts, job, "engine_lost", "algorithm.steps=4", "rollout.num_engines=2", SMOKE_ANSWERS)
    _wait_for(lambda: len(_rows(run)) >= 1, "first step")
    learner = _host_of(hosts, run, "learner:0")
    victim = next(i for i in (1, 2) if i != learner)
    hosts.hosts[victim].kill()
    status = hosts.wait_job(job)
    logs = hosts.job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "lost with their node; going on with 1" in logs
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(4)) and all(r["sync/verified"] == 1 for r in rows)
    hosts.start_worker(victim, CPUS[victim])
    hosts.wait_for_nodes(3, 120)


def test_learner_host_dies_then_resume_on_a_fresh_cluster(hosts):
    """SIGKILL the learner's host after the first checkpoint: the job stops with a message
    naming the checkpoint; on a fresh cluster (every node restarted) the run resumes from it.
    Here the config names the interface for gloo (``cluster.socket_interface``)."""
    job = f"mh-learner-{os.getpid()}"
    sets = ("algorithm.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=0",
            "cluster.socket_interface=eth0")  # named in the config here, found from the Ray address above
    run = _submit(hosts, job, "learner_lost", *sets, SMOKE_ANSWERS)
    _wait_for(lambda: (run / "checkpoints" / "step_000001" / "meta.json").exists(), "first checkpoint")
    hosts.hosts[_host_of(hosts, run, "learner:0")].kill()
    status = hosts.wait_job(job)
    logs = hosts.job_logs(job)
    assert status == "FAILED", logs[-4000:]
    assert "a Ray actor the run needs died" in logs and "checkpoint.resume=true" in logs

    hosts.stop_all()
    hosts.start_ray(CPUS)
    resumed = f"mh-resumed-{os.getpid()}"
    _submit(hosts, resumed, "learner_lost", *sets, SMOKE_ANSWERS, "checkpoint.resume=true")
    status = hosts.wait_job(resumed)
    logs = hosts.job_logs(resumed)
    assert status == "SUCCEEDED", logs[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from_step"] >= 1 and results["steps"] == 3
    assert [r["step"] for r in _rows(run)][-(3 - results["resumed_from_step"]):] == list(range(results["resumed_from_step"], 3))
