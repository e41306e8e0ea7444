"""Reports people can trust: one results JSON, a Markdown report and PNG plots per evaluation.

:func:`write_report` writes into ``out_dir``:

- ``results.json``: title, model and adapter identity, the test data's path and sha256, the
  config, the metrics (``before`` / ``after`` summaries of :func:`rl.evaluation.summarize`),
  anything else the caller passed, and every per-example record (``records``, which
  ``python -m rl.bootstrap`` reads directly);
- ``report.md``: the identity, the seed's accuracy table (before, after, change), the
  breakdowns (per symbol, per operand count, decisions, verdicts, errors, the GSM8K answer
  boundary raw vs stop-aware, pass@k), the plots, and a sample gallery: a few correct and a
  few failed examples per category, the failures spread over the error kinds;
- ``plots/training_curves.png`` (reward per step, and periodic ``eval/*`` accuracy when the
  metrics history has it), ``plots/category_accuracy.png``, ``plots/symbol_accuracy.png``.

``python -m rl.report RUN_DIR`` builds the report of a training run folder
(``eval_before.jsonl``, ``eval_after.jsonl``, ``metrics.jsonl``, ``config.yaml``).
matplotlib is imported inside the plotting functions (Agg backend), only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from rl.evaluation import (
    BOUNDARY_COUNTS,
    DECISION_LABELS,
    DECISIONS,
    ERROR_KINDS,
    VERDICTS,
    EvalRow,
    rows_as_dicts,
    summarize,
)
from verifiers.answers import GSM8K_BUCKETS

IDENTITY_KEYS = ("title", "model", "adapter", "test_path", "data", "config", "before", "after", "stages")
SNIPPET_CHARS = 400
SMOOTH_ABOVE = 50  # steps; longer curves get a moving average


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(out_dir: str | Path, results: dict, rows: Iterable[EvalRow | dict],
                 metrics_history: list[dict] | None = None, gallery_size: int = 3) -> dict[str, Path]:
    """Write the results JSON, the Markdown report and the plots; ``{name: path}``.

    ``results`` may hold ``title``, ``model``, ``adapter`` (strings or dicts), ``test_path``
    (hashed here) or ``data`` (``{"path", "sha256"}``), ``config`` (a dict), ``before`` /
    ``after`` summaries (``after`` defaults to the summary of ``rows``), ``stages`` (``{name:
    summary}`` in order, the bars of the accuracy plots; default: before and after), and any
    other JSON-ready keys, kept under ``extra``. ``rows`` are the final evaluation's records.
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    records = rows_as_dicts(rows)
    after = results.get("after") or summarize([EvalRow.from_dict(r) for r in records])
    before = results.get("before")
    stages = results.get("stages") or ({"before": before, "after": after} if before else {"accuracy": after})
    document = {
        "title": results.get("title", "Evaluation report"),
        "model": results.get("model"),
        "adapter": results.get("adapter"),
        "data": _data_identity(results, len(records)),
        "config": results.get("config"),
        "metrics": {"before": before, "after": after, "stages": stages},
        "extra": {k: v for k, v in results.items() if k not in IDENTITY_KEYS},
        "records": records,
    }
    paths = {"results": out / "results.json"}
    paths["results"].write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    plots = {
        "training_curves": plot_training_curves(metrics_history or [], out / "plots" / "training_curves.png"),
        "category_accuracy": plot_category_accuracy(stages, out / "plots" / "category_accuracy.png"),
        "symbol_accuracy": plot_symbol_accuracy(stages, out / "plots" / "symbol_accuracy.png"),
    }
    paths.update({name: path for name, path in plots.items() if path is not None})
    paths["report"] = out / "report.md"
    markdown = render_markdown(document, {n: p.relative_to(out) for n, p in plots.items() if p}, gallery_size)
    paths["report"].write_text(markdown, encoding="utf-8")
    return paths


def _data_identity(results: dict, n_records: int) -> dict:
    data = dict(results.get("data") or {})
    if results.get("test_path"):
        data["path"] = str(results["test_path"])
        data["sha256"] = sha256_file(results["test_path"])
    data["n_records"] = n_records
    return data


# --- Markdown --------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows] + [""]


def _acc(value: dict | None) -> str:
    if not value:
        return "—"
    return f"{value['correct']}/{value['total']} ({100 * value['accuracy']:.1f}%)"


def _change(before: dict | None, after: dict | None) -> str:
    if not before or not after:
        return "—"
    points = 100 * (after["accuracy"] - before["accuracy"])
    return f"{after['correct'] - before['correct']:+d} ({points:+.1f} pts)"


def _compare(before: dict | None, after: dict, keys: Sequence[str], label=str) -> list[list[str]]:
    """Rows ``[label, before, after, change]``; ``[label, accuracy]`` when ``before`` is None."""
    rows = []
    for key in keys:
        b = None if before is None else before.get(key)
        cells = [label(key)] + ([] if before is None else [_acc(b)]) + [_acc(after.get(key))]
        rows.append(cells + ([] if before is None else [_change(b, after.get(key))]))
    return rows


def _columns(before: dict | None) -> list[str]:
    return ["accuracy"] if before is None else ["before", "after", "change"]


def _breakdowns(after: dict, before: dict | None) -> list[str]:
    lines: list[str] = []
    if "by_symbol" in after:
        symbols = after["by_symbol"]
        label = lambda s: f"{s} ({symbols[s]['op']})" if symbols[s]["alphabet"] == "custom" else s  # noqa: E731
        lines += ["## Accuracy per symbol", "",
                  "Accuracy over the items that contain each symbol: which operations have been learned.", ""]
        prior = (before or {}).get("by_symbol")
        lines += _table(["symbol", *_columns(prior)], _compare(prior, symbols, list(symbols), label))
    if "by_operands" in after:
        lines += ["## Accuracy per operand count", ""]
        rows, prior = [], (before or {}).get("by_operands")
        for scope, counts in after["by_operands"].items():
            scoped = None if prior is None else prior.get(scope, {})
            rows += [[scope] + r for r in _compare(scoped, counts, list(counts))]
        lines += _table(["category", "operands", *_columns(prior)], rows)
    if "decisions" in after:
        scopes = list(after["decisions"])
        lines += ["## What the adapter did with the API's answer", ""]
        lines += _table(["decision", *scopes],
                        [[DECISION_LABELS[k]] + [after["decisions"][s][k] for s in scopes] for k in DECISIONS])
        lines += _table(["verdict", *(f"{s}: n (right)" for s in scopes)],
                        [[v] + [f"{after['verdicts'][s][v]['n']} ({after['verdicts'][s][v]['correct']})"
                                for s in scopes] for v in VERDICTS])
        lines += ["Errors: `no_answer` (no readable final answer), `misread_symbol` (the value with a custom "
                  "symbol read as another operation), `echo_api` (the API's answer, accepted or copied), "
                  "`echo_operand` (a number of the expression), `arithmetic` (any other number).", ""]
        lines += _table(["error", *scopes], [[k] + [after["errors"][s].get(k, "–") for s in scopes]
                                             for k in ("wrong", *ERROR_KINDS)])
    if "boundary" in after:
        raw, cut = after["boundary"]["raw"], after["boundary"]["stop_aware"]
        lines += ["## Answer boundary (GSM8K)", "", f"{raw['total']} completions, raw and stop-aware.", ""]
        lines += _table(["metric", "raw", "stop-aware"],
                        [[k.replace("_", " "), raw[k], cut[k]] for k in BOUNDARY_COUNTS]
                        + [[b, raw["buckets"][b], cut["buckets"][b]] for b in GSM8K_BUCKETS])
    if "samples" in after:
        lines += ["## Sampling (pass@k)", ""]
        lines += _table(["category", "items", "samples", "pass@1", "pass@k"],
                        [[s, v["items"], v["n_samples"], f"{100 * v['pass@1']:.1f}%", f"{100 * v['pass@k']:.1f}%"]
                         for s, v in after["samples"].items()])
    return lines


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _spread(rows: list[dict], size: int) -> list[dict]:
    """Up to ``size`` failed rows taken round-robin over their failure kinds."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_failure_kind(row), []).append(row)
    chosen, queues = [], [groups[kind] for kind in sorted(groups)]
    while len(chosen) < size and any(queues):
        for queue in queues:
            if queue and len(chosen) < size:
                chosen.append(queue.pop(0))
    return chosen


def _failure_kind(row: dict) -> str:
    if row.get("boundary"):
        return row["boundary"]["raw"]["bucket"]
    return row.get("error") or "wrong"


def _gallery_entry(row: dict) -> list[str]:
    decision = {"none": "no verdict"}.get(row.get("decision"), row.get("decision"))
    verdict = f"{decision} → {row['answer']}" if decision else f"answer {row['answer']}"
    mark = "right" if row["correct"] else f"wrong ({_failure_kind(row)})"
    api = f" · API {row['api_answer']}" if row.get("decision") is not None else ""
    head = f"- `{row['uid']}` · truth {row['truth']}{api} · adapter: {verdict} · {mark}"
    text = row["completion"] if len(row["completion"]) <= SNIPPET_CHARS else row["completion"][:SNIPPET_CHARS] + " …"
    fence = _fence(text + row["expression"])
    expression = row["expression"].strip()
    task = expression if len(expression) <= SNIPPET_CHARS else expression[:SNIPPET_CHARS] + " …"
    return [head, "", f"  {fence}text", *(f"  {line}" for line in f"task: {task}\n---\n{text}".splitlines()),
            f"  {fence}", ""]


def gallery(records: list[dict], size: int) -> list[str]:
    """A few correct and a few failed examples per category (failures spread over kinds)."""
    lines = ["## Sample gallery", ""]
    for category in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == category and r.get("sample_index", 0) == 0]
        for label, chosen in (("correct", [r for r in rows if r["correct"]][:size]),
                              ("failed", _spread([r for r in rows if not r["correct"]], size))):
            lines += [f"### {category}: {label} ({len(chosen)} shown)", ""]
            for row in chosen:
                lines += _gallery_entry(row)
    return lines


def render_markdown(document: dict, plots: dict[str, Path], gallery_size: int = 3) -> str:
    """The report's Markdown from a results document (as :func:`write_report` builds it)."""
    after, before = document["metrics"]["after"], document["metrics"]["before"]
    data = document["data"]
    lines = [f"# {document['title']}", ""]
    lines += _table(["what", "identity"], [
        ["model", json.dumps(document["model"]) if isinstance(document["model"], dict) else document["model"]],
        ["adapter", json.dumps(document["adapter"]) if isinstance(document["adapter"], dict) else document["adapter"]],
        ["test data", data.get("path", "—")], ["data sha256", f"`{data.get('sha256', '—')}`"],
        ["records", data["n_records"]],
    ])
    lines += ["## Accuracy", ""]
    keys = [*after["categories"], "overall"]
    lines += _table(["category", *_columns(before)], _compare(before, after, keys))
    stages = document["metrics"].get("stages") or {}
    if "upstream alone" in stages:
        lines += ["## Stages", "", "The upstream alone, then the adapter after each phase, on the same items.", ""]
        lines += _table(["category", *stages], [[key] + [_acc(s.get(key)) for s in stages.values()] for key in keys])
    lines += _breakdowns(after, before)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path.as_posix()})" for name, path in plots.items()] + [""]
    lines += gallery(document["records"], gallery_size)
    return "\n".join(lines).rstrip() + "\n"


# --- plots -----------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step", i) + 1, row[key]) for i, row in enumerate(history)  # steps from 1, as printed
              if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(history: list[dict], path: Path) -> Path | None:
    """Reward per step (mean, per category; ±std shaded on short runs) and, when logged, held-out
    accuracy (overall and per category) and per symbol, each in its own panel; integer steps."""
    keys = {k for row in history for k in row}
    reward_keys = sorted(k for k in keys if k.startswith("reward/") and k not in ("reward/std", "reward/format_ok")
                         and not k.startswith("reward/symbol/"))
    eval_keys = sorted(k for k in keys if k.startswith("eval/") and not k.startswith("eval/symbol/"))
    symbol_keys = sorted(k for k in keys if k.startswith("eval/symbol/"))
    if not reward_keys and not eval_keys:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [keys for keys in (reward_keys, eval_keys, symbol_keys) if keys]  # a few series each
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False, sharex=True)
    for ax, keys in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = _series(history, key)
            width = 2 if key == "reward/mean" else 1.2
            if len(steps) <= SMOOTH_ABOVE:
                ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=width,
                        label=key)
                continue
            # long runs: the raw curve faintly, a trailing moving average on top
            line, = ax.plot(steps, values, linewidth=0.6, alpha=0.3)
            window = max(5, len(values) // 50)
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                      for i in range(len(values))]
            ax.plot(steps, smooth, color=line.get_color(), linewidth=width, label=f"{key} (mean of {window})")
        if keys is reward_keys and "reward/std" in {k for row in history for k in row}:
            steps, mean = _series(history, "reward/mean")
            _, std = _series(history, "reward/std")
            if len(std) == len(mean) <= SMOOTH_ABOVE:  # a raw band would hide a long run's curves
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.15, label="reward/mean ± std")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("reward" if keys is reward_keys else
                      "held-out accuracy" if keys is eval_keys else "held-out, per symbol")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Training curves")
    return _save(fig, plt, path)


def _bars(title: str, labels: list[str], series: dict[str, list[dict | None]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 3.8))
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(labels))]
        heights = [100 * v["accuracy"] if v else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, [f"{v['correct']}/{v['total']}" if v else "—" for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_category_accuracy(stages: dict[str, dict], path: Path) -> Path:
    """Accuracy per category and overall, one bar per stage (``{name: summary}``, in order)."""
    last = list(stages.values())[-1]
    keys = [*last["categories"], "overall"]
    return _bars("Accuracy per category", keys, {name: [s.get(k) for k in keys] for name, s in stages.items()}, path)


def plot_symbol_accuracy(stages: dict[str, dict], path: Path) -> Path | None:
    """Accuracy over the items containing each symbol, one bar per stage."""
    symbols = list(stages.values())[-1].get("by_symbol")
    if not symbols:
        return None
    keys = list(symbols)
    labels = [f"{s} ({v['op']})" if v["alphabet"] == "custom" else s for s, v in symbols.items()]
    series = {name: [(s.get("by_symbol") or {}).get(k) for k in keys] for name, s in stages.items()}
    return _bars("Accuracy per symbol (items containing it)", labels, series, path)


def stage_summaries(run: Path, after_rows: list[EvalRow]) -> dict[str, dict]:
    """The bars of a training run's report, in order: the upstream alone (its answers on the
    final evaluation's items), after the warm-start (when there was one), after training."""
    upstream = [dataclasses.replace(r, correct=r.api_correct, decision=None, error=None) for r in after_rows]
    stages = {"upstream alone": summarize(upstream)}
    if (run / "eval_after_sft.jsonl").exists():
        stages["after warm-start"] = summarize([EvalRow.from_dict(r) for r in _read_jsonl(run / "eval_after_sft.jsonl")])
    stages["after training"] = summarize(after_rows)
    return stages


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- a training run's folder -----------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report_from_run(run: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """The report of a ``scripts/train.py`` run folder (written to ``RUN/report`` by default)."""
    run = Path(run)
    after_path = run / "eval_after.jsonl"
    if not after_path.exists():
        raise FileNotFoundError(f"{after_path} not found: the run has no final evaluation")
    rows = [EvalRow.from_dict(r) for r in _read_jsonl(after_path)]
    results: dict[str, Any] = {"title": f"Evaluation of {run.name}", "after": summarize(rows),
                               "stages": stage_summaries(run, rows)}
    if (run / "eval_before.jsonl").exists():
        results["before"] = summarize([EvalRow.from_dict(r) for r in _read_jsonl(run / "eval_before.jsonl")])
    if (run / "config.yaml").exists():
        import yaml

        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        results["config"] = config
        results["model"] = (config.get("model") or {}).get("name_or_path")
        test = (config.get("data") or {}).get("test_path") or run / "data" / "test.jsonl"
        if Path(test).exists():
            results["test_path"] = str(test)
    checkpoints = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
    versions = {r.policy_version for r in rows}
    results["adapter"] = {"checkpoint": str(checkpoints[-1]) if checkpoints else None,
                          "policy_version": versions.pop() if len(versions) == 1 else sorted(versions, key=str)}
    history = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else None
    return write_report(out_dir or run / "report", results, rows, history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training run folder")
    parser.add_argument("--out", type=Path, help="where to write (default RUN/report)")
    args = parser.parse_args(argv)
    try:
        paths = report_from_run(args.run, args.out)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
