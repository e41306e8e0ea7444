"""A recipe study: several training configurations on one wall-clock budget, one held-out set.

    python scripts/study.py configs/study/t1.yaml                 # every run, then the report
    python scripts/study.py configs/study/t1.yaml --only peer,sft  # some runs
    python scripts/study.py configs/study/t1.yaml --report-only    # rebuild the report

The spec (YAML) names a base config, overrides every run shares (the data, the evaluation, the
budget) and the runs, each with its own overrides and a sentence on what it tests. Each run is
``scripts/train.py`` in a subprocess (a fresh process per run: no memory or thread state leaks
from one into the next), writing to ``runs/<study>/<run>``; its log is ``train.log`` there.
Then the run's evidence (resolved config, results, step metrics, per-item evaluation) is copied
to ``<out>/<run>/`` and the study's table is written to ``<out>/study.json`` and
``<out>/study.md``. A run whose results are already in ``<out>`` is not run again unless
``--rerun``: a study killed halfway continues where it stopped.

Budgets: ``algorithm.max_train_seconds`` (training, the SFT stage included; evaluation excluded)
is the same for every run, so runs are compared at equal cost on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVIDENCE = ("config.yaml", "results.json", "metrics.jsonl", "sft_metrics.jsonl", "eval_before.jsonl",
            "eval_after_sft.jsonl", "eval_after.jsonl", "train.log")
LEARNED = 0.8
"""A symbol counts as learned at the first periodic evaluation with at least this accuracy."""
REWARD_BLOCK = 10
"""Steps per point of the report's training-reward line."""


def load_spec(path: Path) -> dict:
    from rl.config_schema import read_yaml

    spec, lines = read_yaml(path)
    where = lambda key: lines.get(key, str(path))  # noqa: E731
    for key in ("name", "config", "budget_s", "runs"):
        if key not in spec:
            raise SystemExit(f"{where('<root>')}: the study needs a {key!r} key")
    names = [run.get("name") for run in spec["runs"]]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise SystemExit(f"{where('runs')}: every run needs a distinct name, got {names}")
    return spec


def train_command(spec: dict, run: dict, run_dir: Path) -> list[str]:
    overrides = [*spec.get("set", []), *run.get("set", []),
                 f"algorithm.max_train_seconds={spec['budget_s']}", f"logging.run_dir={run_dir}",
                 f"logging.name={run['name']}"]
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / spec["config"])]
    for override in overrides:
        command += ["--set", override]
    return command


def execute(spec: dict, run: dict, run_dir: Path, out: Path) -> None:
    from rl.config import load_config

    command = train_command(spec, run, run_dir)
    load_config(command[3], command[5::2])  # a bad override fails here, before any run starts
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[study] {run['name']}: {run.get('about', '')}", flush=True)
    start = time.perf_counter()
    with (run_dir / "train.log").open("w", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0 or not (run_dir / "results.json").is_file():
        raise SystemExit(f"[study] {run['name']} failed (exit {code}); see {run_dir / 'train.log'}")
    target = out / run["name"]
    target.mkdir(parents=True, exist_ok=True)
    for name in EVIDENCE:
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, target / name)
    print(f"[study] {run['name']} done in {time.perf_counter() - start:.0f} s", flush=True)


# --------------------------------------------------------------------------------- the report
def _accuracy(summary: dict | None, key: str) -> float | None:
    return None if not summary or key not in summary else summary[key]["accuracy"]


def summarize_run(folder: Path, run: dict) -> dict:
    results = json.loads((folder / "results.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"] + 1, "train_seconds": round(r["time/train_seconds"], 1),
              **{k.removeprefix("eval/"): round(v, 3) for k, v in r.items() if k.startswith("eval/")}}
             for r in rows if any(k.startswith("eval/") for k in r)]
    symbols = sorted({k for point in curve for k in point if k.startswith("symbol/")})
    learned_at = {s.removeprefix("symbol/"): next((p["step"] for p in curve if p.get(s, 0) >= LEARNED), None)
                  for s in symbols}
    after = results.get("after", {})
    evaluated = folder / "eval_after.jsonl"
    items = [json.loads(line) for line in evaluated.read_text().splitlines()] if evaluated.is_file() else []
    upstream = {c: sum(r["api_correct"] for r in items if r["category"] == c) / max(1, sum(r["category"] == c for r in items))
                for c in ("custom", "standard") if any(r["category"] == c for r in items)}
    return {
        "name": run["name"], "about": run.get("about", ""), "set": run.get("set", []),
        "steps": results.get("steps"), "train_seconds": round(results.get("train_seconds", 0.0), 1),
        "sft": results.get("sft"),
        "stalled_steps": sum(r.get("groups/zero_variance_fraction", 0) >= 1.0 for r in rows),
        "flat_groups_first_5": round(sum(r.get("groups/zero_variance_fraction", 0) for r in rows[:5])
                                     / max(1, len(rows[:5])), 2),
        "accuracy": {stage: {c: _accuracy(results.get(stage), c) for c in ("custom", "standard", "overall")}
                     for stage in ("before", "after_sft", "after") if stage in results},
        "by_symbol": {s: v["accuracy"] for s, v in after.get("by_symbol", {}).items()},
        "reward_curve": results.get("reward_curve", []),
        "eval_curve": curve, "learned_at_step": learned_at, "upstream_accuracy": upstream,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def reward_blocks(curve: list[float], size: int = REWARD_BLOCK) -> list[float]:
    """The training reward curve as means of consecutive blocks of ``size`` steps (the last
    block may be shorter): a per-step curve of 4 prompts x 8 completions is too noisy to read.

    >>> reward_blocks([0.0, 0.5, 1.0], size=2)
    [0.25, 1.0]
    """
    return [round(sum(block) / len(block), 3) for block in (curve[i:i + size] for i in range(0, len(curve), size))]


def markdown(spec: dict, rows: list[dict], command: str) -> str:
    symbols = [s for s in ("θ", "α", "γ", "β", "+", "-", "*", "/") if any(s in r["by_symbol"] for r in rows)]
    lines = [f"# Study `{spec['name']}`", "", spec.get("about", "").strip(), "",
             f"Every run: {spec['budget_s']} s of training (SFT included, evaluation excluded) on this "
             f"machine, then greedy evaluation on the same held-out set. Reproduce with `{command}`. "
             "Flat groups: the share of sampled groups whose rewards were all equal (no signal); "
             "stalled steps: steps where every group was flat.", "",
             "| run | steps | train s | custom | standard | overall | flat groups, steps 1-5 | stalled steps | "
             + " | ".join(symbols) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(symbols)]
    for r in rows:
        after = r["accuracy"].get("after", {})
        lines.append(f"| `{r['name']}` | {r['steps']} | {r['train_seconds']:.0f} | {_pct(after.get('custom'))} | "
                     f"{_pct(after.get('standard'))} | {_pct(after.get('overall'))} | "
                     f"{_pct(r['flat_groups_first_5'])} | {r['stalled_steps']} | "
                     + " | ".join(_pct(r["by_symbol"].get(s)) for s in symbols) + " |")
    upstream = next((r["upstream_accuracy"] for r in rows if r["upstream_accuracy"]), {})
    if upstream:
        lines += ["", f"The upstream alone on the same items: custom {_pct(upstream.get('custom'))}, "
                      f"standard {_pct(upstream.get('standard'))}."]
    lines += ["", "Before training (and after the SFT warm-start, where there is one):", "",
              "| run | before: custom / standard | after SFT: custom / standard |", "|---|---|---|"]
    for r in rows:
        acc = r["accuracy"]
        pair = lambda s: f"{_pct(acc[s]['custom'])} / {_pct(acc[s]['standard'])}" if s in acc else "–"  # noqa: E731
        lines.append(f"| `{r['name']}` | {pair('before')} | {pair('after_sft')} |")
    lines += ["", "## The runs", ""]
    for r in rows:
        lines += [f"### `{r['name']}`", "", r["about"], "", "Overrides: " + ", ".join(f"`{s}`" for s in r["set"]), ""]
        if r["reward_curve"]:
            blocks = ", ".join(f"{x:.2f}" for x in reward_blocks(r["reward_curve"]))
            lines += [f"Training reward (mean over the sampled completions), per {REWARD_BLOCK} GRPO steps: "
                      f"{blocks}.", ""]
        if r["eval_curve"]:
            lines += ["| step | train s | custom | standard | " + " | ".join(symbols[:4]) + " |",
                      "|---|---|---|---|" + "---|" * len(symbols[:4])]
            for p in r["eval_curve"]:
                lines.append(f"| {p['step']} | {p['train_seconds']:.0f} | {_pct(p.get('custom'))} | "
                             f"{_pct(p.get('standard'))} | "
                             + " | ".join(_pct(p.get(f"symbol/{s}")) for s in symbols[:4]) + " |")
            learned = ", ".join(f"{s} at step {step}" for s, step in r["learned_at_step"].items()
                                if step is not None and s in symbols[:4])
            lines += ["", f"Learned (≥ {LEARNED:.0%} held-out): {learned or 'none'}.", ""]
    return "\n".join(lines) + "\n"


def report(spec: dict, spec_path: Path, out: Path) -> list[dict]:
    rows = [summarize_run(out / run["name"], run) for run in spec["runs"] if (out / run["name"] / "results.json").is_file()]
    command = f"python scripts/study.py {spec_path}"
    (out / "study.json").write_text(json.dumps({"study": spec["name"], "budget_s": spec["budget_s"],
                                                "command": command, "spec": spec, "runs": rows}, indent=2) + "\n")
    (out / "study.md").write_text(markdown(spec, rows, command))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the study's YAML")
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--out", type=Path, help="where the evidence goes (default: results/study_<name>)")
    parser.add_argument("--runs-dir", type=Path, help="run folders (default: runs/study_<name>)")
    parser.add_argument("--rerun", action="store_true", help="run again even where results exist")
    parser.add_argument("--report-only", action="store_true", help="only rebuild study.json and study.md")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    out = args.out or ROOT / "results" / f"study_{spec['name']}"
    runs_dir = args.runs_dir or ROOT / "runs" / f"study_{spec['name']}"
    chosen = spec["runs"]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {r["name"] for r in chosen})
        if unknown:
            raise SystemExit(f"--only: no run named {unknown}; the study has {[r['name'] for r in chosen]}")
        chosen = [r for r in chosen if r["name"] in wanted]
    if not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        for run in chosen:
            if args.rerun or not (out / run["name"] / "results.json").is_file():
                execute(spec, run, runs_dir / run["name"], out)
    for row in report(spec, args.spec, out):
        after = row["accuracy"].get("after", {})
        print(f"{row['name']:>16}: {row['steps']} steps, custom {_pct(after.get('custom'))}, "
              f"standard {_pct(after.get('standard'))}")
    print(f"wrote {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
