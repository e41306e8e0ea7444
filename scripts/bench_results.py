"""What every benchmark script writes beside its numbers: the machine it ran on, and the JSON
file itself (``results/*.json``, linked from the README)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict:
    """CPUs, the load average (on a shared machine, times are upper bounds), Python, platform."""
    return {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0],
            "platform": platform.platform()}


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
