"""The answer cache's overhead per answer: key, write (one committed transaction), read.

    python scripts/bench_cache.py                       # 2000 answers, NORMAL and FULL sync
    python scripts/bench_cache.py --n 500 --out runs/bench/cache.json

For each ``synchronous`` mode it stores ``--n`` answers of the symbol task's shape into a fresh
SQLite file (WAL), one transaction each as the client does, then reads each back (a hit) and
looks up as many absent keys (a miss). It prints microseconds per operation (median, p95,
mean) and writes them as JSON. Compare with an API call's ~0.5-2 s: the cache is noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(REPO))


def _stats(seconds: list[float]) -> dict:
    micro = sorted(s * 1e6 for s in seconds)
    return {
        "median_us": round(statistics.median(micro), 1),
        "p95_us": round(micro[int(0.95 * (len(micro) - 1))], 1),
        "mean_us": round(statistics.fmean(micro), 1),
    }


def _timed(fn, items) -> list[float]:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return times


def bench(n: int, synchronous: str, folder: Path) -> dict:
    from actors.upstream import AnswerCache, UpstreamAnswer, UpstreamRequest
    from actors.upstream.cache import cache_identity, cache_key

    identity = cache_identity("anthropic", "https://api.anthropic.com", "claude-haiku-4-5")
    requests = [UpstreamRequest.symbol(f"{i} θ {i + 1} γ 7") for i in range(n)]
    answer = UpstreamAnswer("1234", Fraction(1234), "end_turn", 52, 3, 0.8, "anthropic", "claude-haiku-4-5")
    keys = [cache_key(identity, r) for r in requests]
    key_times = _timed(lambda r: cache_key(identity, r), requests)
    path = folder / f"bench-{synchronous.lower()}.sqlite"
    with AnswerCache(path, synchronous=synchronous) as cache:
        write_times = _timed(lambda i: cache.put(keys[i], identity, requests[i], answer), range(n))
        hit_times = _timed(cache.get, keys)
        miss_times = _timed(cache.get, [k[::-1] for k in keys])
        assert cache.counts()["answered"] == n
    size = sum(p.stat().st_size for p in folder.glob(path.name + "*"))
    return {
        "synchronous": synchronous, "n": n, "key": _stats(key_times), "write": _stats(write_times),
        "read_hit": _stats(hit_times), "read_miss": _stats(miss_times),
        "bytes_per_answer": round(size / n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="answers per mode")
    parser.add_argument("--modes", default="NORMAL,FULL", help="SQLite synchronous modes, comma-separated")
    parser.add_argument("--dir", type=Path, help="where to put the SQLite files (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "cache.json")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        results = [bench(args.n, mode.strip().upper(), Path(folder)) for mode in args.modes.split(",")]
    print(f"{'sync':<7} {'op':<10} {'median µs':>10} {'p95 µs':>8} {'mean µs':>8}")
    for result in results:
        for op in ("key", "write", "read_hit", "read_miss"):
            s = result[op]
            print(f"{result['synchronous']:<7} {op:<10} {s['median_us']:>10} {s['p95_us']:>8} {s['mean_us']:>8}")
        print(f"{result['synchronous']:<7} {result['bytes_per_answer']} bytes per answer on disk")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"results": results}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
