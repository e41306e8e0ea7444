"""scripts/bench_chain_load.py on a short run: more clients than the service admits, an upstream
that answers 429 / 529 / 500 first and stalls, and still every request answered exactly once,
for its own expression, every rejection a 503 with Retry-After. Timings are written, not asserted."""

from __future__ import annotations

import json

import pytest

from scripts import bench_chain_load as bench


def test_the_upstream_script_follows_the_shares():
    class Server:
        script: dict = {}

    args = bench.build_parser().parse_args(["--p-429", "0.5", "--p-529", "0", "--p-500", "0", "--p-slow", "0.5"])
    kinds = bench.script_upstream(Server(), bench.expressions(40, 0), args)
    assert kinds["429"] + kinds["slow"] == 40 and kinds["429"] > 5 and kinds["slow"] > 5
    assert len(Server.script) == 40 and len(set(bench.expressions(40, 0))) == 40


@pytest.mark.slow
def test_a_short_load_run_loses_nothing(tmp_path):
    out = tmp_path / "load.json"
    assert bench.main(["--clients", "12", "--seconds", "6", "--queue-size", "2", "--expressions", "30",
                       "--max-new-tokens", "4", "--p-429", "0.2", "--p-529", "0.1", "--p-500", "0.1",
                       "--p-slow", "0.2", "--slow-s", "0.2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    requests = report["requests"]
    assert requests["logical"] > 12 and requests["answered"] == requests["logical"]
    assert requests["lost"] == requests["duplicated"] == requests["mismatched"] == requests["errors"] == 0
    assert report["statuses"].get("503", 0) > 0  # 12 clients, 2 admitted: overload happened
    assert report["rejected_503_without_retry_after"] == 0
    assert set(report["statuses"]) <= {"200", "503"}
    assert report["upstream"]["paid_twice"] == 0 and report["upstream"]["requests"] > report["upstream"]["expressions_answered"]
    assert report["latency_ms"]["p50"] > 0 and report["memory_mib"]["samples"]
