"""Several hosts on this Linux machine, with a Ray cluster across them (as root).

    python scripts/local_hosts.py --hosts 3 --cpus 0,2,2 -- \\
        ray job submit --working-dir . -- python scripts/train.py --config configs/smoke.yaml \\
        --set cluster.placement_strategy=SPREAD --set logging.run_dir=RUN/smoke

Each host has its own network namespace and address on a shared link, its own PID namespace
(its ``ray start --block`` is the first process) and its own disk at the run folder
(cluster/local_hosts.py). ``RUN/`` in the command stands for that run folder (the same path on
every host). The command runs on the head (as over SSH to it), then each host's run folder is
listed and everything is torn down. Without a command the cluster stays up until Ctrl-C, and
the lines to open a shell on each host are printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local_hosts import LocalHosts, remove_leftovers, unavailable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    parser.add_argument("--cpus", default=None, help="logical CPUs per host, comma-separated (default: 2 each)")
    parser.add_argument("--base", type=Path, default=Path("/tmp/api-adapter-hosts"),
                        help="folder for the hosts' disks and the run folder")
    parser.add_argument("--remove-leftovers", action="store_true",
                        help="remove the namespaces and links that killed runs left behind, and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND to run on the head")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.remove_leftovers:
        print("removed: " + (", ".join(remove_leftovers()) or "nothing"))
        return 0
    cpus = [float(c) for c in args.cpus.split(",")] if args.cpus else [2.0] * args.hosts
    if len(cpus) != args.hosts:
        print(f"error: --cpus has {len(cpus)} values for {args.hosts} hosts", file=sys.stderr)
        return 2
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with LocalHosts(args.hosts, args.base) as hosts:
        hosts.start_ray(cpus)
        for i, host in enumerate(hosts.hosts):
            print(f"host {i}: {host.ip}  disk {host.folder}  (ns {host.name})")
        print(f"run folder on every host: {hosts.run_dir}")
        if not command:
            for i, host in enumerate(hosts.hosts):
                print(f"shell on host {i}: RAY_AUTH_TOKEN={hosts.env['RAY_AUTH_TOKEN']} "
                      f"{shlex.join(host.command(['bash']))}")
            try:
                hosts.hosts[0].process.wait()
            except KeyboardInterrupt:
                pass
            return 0
        command = [part.replace("RUN/", f"{hosts.run_dir}/") for part in command]
        done = subprocess.run(hosts.hosts[0].command(command), env=hosts.env, cwd=os.getcwd())
        for i, host in enumerate(hosts.hosts):
            files = sorted(p for p in host.run_folder.rglob("*") if p.is_file())
            print(f"host {i} run folder: {len(files)} files")
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
