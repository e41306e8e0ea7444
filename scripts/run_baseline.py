"""The baseline: the upstream alone on a task file, every answer cached as it arrives.

    python scripts/run_baseline.py                                  # local embedded model, symbols
    python scripts/run_baseline.py --provider anthropic             # Claude Haiku 4.5 ($ANTHROPIC_API_KEY)
    python scripts/run_baseline.py --provider vertex --vertex-project P --vertex-region us-east5
    python scripts/run_baseline.py --provider openai --base-url http://gpu:8000 --model Qwen/Qwen3-8B
    python scripts/run_baseline.py --task gsm8k --limit 100

Every item is sent to the upstream with the seed's request (symbols: the calculator system
prompt, ``Evaluate: {expression}``, max_tokens 64, 30 requests at a time). Each answer is
committed to the run's SQLite cache the moment it arrives, so a killed run loses nothing:
rerun the same command and only the missing (or failed) items are asked again. At the end
it writes ``answers.jsonl`` (each input row plus ``api_text``, ``api_answer``, ``api_error``,
``stop_reason``, tokens) and ``results.json`` (accuracy per category, tokens, cost), both
atomically, and prints the seed's baseline table. Exit status: 0, or 1 when no item got a
reply, 2 for a bad dataset or configuration, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = {
    "symbols": REPO / "data" / "symbols" / "test.jsonl",
    "gsm8k": REPO / "rl" / "data" / "gsm8k" / "test.jsonl",
}
PROVIDER_CHOICES = ("local", "anthropic", "vertex", "openai")  # = actors.upstream.PROVIDERS
PAID = ("anthropic", "vertex")
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(DEFAULT_DATA), default="symbols")
    p.add_argument("--data", type=Path, help="task JSONL (default: data/symbols/test.jsonl, written "
                   "with the seed's 400-item test set when absent; gsm8k: rl/data/gsm8k/test.jsonl)")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows (listed) instead of refusing")
    p.add_argument("--limit", type=int, help="the first N valid rows only")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="local")
    p.add_argument("--model", help="default: claude-haiku-4-5 (anthropic, vertex), embedded (local); "
                   "required for openai")
    p.add_argument("--base-url", help="the API's base URL (anthropic, vertex, openai)")
    p.add_argument("--vertex-project", help="default: $GOOGLE_CLOUD_PROJECT")
    p.add_argument("--vertex-region", help="default: $GOOGLE_CLOUD_REGION")
    p.add_argument("--access-token-env", metavar="VAR",
                   help="vertex: read an access token from this environment variable instead of ADC")
    p.add_argument("--concurrency", type=int, help="requests in flight (default: 30; local: twice "
                   "--batch-size, so the next batch is queued while one generates)")
    p.add_argument("--batch-size", type=int, default=32, help="local: generation batch size")
    p.add_argument("--device", default="cpu", help="local: torch device")
    p.add_argument("--threads", type=int, help="local: torch CPU threads (default: torch's choice)")
    p.add_argument("--max-tokens", type=int, help="default: 64 (symbols), 512 (gsm8k)")
    p.add_argument("--temperature", type=float, help="default: none sent (the API's default)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt (default 60)")
    p.add_argument("--max-attempts", type=int, default=5, help="calls per item, retries included")
    p.add_argument("--retry-base-delay", type=float, default=0.5, help="first backoff in seconds")
    p.add_argument("--price-in", type=float, help="$ per Mtok in (default: 1.0 for anthropic/vertex, else 0)")
    p.add_argument("--price-out", type=float, help="$ per Mtok out (default: 5.0 for anthropic/vertex, else 0)")
    p.add_argument("--run-dir", type=Path, help="default: runs/baseline/<task>-<provider>-<model>")
    p.add_argument("--cache", type=Path, help="answer cache (default: <run-dir>/cache.sqlite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "model"


def _load_tasks(args) -> list | None:
    from rl.datasets import DatasetError, read_tasks

    path = args.data or DEFAULT_DATA[args.task]
    if args.data is None and args.task == "symbols" and not path.exists():
        from verifiers.symbol_data import build_symbol_dataset, write_jsonl

        count = write_jsonl(build_symbol_dataset()[1], path)
        print(f"wrote the seed's {count}-item symbol test set to {path}")
    args.data = path
    try:
        tasks, problems = read_tasks(path, args.task, "skip" if args.skip_bad_rows else "refuse", args.limit)
    except (DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    return tasks


def _provider(args):
    from actors.upstream import RetryPolicy, build_provider

    token = os.environ.get(args.access_token_env) if args.access_token_env else None
    if args.access_token_env and not token:
        raise ValueError(f"--access-token-env {args.access_token_env}: the variable is empty or unset")
    retry = RetryPolicy(max_attempts=args.max_attempts, base_delay=args.retry_base_delay)
    local = dict(batch_size=args.batch_size, device=args.device, threads=args.threads) if args.provider == "local" else {}
    return build_provider(args.provider, args.model, base_url=args.base_url, project=args.vertex_project,
                          region=args.vertex_region, access_token=token, timeout=args.timeout, retry=retry,
                          **local)


def _request(task, args):
    from actors.upstream import UpstreamRequest

    overrides = {"temperature": args.temperature}
    if args.max_tokens is not None:
        overrides["max_tokens"] = args.max_tokens
    build = UpstreamRequest.symbol if args.task == "symbols" else UpstreamRequest.gsm8k
    return build(task.prompt, **overrides)


async def _answer_all(client, requests: list, show_progress: bool) -> list:
    from tqdm import tqdm

    failed = 0
    with tqdm(total=len(requests), desc=f"upstream {client.name}", unit="item",
              disable=not show_progress, dynamic_ncols=True) as bar:
        def tick(_index: int, answer) -> None:
            nonlocal failed
            failed += answer.failed
            bar.update(1)
            if answer.failed:
                bar.set_postfix(failed=failed)
        try:
            return await client.answer_all(requests, on_answer=tick)
        finally:
            await client.aclose()


def _row(task, answer) -> dict:
    correct = answer.answer is not None and answer.answer == task.truth
    return {
        **task.row, "uid": task.uid, "category": task.category,
        "api_text": answer.text,
        "api_answer": None if answer.answer is None else str(answer.answer),
        "api_correct": correct, "api_error": answer.error, "api_failed": answer.failed,
        "stop_reason": answer.stop_reason,
        "input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens,
        "api_provider": answer.provider, "api_model": answer.model,
    }


def _results(rows: list[dict], client, args, elapsed: float) -> dict:
    from collections import Counter

    categories = sorted({r["category"] for r in rows}, key=lambda c: (c != "custom", c != "standard", c))
    accuracy = {}
    for name in [*categories, "overall"]:
        chosen = [r for r in rows if name == "overall" or r["category"] == name]
        correct = sum(r["api_correct"] for r in chosen)
        accuracy[name] = {"correct": correct, "total": len(chosen),
                          "accuracy": correct / len(chosen) if chosen else 0.0}
    tokens_in, tokens_out = sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows)
    return {
        "task": args.task, "data": str(args.data), "provider": client.name, "model": client.model,
        "endpoint": client.endpoint, "n": len(rows), "accuracy": accuracy,
        "n_failed": sum(r["api_failed"] for r in rows),
        "n_no_answer": sum(r["api_answer"] is None for r in rows),
        "stop_reasons": dict(Counter(r["stop_reason"] or "none" for r in rows)),
        "tokens": {"input": tokens_in, "output": tokens_out},
        "cost_usd": round(client.pricing.cost(tokens_in, tokens_out), 6),
        "pricing_per_mtok": {"input": client.pricing.input_per_mtok, "output": client.pricing.output_per_mtok},
        "this_run": client.tally.to_json(client.pricing),
        "concurrency": args.concurrency, "elapsed_s": round(elapsed, 3), "cache": str(args.cache),
    }


def _table(results: dict) -> str:
    lines = [f"baseline: {results['provider']} {results['model']} on {results['data']} ({results['n']} items)"]
    for name, acc in results["accuracy"].items():
        lines.append(f"{name:<9} {acc['correct']}/{acc['total']} ({100 * acc['accuracy']:.1f}%)")
    run = results["this_run"]
    lines.append(
        f"no answer {results['n_no_answer']} (failed calls {results['n_failed']}); tokens "
        f"{results['tokens']['input']:,} in / {results['tokens']['output']:,} out; cost "
        f"${results['cost_usd']:.4f} (this run ${run['cost_usd']:.4f}: {run['calls']} calls, "
        f"{run['cache_hits']} from cache)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.concurrency is not None and args.concurrency < 1) or (args.limit is not None and args.limit < 1):
        print("error: --concurrency and --limit must be >= 1", file=sys.stderr)
        return 2
    import asyncio

    from actors.upstream import DEFAULT_CONCURRENCY, FREE, AnswerCache, Pricing, UpstreamClient
    from rl.files import write_atomic

    tasks = _load_tasks(args)
    if tasks is None:
        return 2
    try:
        provider = _provider(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    default_price = Pricing() if args.provider in PAID else FREE
    pricing = Pricing(default_price.input_per_mtok if args.price_in is None else args.price_in,
                      default_price.output_per_mtok if args.price_out is None else args.price_out)
    args.run_dir = args.run_dir or REPO / "runs" / "baseline" / _slug(f"{args.task}-{provider.name}-{provider.model}")
    args.cache = args.cache or args.run_dir / "cache.sqlite"
    if args.concurrency is None:
        args.concurrency = 2 * args.batch_size if args.provider == "local" else DEFAULT_CONCURRENCY
    start = time.monotonic()
    with AnswerCache(args.cache) as cache:
        client = UpstreamClient(provider, cache, concurrency=args.concurrency, pricing=pricing)
        requests = [_request(task, args) for task in tasks]
        try:
            answers = asyncio.run(_answer_all(client, requests, not args.no_progress))
        except KeyboardInterrupt:
            print(f"\ninterrupted: {cache.counts()['answered']} answers are in {args.cache}; "
                  "rerun the same command to finish", file=sys.stderr)
            return 130
    rows = [_row(task, answer) for task, answer in zip(tasks, answers)]
    results = _results(rows, client, args, time.monotonic() - start)
    answers_path, results_path = args.run_dir / "answers.jsonl", args.run_dir / "results.json"
    write_atomic(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(results_path, json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"answers: {answers_path}\nresults: {results_path}")
    return 1 if rows and results["n_failed"] == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
