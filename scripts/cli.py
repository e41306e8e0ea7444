"""``api-adapter <command> [args]``: one console entry point over the scripts.

Each command is a module in ``scripts/`` with ``main(argv) -> int``; it is imported only
when run, so ``api-adapter --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "main": ("scripts.main_job", "the main job on the embedded default (see README)"),
    "train": ("scripts.train", "train an adapter with GRPO from a config"),
    "generate-dataset": ("scripts.generate_dataset", "write a task's train/test JSONL"),
    "baseline": ("scripts.run_baseline", "the upstream alone on a task file, cached"),
    "bench-verifiers": ("scripts.bench_verifiers", "verifier throughput and latency"),
    "chain": ("scripts.chain", "upstream -> adapter -> final answer, on the command line or as an HTTP service"),
    "sft": ("scripts.sft", "GSM8K SFT stages: rationale SFT, then boundary self-distillation"),
    "rationale-data": ("scripts.rationale_data", "GSM8K train solutions as strict final-line SFT rows"),
    "ablate": ("scripts.ablate", "train the prompt conditions A-D and tabulate them side by side"),
    "evaluate": ("scripts.evaluate", "upstream alone, base model and adapters on a test file, side by side"),
    "compare": ("scripts.compare", "two evaluated runs item by item, re-graded if asked, with paired-bootstrap intervals"),
    "synthesize": ("scripts.synthesize", "write questions, derive their answers with SymPy tools, keep the verified"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: api-adapter <command> [args]   (api-adapter <command> --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"api-adapter: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from rl.config_schema import ConfigError

    try:
        return module.main(argv[1:])
    except ConfigError as error:  # a config no command caught itself: the message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `api-adapter ... | head`: the reader is gone, so end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
