"""The main job on the embedded default: ``api-adapter main`` (what ``scripts/main.sh`` runs).

The tier-1 recipe cut to a few minutes: the embedded SmolLM2-135M adapter gets a format
warm-start on standard-symbol items, then GRPO on the easiest symbol tier, with the embedded
model as the local upstream: no GPU, no credentials, no downloads. It is
``scripts/train.py --config configs/quickstart.yaml``; extra arguments are passed on, e.g.
``api-adapter main --set algorithm.steps=12``.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    from scripts import train

    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    return train.main(["--config", str(CONFIG), *argv])


if __name__ == "__main__":
    sys.exit(main())
