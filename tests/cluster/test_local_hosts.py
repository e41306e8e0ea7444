"""cluster/local_hosts.py without Ray: each host its own PID namespace, disk and address; two
sets of hosts never collide; closing removes everything. Skipped where namespaces cannot be made."""

import subprocess
import time
from pathlib import Path

import pytest

from cluster.local_hosts import LocalHosts, unavailable

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no namespaces: {WHY}")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_hosts_have_their_own_processes_disk_and_address(tmp_path):
    with LocalHosts(2, tmp_path / "a") as hosts, LocalHosts(1, tmp_path / "b") as others:
        assert hosts.id != others.id and hosts.net != others.net
        for i in range(2):
            hosts.start(i, ["sleep", "600"])
        others.start(0, ["sleep", "600"])
        one, two = hosts.hosts
        ps = one.run(["ps", "-eo", "pid,comm"]).stdout.split("\n")[1:]
        assert [line.split() for line in ps if line.strip()][0] == ["1", "sleep"]  # its own first process
        assert one.run(["sh", "-c", f"echo one > {hosts.run_dir}/note"]).returncode == 0
        assert (one.run_folder / "note").read_text() == "one\n" and not (two.run_folder / "note").exists()
        assert two.run(["cat", f"{hosts.run_dir}/note"]).returncode != 0  # another disk
        assert f"inet {two.ip}/" in two.run(["ip", "-o", "-4", "addr"]).stdout
        reach = f"import socket; socket.create_connection(('{two.ip}', 9), timeout=5)"
        refused = one.run(["python3", "-c", reach]).stderr
        assert "ConnectionRefused" in refused  # the link carries packets: the port answers "closed"
        one.kill()
        assert two.run(["true"]).returncode == 0  # killing one host leaves the other running
    assert hosts.hosts[0].name not in _namespaces() and others.hosts[0].name not in _namespaces()


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    from cluster.local_hosts import remove_leftovers

    hosts = LocalHosts(1, tmp_path)  # as if its process were killed: never closed
    hosts.start(0, ["sleep", "600"])
    first = hosts.hosts[0].init_pid()
    assert {hosts.hosts[0].name, hosts.bridge} <= set(remove_leftovers(hosts.id))
    assert hosts.hosts[0].name not in _namespaces()
    hosts.hosts[0].process.wait(timeout=10)  # its processes are gone with it (at most a zombie)
    for _ in range(50):
        if _state(first) in ("Z", "X", "gone"):
            break
        time.sleep(0.1)
    assert _state(first) in ("Z", "X", "gone")


def _state(pid: int) -> str:
    """A process's state letter (R, S, Z...), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
