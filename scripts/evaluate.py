r"""Evaluate the chain on a test file for several subjects side by side.

    api-adapter evaluate --data data/symbols/test.jsonl --upstream-only --base \
        --adapter runs/x/checkpoints/step_000030 --out runs/eval_x
    api-adapter evaluate --data test.jsonl --adapter A --adapter B --temperature 1 --samples 8

Subjects, any mix of:

- ``upstream``: the upstream alone; a row is correct when the upstream's parsed answer equals
  the truth (no adapter, so ``decision`` is None and only the accuracy tables apply);
- ``base``: the chain with the base model as the adapter (LoRA layers disabled);
- one subject per ``--adapter`` folder (a PEFT folder or a training checkpoint
  ``RUN/checkpoints/step_X``), named after the folder.

Every task's upstream answer is fetched once (through the on-disk answer cache) and shared by
all subjects; each model subject then renders the adapter prompts with those answers
(``scripts.train._items``) and generates the whole test set in one batch through the same
rollout engine as training (:func:`rl.evaluation.evaluate_items`). Greedy by default;
``--temperature T --samples k`` samples k completions per item and adds pass@k. The prompt
condition, response prefix, stop strings and cap come from the flags, else from the adapter's
training run (``RUN/config.yaml``), else the defaults (:func:`actors.chain.adapter_settings`).

GSM8K (``--task gsm8k``, rows ``{"question", "answer"}``): every subject answers the question
itself, the models with the strict final-line prompt (``rl.prompts.GSM8K_STRICT``, raw text) and
the upstream with its GSM8K request; a row is correct when the completion is exact (the last
``####`` line's number is the truth), and the report adds the answer-boundary counts (strict
final line, trailing text, missing; raw and stop-aware) and the failure taxonomy.

Output: each subject's summary table on stdout, then a side-by-side table (custom / standard /
overall accuracy). With ``--out DIR``: ``DIR/<subject>/`` holds the report of
:func:`rl.report.write_report` (``results.json`` with every per-example record, ``report.md``,
plots), ``DIR/summary.json`` every subject's summary and ``DIR/summary.md`` the side-by-side
table. Exit status: 0; 2 for bad flags, data or a missing adapter folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))

PROVIDER_CHOICES = ("local", "anthropic", "vertex", "openai")  # = actors.upstream.PROVIDERS
DEFAULT_CACHE = Path("runs/evaluate/upstream_cache.sqlite")
SCOPES = ("custom", "standard", "overall")


class UsageError(ValueError):
    """Bad flags or inputs: exit status 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api-adapter evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="test rows (JSONL of the task)")
    p.add_argument("--task", choices=("symbols", "gsm8k"), default="symbols",
                   help="symbols: the adapter chain on symbol items (default); gsm8k: word problems, "
                        "each subject answering with the strict final-line prompt")
    p.add_argument("--limit", type=int, help="evaluate the first N valid rows")
    p.add_argument("--out", type=Path, help="write reports, summary.json and summary.md here")
    s = p.add_argument_group("subjects")
    s.add_argument("--upstream-only", action="store_true", help="the upstream alone")
    s.add_argument("--base", action="store_true", help="the chain with the base model (no adapter)")
    s.add_argument("--adapter", action="append", default=[], type=Path, metavar="PATH",
                   help="a PEFT folder or training checkpoint (repeatable)")
    g = p.add_argument_group("adapter prompt and generation")
    g.add_argument("--base-model", help="the base model (default: the adapter run's, else embedded)")
    g.add_argument("--condition", choices=("A", "B", "C", "D"), help="prompt condition (default: the run's, else D)")
    g.add_argument("--response-prefix", help="e.g. '\\boxed{' (default: the run's, else none)")
    g.add_argument("--stop", action="append", help="a stop string (repeatable; default: the run's)")
    g.add_argument("--max-new-tokens", type=int, help="completion cap (default: the run's eval cap, else 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--samples", type=int, default=1, help="completions per item (k of pass@k; needs temperature > 0)")
    g.add_argument("--device", default="cpu", help="torch device of the adapter engines")
    u = p.add_argument_group("upstream (as upstream.* in the training config)")
    u.add_argument("--provider", choices=PROVIDER_CHOICES, default="local")
    u.add_argument("--model", help="upstream model (default: claude-haiku-4-5, or embedded for local)")
    u.add_argument("--base-url", help="the API's base URL (anthropic, vertex, openai)")
    u.add_argument("--vertex-project")
    u.add_argument("--vertex-region")
    u.add_argument("--max-tokens", type=int, help="upstream reply cap (default: the seed's 64 for symbols, "
                                                   "512 for gsm8k)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds per upstream attempt")
    u.add_argument("--max-retries", type=int, default=5, help="retries of a failed upstream call")
    u.add_argument("--concurrency", type=int, default=30, help="upstream requests in flight")
    u.add_argument("--cache", type=Path, help=f"answer cache (default: DIR/upstream_cache.sqlite, else {DEFAULT_CACHE})")
    return p


# ------------------------------------------------------------------------------- settings


def _config_overrides(args) -> list[str]:
    """``a.b=value`` overrides for rl.config.load_config; values as JSON (valid YAML) so a
    prefix like ``\\boxed{`` stays a string."""
    cache = args.cache or (args.out / "upstream_cache.sqlite" if args.out else DEFAULT_CACHE)
    values = {"upstream.provider": args.provider, "upstream.model": args.model or "embedded",
              "upstream.base_url": args.base_url, "upstream.project": args.vertex_project,
              "upstream.region": args.vertex_region, "upstream.max_tokens": _upstream_max_tokens(args),
              "data.task": args.task, "data.train_path": str(args.data), "data.test_path": str(args.data),
              "upstream.timeout_s": args.timeout, "upstream.max_retries": args.max_retries,
              "upstream.max_concurrency": args.concurrency, "upstream.cache_path": str(cache),
              "eval.temperature": args.temperature}
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _upstream_max_tokens(args) -> int:
    from actors.upstream.base import GSM8K_MAX_TOKENS, SYMBOL_MAX_TOKENS

    if args.max_tokens is not None:
        return args.max_tokens
    return GSM8K_MAX_TOKENS if args.task == "gsm8k" else SYMBOL_MAX_TOKENS


def _subject_overrides(settings) -> list[str]:
    values = {"model.name_or_path": settings.base_model, "data.condition": settings.condition,
              "data.answer_format": settings.answer_format,
              "rollout.response_prefix": settings.response_prefix or None,  # "" means none: null
              "rollout.stop": list(settings.stop),
              "eval.max_new_tokens": settings.max_new_tokens}
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def subject_name(adapter: Path, taken: set[str]) -> str:
    """A folder name for the adapter's reports, unique among ``taken``.

    >>> subject_name(Path("runs/x/checkpoints/step_000030/adapter"), {"step_000030"})
    'step_000030-2'
    """
    parts = [p for p in adapter.parts if p not in ("adapter", ".", "..", "/")]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1] if parts else "adapter")
    name, n = base, 1
    while name in taken or name in ("upstream", "base"):
        n += 1
        name = f"{base}-{n}"
    return name


def _check(args) -> None:
    if not (args.upstream_only or args.base or args.adapter):
        raise UsageError("nothing to evaluate: give --upstream-only, --base and/or --adapter PATH")
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and args.temperature == 0:
        raise UsageError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def plan_subjects(args) -> list[tuple[str, object]]:
    """``[(name, AdapterSettings | None)]``: None is the upstream alone. Every adapter folder is
    checked here, before anything loads."""
    from actors.chain import adapter_settings

    overrides = dict(base_model=args.base_model, condition=args.condition, response_prefix=args.response_prefix,
                     stop=args.stop, max_new_tokens=args.max_new_tokens)
    subjects: list[tuple[str, object]] = [("upstream", None)] if args.upstream_only else []
    if args.base:
        subjects.append(("base", adapter_settings(None, **overrides)))
    taken: set[str] = set()
    for path in args.adapter:
        try:
            settings = adapter_settings(path, **overrides)
        except FileNotFoundError as error:
            raise UsageError(f"--adapter {error}") from None
        name = subject_name(path, taken)
        taken.add(name)
        subjects.append((name, settings))
    return subjects


# ------------------------------------------------------------------------------- evaluation


def upstream_rows(tasks, answers) -> list:
    """The upstream alone as :class:`~rl.evaluation.EvalRow`: correct when its parsed answer
    is the truth; ``decision`` None (no adapter), the completion is the upstream's reply. GSM8K
    replies are scored like any GSM8K completion (exact on the last ``####`` line, boundary
    metrics)."""
    from rl.evaluation import EvalRow, build_row
    from verifiers.rewards import Example

    if tasks and tasks[0].category == "gsm8k":
        return [build_row(t.uid, "gsm8k", reply.text or "", Example(truth=t.truth, question=t.prompt), "gsm8k_exact")
                for t, reply in zip(tasks, answers)]
    rows = []
    for task, reply in zip(tasks, answers):
        api = reply.answer
        right = api is not None and api == task.truth
        rows.append(EvalRow(uid=task.uid, category=task.category, expression=task.prompt, truth=str(task.truth),
                            api_answer=None if api is None else str(api), api_correct=right,
                            completion=reply.text or "", answer=None if api is None else str(api),
                            decision=None, correct=right, reward=float(right)))
    return rows


def evaluate_subject(config, settings, tasks, api_answers, samples: int, device: str) -> tuple[dict, list]:
    """One model subject: build its engine, render the prompts, generate in one batch."""
    import gc

    from actors.chain import build_engine
    from rl.evaluation import evaluate_items
    from scripts.train import _items, _sampling

    engine = build_engine(settings, device=device)
    try:
        if config.data.task == "gsm8k":
            items, reward = gsm8k_items(engine.tokenizer, tasks), "gsm8k_exact"
        else:
            items, reward = _items(config, engine.tokenizer, tasks, api_answers), "binary"
        return evaluate_items(engine, items, _sampling(config, evaluation=True), reward, n_samples=samples,
                              progress=f"evaluating {settings.path or 'the base model'}")
    finally:
        del engine
        gc.collect()


def gsm8k_items(tokenizer, tasks) -> list:
    """GSM8K tasks as items the engine answers: the strict final-line prompt, raw text."""
    from rl.loop import TrainItem
    from rl.prompts import gsm8k_prompt, render_text
    from verifiers.rewards import Example

    return [TrainItem(t.uid, render_text(tokenizer, gsm8k_prompt(t.prompt)),
                      Example(truth=t.truth, question=t.prompt), "gsm8k") for t in tasks]


def side_by_side(summaries: dict[str, dict]) -> str:
    """A Markdown table per subject: custom / standard / overall accuracy (with counts) for
    symbols; for GSM8K exact accuracy and the answer-boundary counts (raw completions)."""
    def cell(value: dict | None) -> str:
        return "-" if value is None else f"{100 * value['accuracy']:.1f}% ({value['correct']}/{value['total']})"

    if any("boundary" in s for s in summaries.values()):
        keys = ("strict_final_line", "trailing_text", "missing")
        lines = ["| subject | exact | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                 "|---|" + "---:|" * (1 + len(keys))]
        for name, s in summaries.items():
            raw = s.get("boundary", {}).get("raw", {})
            lines.append(f"| {name} | {cell(s.get('overall'))} | " + " | ".join(str(raw.get(k, "-")) for k in keys) + " |")
        return "\n".join(lines)
    lines = ["| subject | " + " | ".join(SCOPES) + " |", "|---|" + "---:|" * len(SCOPES)]
    lines += [f"| {name} | " + " | ".join(cell(s.get(scope)) for scope in SCOPES) + " |" for name, s in summaries.items()]
    return "\n".join(lines)


def _describe(settings) -> dict:
    return {"adapter": None if settings.path is None else str(settings.path), "base_model": settings.base_model,
            "condition": settings.condition, "answer_format": settings.answer_format,
            "response_prefix": settings.response_prefix,
            "stop": list(settings.stop), "max_new_tokens": settings.max_new_tokens,
            "run_config": None if settings.run_config is None else str(settings.run_config)}


def run(args) -> dict[str, dict]:
    from rl.config import load_config
    from rl.datasets import read_tasks
    from rl.evaluation import format_table, summarize
    from scripts.train import _answer_in_process, _requests

    subjects = plan_subjects(args)
    config = load_config(None, _config_overrides(args))
    tasks, _ = read_tasks(args.data, args.task, limit=args.limit)
    if not tasks:
        raise UsageError(f"--data {args.data}: no rows")
    answers = _answer_in_process(config, args.out or DEFAULT_CACHE.parent, _requests(config, tasks), [0])
    print(f"upstream: {len(answers)} answers ({sum(a.cached for a in answers)} from the cache), "
          f"{sum(a.answer is None for a in answers)} without a number")
    api_answers = [a.answer for a in answers]
    upstream = {"provider": args.provider, "model": config.upstream.model, "max_tokens": config.upstream.max_tokens}
    summaries: dict[str, dict] = {}
    for name, settings in subjects:
        if settings is None:
            rows = upstream_rows(tasks, answers)
            summary, described = summarize(rows), {"upstream": upstream}
        else:
            subject_config = load_config(None, _config_overrides(args) + _subject_overrides(settings))
            summary, rows = evaluate_subject(subject_config, settings, tasks, api_answers, args.samples, args.device)
            described = {**_describe(settings), "upstream": upstream, "temperature": args.temperature,
                         "samples": args.samples}
        summaries[name] = summary
        print(format_table(summary, f"{name}: {len(tasks)} items from {args.data}"))
        if args.out:
            paths = _write_report(args, name, settings, summary, rows, described)
            print(f"  report: {paths['report']}")
    table = side_by_side(summaries)
    print(table)
    if args.out:
        document = {"data": str(args.data), "n_items": len(tasks), "subjects": summaries}
        (args.out / "summary.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        (args.out / "summary.md").write_text(f"# Evaluation on {args.data}\n\n{table}\n", encoding="utf-8")
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'summary.md'}")
    return summaries


def _write_report(args, name: str, settings, summary: dict, rows, described: dict) -> dict:
    from rl.report import write_report

    results = {"title": f"Evaluation: {name}", "subject": name, "test_path": str(args.data),
               "model": "upstream" if settings is None else settings.base_model,
               "adapter": None if settings is None else described["adapter"], "config": described,
               "after": summary}
    return write_report(args.out / name, results, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rl.config import ConfigError
    from rl.datasets import DatasetError

    try:
        _check(args)
        run(args)
    except (UsageError, ConfigError, DatasetError) as error:
        print(f"api-adapter evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
