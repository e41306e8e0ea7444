"""The chain service under load: many clients, an upstream that fails and stalls, nothing lost.

    python scripts/bench_chain_load.py          # 50 clients for 60 s -> results/bench_chain_load.json
    python scripts/bench_chain_load.py --clients 8 --seconds 8 --out /tmp/load.json

``api-adapter chain --serve``'s server (actors/chain_service.py) on loopback, over the embedded
model as the adapter's base, with the real ``anthropic`` SDK as the upstream pointed at the local
Messages-API server the tests use (tests/actors/messages_server.py). That server is scripted
per expression (seeded): ``--p-429`` of them answer 429 with ``retry-after: 0`` first, ``--p-529``
529 (overloaded) first, ``--p-500`` 500 first, ``--p-slow`` answer after ``--slow-s``; the rest at
once. The client's retry policy (4 attempts, 50 ms base) takes the failures.

``--clients`` threads send ``POST /v1/chain`` with one expression each, drawn from a pool of
``--expressions``, for ``--seconds``; a 503 is retried after its ``Retry-After`` (a 503 without
one is counted), any other status is an error. Each logical request must end in exactly one 200
whose answer is for the expression sent: ``lost`` (never answered by the end of the drain),
``mismatched`` and ``errors`` must be 0; ``upstream_paid_twice`` counts expressions the upstream
answered with 200 more than once (the answer cache and in-flight sharing should make it 0).
Latency is from a request's first attempt to its 200 (retries after 503 included); memory is this
process's RSS (server, chain, model and clients), sampled every second: ``growth_mib`` is the
median of the last third minus that of the middle third (the first holds the warm-up: the
clients' threads and the model's first batches). Numbers are written, never asserted
here (tests/scripts/test_bench_chain_load.py asserts the invariants on a short run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "results" / "bench_chain_load.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/bench_chain_load.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0, help="how long clients start new requests")
    p.add_argument("--drain-s", type=float, default=120.0, help="then how long requests under way may take")
    p.add_argument("--expressions", type=int, default=300, help="pool of distinct expressions")
    p.add_argument("--queue-size", type=int, default=8, help="the service's admitted requests")
    p.add_argument("--max-new-tokens", type=int, default=8, help="the adapter's cap")
    p.add_argument("--p-429", type=float, default=0.10)
    p.add_argument("--p-529", type=float, default=0.05)
    p.add_argument("--p-500", type=float, default=0.05)
    p.add_argument("--p-slow", type=float, default=0.20)
    p.add_argument("--slow-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def expressions(count: int, seed: int) -> list[str]:
    rng, out = random.Random(seed), set()
    while len(out) < count:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.add(f"{a} {rng.choice('θαγ')} {b}")
    return sorted(out)


def script_upstream(server, pool: list[str], args) -> Counter:
    """Each expression's scripted behaviour on the Messages-API server; the counts by kind."""
    from actors.upstream import UpstreamRequest
    from tests.actors.messages_server import error, ok

    rng, kinds = random.Random(args.seed + 1), Counter()
    for expression in pool:
        draw, prompt = rng.random(), UpstreamRequest.symbol(expression).prompt
        for kind, p, first in (("429", args.p_429, error(429, retry_after="0")), ("529", args.p_529, error(529)),
                               ("500", args.p_500, error(500)), ("slow", args.p_slow, ok(delay=args.slow_s))):
            if draw < p:
                server.script[prompt] = [first, ok()]
                kinds[kind] += 1
                break
            draw -= p
        else:
            kinds["ok"] += 1
    return kinds


class Clients:
    """``count`` threads of logical requests (a 503 is retried after its ``Retry-After``)."""

    def __init__(self, address: tuple[str, int], pool: list[str], count: int, seed: int):
        self.address, self.pool, self.count, self.seed = address, pool, count, seed
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.sent = 0
        self.answers: Counter = Counter()  # logical request id -> 200 answers
        self.latencies: list[float] = []
        self.mismatched = self.no_retry_after = self.errors = 0
        self.error_kinds: Counter = Counter()  # status, or the connection error's type

    def run(self, until: float, drain_until: float) -> None:
        threads = [threading.Thread(target=self._client, args=(i, until, drain_until), daemon=True)
                   for i in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, drain_until - time.monotonic()) + 5)

    def _client(self, index: int, until: float, drain_until: float) -> None:
        rng, k = random.Random(self.seed * 1000 + index), 0
        while time.monotonic() < until:
            request_id, expression = f"{index}-{k}", rng.choice(self.pool)
            k += 1
            with self.lock:
                self.sent += 1
            self._one(request_id, expression, drain_until)

    def _one(self, request_id: str, expression: str, drain_until: float) -> None:
        start = time.monotonic()
        while time.monotonic() < drain_until:
            status, headers, body = self._post(expression)
            with self.lock:
                self.statuses[status] += 1
            if status == 503:
                retry_after = headers.get("retry-after")
                if retry_after is None:
                    with self.lock:
                        self.no_retry_after += 1
                time.sleep(float(retry_after or 1))
                continue
            with self.lock:
                if status != 200:
                    self.errors += 1
                    self.error_kinds[headers.get("error", str(status))] += 1
                    return
                self.answers[request_id] += 1
                self.latencies.append(time.monotonic() - start)
                self.mismatched += body["answer"]["expression"] != expression
            return

    def _post(self, expression: str) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection(*self.address, timeout=300)
        try:
            conn.request("POST", "/v1/chain", body=json.dumps({"expression": expression}).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, json.loads(response.read() or b"null")
        except OSError as error:  # the connection itself failed: counted by kind
            return -1, {"error": type(error).__name__}, {}
        finally:
            conn.close()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from actors.chain import chain_from_adapter
    from actors.chain_service import make_server
    from actors.upstream import AnswerCache, RetryPolicy, UpstreamClient, make_provider
    from tests.actors.messages_server import MessagesServer

    pool = expressions(args.expressions, args.seed)
    load_start = os.getloadavg()
    with MessagesServer() as upstream_server, tempfile.TemporaryDirectory() as scratch, \
            AnswerCache(Path(scratch) / "cache.sqlite") as cache:
        kinds = script_upstream(upstream_server, pool, args)
        provider = make_provider("anthropic", api_key=upstream_server.api_key, base_url=upstream_server.url,
                                 retry=RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.5))
        chain = chain_from_adapter(UpstreamClient(provider, cache, concurrency=16), None, response_prefix="\\boxed{",
                                   stop=["}"], max_new_tokens=args.max_new_tokens)
        server = make_server(chain, "127.0.0.1", 0, queue_size=args.queue_size)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        memory, stop = [], threading.Event()

        def sample_memory():
            while not stop.wait(1.0):
                memory.append(round(rss_mib(), 1))

        threading.Thread(target=sample_memory, daemon=True).start()
        clients = Clients(server.server_address[:2], pool, args.clients, args.seed)
        start = time.monotonic()
        clients.run(start + args.seconds, start + args.seconds + args.drain_s)
        wall = time.monotonic() - start
        stop.set()
        health = server.health()["queue"]
        server.shutdown()
        server.server_close()
        chain.close()
        paid_twice = sum(1 for n in upstream_server.responses.values() if n > 1)
        upstream_requests = sum(upstream_server.requests.values())
    third = max(1, len(memory) // 3)
    answered = sum(clients.answers.values())
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "load_start": [round(x, 2) for x in load_start],
                    "load_end": [round(x, 2) for x in os.getloadavg()]},
        "upstream_script": dict(kinds),
        "wall_s": round(wall, 1),
        "requests": {"logical": clients.sent, "answered": answered,
                     "lost": clients.sent - len(clients.answers) - clients.errors,
                     "duplicated": sum(1 for n in clients.answers.values() if n > 1),
                     "mismatched": clients.mismatched, "errors": clients.errors,
                     "error_kinds": dict(clients.error_kinds)},
        "statuses": {str(k): v for k, v in sorted(clients.statuses.items())},
        "rejected_503_without_retry_after": clients.no_retry_after,
        "server_counts": health,
        "latency_ms": {"p50": _percentile_ms(clients.latencies, 0.5), "p99": _percentile_ms(clients.latencies, 0.99),
                       "max": _percentile_ms(clients.latencies, 1.0)},
        "throughput_answers_per_s": round(answered / wall, 3) if wall else None,
        "upstream": {"requests": upstream_requests, "expressions_answered": len(upstream_server.responses),
                     "paid_twice": paid_twice},
        "memory_mib": {"samples": memory},
    }
    if len(memory) >= 3:
        middle, last = statistics.median(memory[third:-third]), statistics.median(memory[-third:])
        report["memory_mib"].update(middle_third_median=middle, last_third_median=last,
                                    growth_mib=round(last - middle, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("requests", "statuses", "latency_ms", "throughput_answers_per_s", "upstream")}
    print(json.dumps(summary, indent=1))
    print(f"memory growth {report['memory_mib'].get('growth_mib')} MiB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
