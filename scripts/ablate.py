"""Prompt ablations: train each condition's config, then tabulate the runs side by side.

    api-adapter ablate                                   # configs/ablation_{A,B,C,D}.yaml
    api-adapter ablate --configs configs/ablation_C.yaml configs/ablation_D.yaml --set algorithm.steps=60
    api-adapter ablate --table-only                      # tabulate the runs already trained

The four conditions (rl/prompts.py): A explicit definitions, B none, C explicit + CORRECT,
D vague + CORRECT (the seed's). Their configs are the CPU t1 setup with only
``data.condition`` and ``logging.name`` changed, so each run has its own folder.

Every config is loaded with the same ``--set`` overrides and checked before any training (a
typo fails in a second, not after the first hour; two configs that would share a run folder
are refused). Then each is trained in this process with scripts/train.py's ``run(config)``,
one after the other. A run whose folder already has ``results.json`` is tabulated, not
retrained, unless ``--retrain`` (so an interrupted ablation resumes where it stopped); a run
that fails is reported and the others go on. Last, the side-by-side table -- held-out
accuracy before and after training (custom, standard, overall, with counts), the change, the
reward's first and last step, steps and training time -- is printed and written to ``--out``
as ``summary.md`` and ``summary.json``. Exit status: 0; 1 when a run failed; 2 for a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIGS = [Path(f"configs/ablation_{c}.yaml") for c in "ABCD"]
SCOPES = ("custom", "standard", "overall")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api-adapter ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS,
                   help="run configs (default: configs/ablation_{A,B,C,D}.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, e.g. --set algorithm.steps=10 (repeatable)")
    p.add_argument("--retrain", action="store_true", help="train again where results.json exists")
    p.add_argument("--table-only", action="store_true", help="train nothing; tabulate the runs' folders")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="where summary.md/.json go")
    return p


@dataclass
class RunResult:
    """One run as the table sees it: ``before``/``after`` are results.json's summaries (each
    ``{"custom": {"correct", "total", "accuracy"}, ...}``), None when absent; ``error`` says
    why a run has no results."""

    name: str
    condition: str | None
    run_dir: str
    before: dict | None = None
    after: dict | None = None
    steps: int | None = None
    train_seconds: float | None = None
    reward_curve: list = field(default_factory=list)
    error: str | None = None


def load_run(run_dir: str | Path, name: str | None = None, condition: str | None = None) -> RunResult:
    """A run folder's ``results.json`` (and ``config.yaml`` for the name and condition)."""
    import yaml

    run_dir = Path(run_dir)
    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    name = name or (config.get("logging") or {}).get("name") or run_dir.name
    condition = condition or (config.get("data") or {}).get("condition")
    path = run_dir / "results.json"
    if not path.is_file():
        return RunResult(name, condition, str(run_dir), error=f"no {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return RunResult(name, condition, str(run_dir), error=f"{path}: not JSON ({error})")
    return RunResult(name, condition, str(run_dir), before=results.get("before"), after=results.get("after"),
                     steps=results.get("steps"), train_seconds=results.get("train_seconds"),
                     reward_curve=list(results.get("reward_curve") or []))


# ----------------------------------------------------------------------------- the table


def _count(summary: dict | None, scope: str) -> str:
    value = (summary or {}).get(scope)
    if not value:
        return "-"
    return f"{value['correct']}/{value['total']} ({100 * value['accuracy']:.1f}%)"


def _change(run: RunResult, scope: str) -> str:
    before, after = (run.before or {}).get(scope), (run.after or {}).get(scope)
    if not before or not after:
        return "-"
    return f"{100 * (after['accuracy'] - before['accuracy']):+.1f} pts"


def _reward(run: RunResult) -> str:
    curve = run.reward_curve
    return f"{curve[0]:.3f} -> {curve[-1]:.3f}" if curve else "-"


def table_rows(runs: list[RunResult]) -> list[tuple[str, list[str]]]:
    """``(label, one cell per run)`` for every line of the side-by-side table."""
    rows = [("run", [r.name for r in runs]), ("condition", [r.condition or "?" for r in runs])]
    for scope in SCOPES:
        rows.append((f"{scope} before", [_count(r.before, scope) for r in runs]))
        rows.append((f"{scope} after", [_count(r.after, scope) for r in runs]))
        rows.append((f"{scope} change", [_change(r, scope) for r in runs]))
    rows.append(("reward first -> last", [_reward(r) for r in runs]))
    rows.append(("steps", ["-" if r.steps is None else str(r.steps) for r in runs]))
    rows.append(("train time", ["-" if r.train_seconds is None else f"{r.train_seconds:.0f} s" for r in runs]))
    if any(r.error for r in runs):
        rows.append(("error", [r.error or "" for r in runs]))
    return rows


def format_text(runs: list[RunResult]) -> str:
    """The table as aligned plain text, one column per run."""
    rows = table_rows(runs)
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(runs))]
    return "\n".join(f"{label:<{label_width}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()
                     for label, cells in rows)


def format_markdown(runs: list[RunResult]) -> str:
    """The table as Markdown, with the run folders listed under it."""
    rows = table_rows(runs)
    header, *body = rows
    lines = ["# Prompt ablation", "", "| | " + " | ".join(header[1]) + " |",
             "|---|" + "---|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for label, cells in body]
    lines += ["", "Held-out accuracy before and after training (correct/total); change in percentage "
              "points. Runs:", ""]
    lines += [f"- {r.name} (condition {r.condition or '?'}): `{r.run_dir}`" for r in runs]
    return "\n".join(lines) + "\n"


def summary_json(runs: list[RunResult]) -> dict:
    return {"scopes": list(SCOPES), "runs": [asdict(r) for r in runs]}


def write_summary(runs: list[RunResult], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "summary.md", out / "summary.json"
    md.write_text(format_markdown(runs), encoding="utf-8")
    js.write_text(json.dumps(summary_json(runs), indent=2) + "\n", encoding="utf-8")
    return md, js


# ----------------------------------------------------------------------------- running


def load_configs(paths: list[Path], overrides: list[str]) -> list:
    """Every config, loaded and checked; ValueError (ConfigError) on the first bad one or when
    two would write into one run folder."""
    from rl.config import load_config
    from rl.storage import run_dir

    configs = [load_config(path, overrides) for path in paths]
    folders: dict[Path, Path] = {}
    for path, config in zip(paths, configs):
        folder = run_dir(config)
        if folder in folders:
            raise ValueError(f"{path} and {folders[folder]} would both write into {folder}; "
                             "give each a logging.name (and keep {name} in logging.run_dir)")
        folders[folder] = path
    return configs


def train_one(config, retrain: bool) -> RunResult:
    """Train one config (unless its results exist and ``retrain`` is off) and load its results."""
    from rl.storage import run_dir

    folder = run_dir(config)
    if retrain or not (folder / "results.json").is_file():
        from scripts.train import run

        print(f"=== training {config.logging.name} (condition {config.data.condition}) into {folder}", flush=True)
        try:
            run(config)
        except Exception as error:  # noqa: BLE001 - one failed run must not cost the others
            print(f"=== {config.logging.name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return RunResult(config.logging.name, config.data.condition, str(folder),
                             error=f"{type(error).__name__}: {error}")
    else:
        print(f"=== {config.logging.name}: {folder / 'results.json'} exists; not retrained (--retrain does)")
    return load_run(folder, config.logging.name, config.data.condition)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = load_configs(args.configs, args.set)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from rl.storage import run_dir

    if args.table_only:
        runs = [load_run(run_dir(c), c.logging.name, c.data.condition) for c in configs]
    else:
        runs = [train_one(c, args.retrain) for c in configs]
    print(format_text(runs))
    md, js = write_summary(runs, args.out)
    print(f"wrote {md} and {js}")
    return 1 if any(r.error for r in runs) and not args.table_only else 0


if __name__ == "__main__":
    sys.exit(main())
