"""The chain for users: expressions -> upstream (cached) -> adapter -> final answer.

    api-adapter chain "3 θ 4" "10 α 3"                             # base model, local upstream
    api-adapter chain --file items.jsonl --out answers.jsonl --adapter runs/x/checkpoints/step_000030
    api-adapter chain --provider anthropic "12 θ 7 γ 3"            # Claude Haiku 4.5 ($ANTHROPIC_API_KEY)
    api-adapter chain --serve --port 8080 --adapter runs/x/checkpoints/step_000030

Each expression goes to the upstream with the seed's calculator request (answers cached in
``--cache``, so nothing is paid for twice), then to the adapter with the upstream's answer in
the prompt, decoded greedily. The table shows the upstream's answer, the adapter's decision
(CORRECT / override / none) and the final answer; ``--out`` writes one JSON line per item.
With no adapter's answer readable, the final answer is the upstream's (``fallback``; see
actors/chain.py). An adapter folder from a training run brings its prompt condition, response
prefix, stop strings and base model from ``RUN/config.yaml``; flags override them.

``--file``: ``.jsonl`` rows with an ``expression`` field (other fields are kept; a row with
``answer`` also gets ``correct``) or a text file with one expression per line (blank lines
and ``#`` comments skipped).

HTTP service (``--serve``): ``GET /health``, ``POST /v1/chain`` with ``{"expression": ...}``
or ``{"expressions": [...]}``, JSON errors naming the problem, 503 with ``Retry-After`` when
``--queue-size`` requests are admitted; bound to 127.0.0.1 unless ``--host`` says otherwise,
and with ``$API_ADAPTER_CHAIN_TOKEN`` set every request needs ``Authorization: Bearer <token>``
(actors/chain_service.py has the whole contract).

Exit status: 0; 2 for bad input or settings; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))

PROVIDER_CHOICES = ("local", "anthropic", "vertex", "openai")  # = actors.upstream.PROVIDERS
DEFAULT_CACHE = Path("runs/chain/upstream_cache.sqlite")
TOKEN_ENV = "API_ADAPTER_CHAIN_TOKEN"  # an environment variable, not a flag: flags show in `ps`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api-adapter chain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expressions", nargs="*", help="expressions, e.g. '3 θ 4'")
    p.add_argument("--file", type=Path, help="more expressions: .jsonl rows or one per line")
    p.add_argument("--out", type=Path, help="write the answers as JSON lines")
    a = p.add_argument_group("adapter")
    a.add_argument("--adapter", default="none", help="a PEFT checkpoint folder, or none (the base model)")
    a.add_argument("--base-model", help="the adapter's base (default: the run's, else embedded)")
    a.add_argument("--condition", choices=("A", "B", "C", "D"), help="prompt condition (default: the run's, else D)")
    a.add_argument("--response-prefix", help="e.g. '\\boxed{' (default: the run's, else none)")
    a.add_argument("--stop", action="append", help="a stop string (repeatable; default: the run's)")
    a.add_argument("--max-new-tokens", type=int, help="adapter cap (default: the run's eval cap, else 256)")
    a.add_argument("--device", default="cpu", help="torch device of the adapter (and a local upstream)")
    u = p.add_argument_group("upstream")
    u.add_argument("--provider", choices=PROVIDER_CHOICES, default="local")
    u.add_argument("--model", help="upstream model (default: claude-haiku-4-5, or embedded for local)")
    u.add_argument("--base-url", help="the API's base URL (anthropic, vertex, openai)")
    u.add_argument("--vertex-project")
    u.add_argument("--vertex-region")
    u.add_argument("--max-tokens", type=int, help="upstream reply cap (default: the run's, else the seed's 64)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds per upstream attempt")
    u.add_argument("--max-attempts", type=int, default=5, help="upstream calls per item, retries included")
    u.add_argument("--concurrency", type=int, default=30, help="upstream requests in flight")
    u.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"answer cache (default {DEFAULT_CACHE})")
    s = p.add_argument_group("service")
    s.add_argument("--serve", action="store_true", help="run the HTTP service instead")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--queue-size", type=int, default=8, help="requests admitted at once (running + waiting)")
    s.add_argument("--max-items", type=int, default=64, help="expressions per request")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    return p


# ------------------------------------------------------------------------------- inputs


def read_items(path: Path) -> list[dict]:
    """Rows ``{"expression": ..., ...}`` from a ``.jsonl`` file or a text file (module docstring);
    ValueError naming ``file:line`` for a malformed row."""
    items: list[dict] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix != ".jsonl":
            items.append({"expression": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        row = {"expression": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or "expression" not in row:
            raise ValueError(f"{path}:{number}: expected an object with an 'expression' field")
        items.append(row)
    return items


# ------------------------------------------------------------------------------- the table


def _cell(value, width: int) -> str:
    text = "-" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict]) -> str:
    """One line per answer: expression, upstream answer, decision, final answer (and truth)."""
    truth = any("answer" in r for r in rows)
    width = max([10, *(len(r["expression"]) for r in rows)])
    head = f"{'expression':<{width}}  {'upstream':>10}  {'decision':<8}  {'final':>10}"
    lines = [head + ("  truth      ok" if truth else "")]
    for r in rows:
        line = (f"{_cell(r['expression'], 60):<{width}}  {_cell(r['upstream_answer'], 10):>10}  "
                f"{r['decision']:<8}  {_cell(r['final_answer'], 10):>10}")
        if r.get("fallback"):
            line += " (upstream's)"
        if truth and "answer" in r:
            line += f"  {_cell(r['answer'], 9):<9}  {'yes' if r['correct'] else 'no'}"
        lines.append(line)
    scored = [r for r in rows if "correct" in r]
    if scored:
        up = sum(r["upstream_answer"] == str(r["answer"]) for r in scored)
        lines.append(f"final answer right {sum(r['correct'] for r in scored)}/{len(scored)}; "
                     f"upstream alone {up}/{len(scored)}")
    return "\n".join(lines)


def _with_truth(item: dict, answer: dict) -> dict:
    row = {**item, **answer}
    if "answer" in item:
        from verifiers.answers import parse_number

        truth = parse_number(str(item["answer"]))
        row["correct"] = truth is not None and answer["final_answer"] == str(truth)
    return row


# ------------------------------------------------------------------------------- main


def _client(args):
    from actors.upstream import AnswerCache, RetryPolicy, UpstreamClient, build_provider

    retry = RetryPolicy(max_attempts=args.max_attempts)
    local = {"device": args.device} if args.provider == "local" else {}
    provider = build_provider(args.provider, args.model, base_url=args.base_url, project=args.vertex_project,
                              region=args.vertex_region, timeout=args.timeout, retry=retry, **local)
    cache = AnswerCache(args.cache)
    return UpstreamClient(provider, cache, concurrency=args.concurrency), cache


def _build_chain(args):
    from actors.chain import chain_from_adapter

    client, cache = _client(args)
    adapter = None if args.adapter.lower() == "none" else args.adapter
    try:
        chain = chain_from_adapter(client, adapter, device=args.device, upstream_max_tokens=args.max_tokens,
                                   base_model=args.base_model, condition=args.condition,
                                   response_prefix=args.response_prefix, stop=args.stop,
                                   max_new_tokens=args.max_new_tokens)
    except BaseException:
        cache.close()
        raise
    return chain, cache


def _inputs(args) -> list[dict]:
    from actors.chain import check_expression

    items = [{"expression": e} for e in args.expressions]
    if args.file is not None:
        items += read_items(args.file)
    if not items:
        raise ValueError("no expressions: give some on the command line or with --file")
    for i, item in enumerate(items):
        item["expression"] = check_expression(item["expression"], f"item {i + 1} ({item['expression']!r})")
    return items


def _answer(args, chain, items: list[dict]) -> int:
    start = time.perf_counter()
    answers = chain.answer_batch([item["expression"] for item in items])
    rows = [_with_truth(item, answer.to_json()) for item, answer in zip(items, answers)]
    print(format_table(rows))
    info = chain.describe()
    print(f"{len(rows)} items in {time.perf_counter() - start:.2f}s; adapter {info['adapter'] or 'none (base model)'} "
          f"on {info['model']}, condition {info['condition']}; upstream {info['upstream']['provider']} "
          f"{info['upstream']['model']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def _stop(signum, frame) -> None:
    raise SystemExit(0)  # unwinds through serve_forever and main's finally (chain and cache closed)


def _serve(args, chain) -> int:
    import os

    from actors.chain_service import make_server

    token = os.environ.get(TOKEN_ENV) or None
    server = make_server(chain, args.host, args.port, queue_size=args.queue_size, max_items=args.max_items,
                         max_body_bytes=args.max_body_bytes, auth_token=token)
    host, port = server.server_address[:2]
    auth = f"bearer token from ${TOKEN_ENV}" if token else "no auth"
    print(f"serving on http://{host}:{port}  (GET /health, POST /v1/chain; {auth}); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _stop)  # a service manager's stop: shut down cleanly, exit 0
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.serve else logging.WARNING, format="%(message)s")
    try:
        if args.serve and (args.expressions or args.file):
            raise ValueError("--serve takes its expressions over HTTP, not on the command line")
        items = None if args.serve else _inputs(args)  # bad input is refused before any model loads
        chain, cache = _build_chain(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _serve(args, chain) if args.serve else _answer(args, chain, items)
    except KeyboardInterrupt:
        return 130
    finally:
        chain.close()
        cache.close()


if __name__ == "__main__":
    sys.exit(main())
