"""Several hosts on one Linux machine, to test scale-out the way rented nodes differ.

``ray.cluster_utils.Cluster`` gives every node one address, one disk and one process table;
rented nodes differ in all three, and that is where trainers break (gloo dialling its own
loopback, a file written on one node missing on another, ``ray stop`` on one node killing
another's head). Each :class:`Host` here has:

- its own **network namespace**, with one address on a shared link (a veth pair into a bridge
  in the root namespace, which also holds the link's first address and routes to it);
- its own **PID namespace**: ``ray start --block`` is the namespace's first process, so killing
  it (SIGKILL from outside) takes every process of that node down at once, and only those;
- its own **disk**: a private folder is bind-mounted over the shared run directory (and one
  over ``/tmp/ray``) inside the host's mount namespace, so what a host writes there only that
  host sees; from outside, host ``i``'s view is ``Host.folder / "run"``.

Needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``), ``ip``, ``unshare`` and ``nsenter``;
:func:`unavailable` says why not where they are missing. Names carry a random id, so two sets
of hosts never collide, and :meth:`LocalHosts.close` removes everything, also after a failure;
what a killed process could not remove, :func:`remove_leftovers` does.
The pytest fixture is in ``tests/cluster/test_multi_host.py``; ``scripts/local_hosts.py`` gives
people a shell on such a cluster.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

TOOLS = ("ip", "unshare", "nsenter", "mount")
RAY = str(Path(sys.executable).parent / "ray")  # the CLI of this environment, installed on every "host"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return f"network and PID namespaces need Linux (this is {sys.platform})"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "creating namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"unshare cannot create namespaces: {probe.stderr.strip()}"
    return None


def remove_leftovers(run_id: str | None = None) -> list[str]:
    """Remove what runs killed before their teardown left behind: the host namespaces (their
    processes killed) and links of run ``run_id`` (:attr:`LocalHosts.id`), or of *every* run
    (so not while another set of hosts is in use). The names removed."""
    run = re.escape(run_id) if run_id else "[0-9a-f]{6}"
    removed = []
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if re.fullmatch(rf"aa{run}h\d+", name):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") > 1 else ""
        if re.fullmatch(rf"aa(b{run}|{run}v\d+)", name):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            removed.append(name)
    return removed


def _sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.200.0.0/13 that no interface here uses."""
    used = _sh("ip", "-o", "-4", "addr")
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
        if f" {str(net.network_address)[:-1]}" not in used:
            return net
    raise RuntimeError("no free 10.200.0.0/13 subnet")


@dataclass
class Host:
    """One host: a network namespace, and while its node runs, a PID and mount namespace."""

    name: str  # the network namespace
    ip: str
    folder: Path  # private: bind-mounted over the run directory (and /tmp/ray) inside the host
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def run_folder(self) -> Path:
        """What this host sees at the shared run directory, viewed from outside."""
        return self.folder / "run"

    def init_pid(self) -> int:
        """The PID (as seen from outside) of the first process of this host's PID namespace."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"host {self.name} is not running")
        for _ in range(100):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name}: its first process did not start")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command run inside this host (its network, mount and PID namespaces)."""
        return ["nsenter", f"--target={self.init_pid()}", "--net", "--mount", "--pid", "--", *argv]

    def run(self, argv: Sequence[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, env=env)

    def kill(self) -> None:
        """SIGKILL the namespace's first process: the kernel kills every process of the host."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.kill(self.init_pid(), signal.SIGKILL)
        except (ProcessLookupError, RuntimeError):
            pass
        self.process.wait(timeout=60)


@dataclass
class Job:
    """A job submitted on the head, followed by its ``ray job submit`` client."""

    id: str
    process: subprocess.Popen = field(repr=False)
    log: Path

    def wait(self, timeout_s: float = 900) -> str:
        """SUCCEEDED, or FAILED (the job failed or was stopped: the client's exit status)."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise TimeoutError(f"job {self.id} did not end in {timeout_s:g} s") from None
        return "SUCCEEDED" if code == 0 else "FAILED"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


class LocalHosts:
    """``count`` hosts on one link, under ``base`` (a folder per host and the run directory).

    ``start_ray()`` starts a Ray head (on host 0 unless told otherwise) and workers on the
    others; ``submit()`` runs ``ray job submit`` on the head, as one would over SSH. Use as a
    context manager."""

    def __init__(self, count: int, base: Path, env: dict | None = None):
        if count < 1:
            raise ValueError(f"count={count} must be >= 1")
        self.id = secrets.token_hex(3)
        self.base = Path(base)
        self.run_dir = self.base / "run"  # the same path on every host; each sees its own folder
        # Ray 2.5x enables token auth: every node and the CLI share this run's token. No
        # RAY_ADDRESS from this process (a cluster of its own) may leak into the hosts.
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {**inherited, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    # a dead host is noticed in ~6 s, not Ray's default ~15-30 s (a live but
                    # busy one still has the default timeout per check to answer)
                    "RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "3",
                    **(env or {})}
        self.bridge = f"aab{self.id}"
        self.net = _free_subnet()
        addresses = list(self.net.hosts())
        self.gateway = str(addresses[0])
        self.hosts = [Host(f"aa{self.id}h{i}", str(addresses[10 + i]), self.base / f"host{i}")
                      for i in range(count)]
        self._links: list[str] = []
        self.head = 0  # the host the Ray head runs on (start_ray)
        try:
            self._make_link()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ network
    def _make_link(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _sh("ip", "addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for i, host in enumerate(self.hosts):
            outside, inside = f"aa{self.id}v{i}", f"aa{self.id}p{i}"
            _sh("ip", "netns", "add", host.name)
            _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self._links.append(outside)
            _sh("ip", "link", "set", outside, "master", self.bridge, "up")
            _sh("ip", "link", "set", inside, "netns", host.name)
            inns = ("ip", "netns", "exec", host.name, "ip")
            _sh(*inns, "link", "set", inside, "name", "eth0")
            _sh(*inns, "addr", "add", f"{host.ip}/{self.net.prefixlen}", "dev", "eth0")
            _sh(*inns, "link", "set", "eth0", "up")
            _sh(*inns, "link", "set", "lo", "up")
            _sh(*inns, "route", "add", "default", "via", self.gateway)
            (host.folder / "run").mkdir(parents=True, exist_ok=True)
            (host.folder / "ray").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ nodes
    def start(self, index: int, argv: Sequence[str], log_name: str = "node.log") -> Host:
        """Start ``argv`` as the first process of a fresh PID and mount namespace in host
        ``index``, with its private folder mounted over the run directory and /tmp/ray."""
        host = self.hosts[index]
        if host.process is not None and host.process.poll() is None:
            raise RuntimeError(f"host {index} is already running")
        Path("/tmp/ray").mkdir(exist_ok=True)
        script = (f"mount --bind {shlex.quote(str(host.folder / 'run'))} {shlex.quote(str(self.run_dir))} && "
                  f"mount --bind {shlex.quote(str(host.folder / 'ray'))} /tmp/ray && exec \"$@\"")
        log = open(host.folder / log_name, "ab")
        host.process = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "--pid", "--fork", "--mount-proc",
             "--propagation", "private", "sh", "-c", script, "node", *argv],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        return host

    def start_ray(self, cpus: Sequence[float], timeout_s: float = 120, head: int = 0) -> None:
        """A Ray head on host ``head`` (dashboard on its loopback, as by default) and a worker
        on every other host, ``cpus[i]`` logical CPUs each; waits until all nodes are alive."""
        self.head = head
        self.start(head, [RAY, "start", "--head", f"--node-ip-address={self.hosts[head].ip}", "--port=6379",
                       f"--num-cpus={cpus[head]:g}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                       "--block", "--disable-usage-stats"])
        self.wait_for_nodes(1, timeout_s)
        for i in range(len(self.hosts)):
            if i != head:
                self.start_worker(i, cpus[i])
        self.wait_for_nodes(len(self.hosts), timeout_s)

    def start_worker(self, index: int, cpus: float) -> None:
        """Start host ``index``'s worker node (again, after :meth:`Host.kill`), joining the head."""
        self.start(index, [RAY, "start", f"--address={self.hosts[self.head].ip}:6379",
                           f"--node-ip-address={self.hosts[index].ip}", f"--num-cpus={cpus:g}",
                           "--block", "--disable-usage-stats"])

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address='{self.hosts[self.head].ip}:6379', logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        done = self.hosts[self.head].run([sys.executable, "-c", code], timeout=120, env=self.env)
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while self.alive_nodes() < count:
            for host in self.hosts:
                if host.process is not None and host.process.poll() is not None:
                    raise RuntimeError(f"host {host.name} exited: {self.log(host)[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{count} Ray nodes not alive after {timeout_s:g} s")
            time.sleep(1)

    def log(self, host: Host, name: str = "node.log") -> str:
        path = host.folder / name
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ jobs
    def submit(self, job_id: str, working_dir: Path, entrypoint: Sequence[str]) -> Job:
        """``ray job submit`` on the head, left running to follow the job to its end (no
        polling: one client streams the job's log into ``<base>/<job_id>.log``)."""
        log = self.base / f"{job_id}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.hosts[self.head].command([RAY, "job", "submit", "--address=http://127.0.0.1:8265",
                                       f"--working-dir={working_dir}", f"--submission-id={job_id}", "--",
                                       *entrypoint]),
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return Job(job_id, process, log)

    # ------------------------------------------------------------------ teardown
    def stop_all(self) -> None:
        for host in reversed(self.hosts):
            host.kill()

    def close(self) -> None:
        """Kill every host's processes and remove the namespaces and links (not the folders)."""
        self.stop_all()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)

    def __enter__(self) -> LocalHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
