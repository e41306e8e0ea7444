"""scripts/run_baseline.py end to end: against a local Messages API server (a SIGKILL mid-run
and a rerun included) and, marked slow, with the embedded model on CPU."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from scripts.run_baseline import main
from tests.actors.messages_server import MessagesServer, error
from verifiers.answers import parse_api_answer
from verifiers.symbol_data import build_symbol_dataset, write_jsonl

REPO = Path(__file__).resolve().parents[2]
FAST = ["--max-attempts", "2", "--retry-base-delay", "0.01", "--no-progress"]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with MessagesServer() as running:
        yield running


def symbol_file(path: Path, n_per_type: int = 10) -> list[dict]:
    rows = build_symbol_dataset(n_per_type=n_per_type, test_fraction=0.5)[1]
    write_jsonl(rows, path)
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from scripts.run_baseline import build_parser; build_parser().format_help(); "
            "heavy = {'anthropic', 'torch', 'httpx', 'transformers', 'actors.upstream', 'rl.datasets'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    done = subprocess.run([sys.executable, "scripts/run_baseline.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "--provider" in done.stdout


def test_baseline_table_files_and_bad_rows(server, tmp_path, capsys):
    rows = symbol_file(tmp_path / "test.jsonl", n_per_type=8)
    with (tmp_path / "test.jsonl").open("a") as handle:
        handle.write('{"expression": "1 θ 1", "answer": 3, "type": "custom"}\nnot json\n')
    custom = [r for r in rows if r["type"] == "custom"]
    server.script["Evaluate: " + custom[0]["expression"]] = [error(529)]  # fails for good
    args = ["--provider", "anthropic", "--base-url", server.url, "--data", str(tmp_path / "test.jsonl"),
            "--run-dir", str(tmp_path / "run"), *FAST]
    assert main(args) == 2  # malformed rows refuse the run ...
    assert "test.jsonl:9" in capsys.readouterr().err
    assert main([*args, "--skip-bad-rows"]) == 0  # ... unless skipped, each listed as file:line
    out = capsys.readouterr()
    assert f"{tmp_path / 'test.jsonl'}:9: 'answer' 3 disagrees" in out.err and "test.jsonl:10:" in out.err
    assert "custom    3/4 (75.0%)" in out.out and "standard  4/4 (100.0%)" in out.out
    assert "overall   7/8 (87.5%)" in out.out
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    assert [a["expression"] for a in answers] == [r["expression"] for r in rows]
    failed = answers[rows.index(custom[0])]
    assert failed["api_answer"] is None and "529" in failed["api_error"] and failed["api_failed"]
    assert all(a["api_answer"] == str(a["answer"]) for a in answers if a is not failed)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["accuracy"]["overall"] == {"correct": 7, "total": 8, "accuracy": 0.875}
    assert results["n_failed"] == 1 and results["provider"] == "anthropic" and results["model"] == "claude-haiku-4-5"
    tokens = results["tokens"]
    assert results["cost_usd"] == pytest.approx((tokens["input"] * 1 + tokens["output"] * 5) / 1e6)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_limit_and_config_errors(server, tmp_path, capsys):
    symbol_file(tmp_path / "t.jsonl", n_per_type=4)
    common = ["--data", str(tmp_path / "t.jsonl"), "--run-dir", str(tmp_path / "run"), *FAST]
    assert main(["--provider", "anthropic", "--base-url", server.url, "--limit", "3", *common]) == 0
    assert len(read_jsonl(tmp_path / "run" / "answers.jsonl")) == 3 and sum(server.requests.values()) == 3
    assert main(["--provider", "openai", *common]) == 2 and "needs --model" in capsys.readouterr().err
    for prompt in list(server.requests):  # the upstream now fails every item
        server.script[prompt] = [error(500)]
    assert main(["--provider", "anthropic", "--base-url", server.url, "--limit", "3", *common,
                 "--run-dir", str(tmp_path / "run2")]) == 1  # a fresh cache: nothing answered
    assert main(["--provider", "anthropic", "--base-url", server.url, "--limit", "3", *common]) == 0  # cached


def test_gsm8k_task(server, tmp_path):
    args = ["--task", "gsm8k", "--limit", "2", "--provider", "anthropic", "--base-url", server.url,
            "--run-dir", str(tmp_path / "run"), *FAST]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"].endswith("gsm8k/test.jsonl") and results["accuracy"]["gsm8k"]["total"] == 2
    assert all(b["max_tokens"] == 512 and "word problem" in b["system"] for b in server.bodies)
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    assert [a["api_answer"] for a in answers] == ["42", "42"] and answers[0]["question"].startswith("Janet")


def answered_in(cache: Path) -> int:
    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(cache) as db:
            return db.execute("SELECT COUNT(*) FROM answers WHERE failed = 0").fetchone()[0]
    except sqlite3.OperationalError:  # the table is being created
        return 0


def test_sigkill_mid_run_then_rerun_repeats_no_call(server, tmp_path):
    rows = symbol_file(tmp_path / "test.jsonl", n_per_type=16)  # 16 items
    run_dir = tmp_path / "run"
    args = ["--provider", "anthropic", "--base-url", server.url, "--data", str(tmp_path / "test.jsonl"),
            "--run-dir", str(run_dir), "--concurrency", "3", "--timeout", "60", *FAST]
    server.delay, server.hold_after = 0.02, 6  # answer 6, then hold every request unanswered
    proc = subprocess.Popen([sys.executable, "scripts/run_baseline.py", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        # 6 answers committed, and at least one more request in flight, held by the server
        while answered_in(run_dir / "cache.sqlite") < 6 or sum(server.requests.values()) < 7:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run did not commit its first answers"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert not (run_dir / "answers.jsonl").exists()
    server.release()

    assert main(args) == 0
    assert all(count == 1 for count in server.responses.values()) and len(server.responses) == 16
    answers = read_jsonl(run_dir / "answers.jsonl")
    assert [a["expression"] for a in answers] == [r["expression"] for r in rows]
    assert all(a["api_correct"] and a["api_answer"] == str(a["answer"]) and a["api_error"] is None for a in answers)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["this_run"]["cache_hits"] == 6 and results["this_run"]["calls"] == 10
    assert results["accuracy"]["overall"]["correct"] == 16


@pytest.mark.slow
def test_local_embedded_baseline_on_20_items(tmp_path, capsys):
    rows = symbol_file(tmp_path / "test.jsonl", n_per_type=20)
    args = ["--provider", "local", "--data", str(tmp_path / "test.jsonl"), "--run-dir", str(tmp_path / "run"),
            "--no-progress", "--threads", "1", "--max-tokens", "32"]
    assert main(args) == 0
    assert "overall   " in capsys.readouterr().out
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    assert len(answers) == 20 == len(rows)
    assert all(isinstance(a["api_text"], str) and not a["api_failed"] for a in answers)
    assert {a["stop_reason"] for a in answers} <= {"end_turn", "max_tokens"}
    assert all(a["output_tokens"] <= 32 and a["input_tokens"] > 20 for a in answers)
    for a in answers:  # api_answer is what parse_api_answer reads from api_text
        parsed = parse_api_answer(a["api_text"])
        assert a["api_answer"] == (None if parsed is None else str(parsed))
        assert a["api_correct"] == (parsed == Fraction(a["answer"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["provider"] == "local" and results["cost_usd"] == 0 and results["n"] == 20
    assert main(args) == 0  # a rerun is answered from the cache; the model is not even loaded
    assert json.loads((tmp_path / "run" / "results.json").read_text())["this_run"]["cache_hits"] == 20
    assert read_jsonl(tmp_path / "run" / "answers.jsonl") == answers
