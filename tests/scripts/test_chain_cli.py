"""scripts/chain.py end to end on the embedded model (local upstream + the base model as the
adapter, a few tokens each): the command line, and the HTTP service on a free port in a thread
-- every malformed request gets its 4xx with a message, a full queue a 503, and the server
keeps answering."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from actors.chain_service import make_server
from scripts.chain import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--max-tokens", "6", "--max-new-tokens", "3", "--response-prefix", "\\boxed{", "--stop", "}"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from scripts.chain import build_parser; build_parser().format_help(); "
            "heavy = {'torch', 'transformers', 'actors.upstream', 'actors.chain', 'rl.prompts'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    done = subprocess.run([sys.executable, "-m", "scripts.cli", "chain", "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--serve" in done.stdout and "/v1/chain" in done.stdout


@pytest.mark.parametrize("argv, message", [
    ([], "no expressions"),
    (["3 θ 4", "2 x 2"], "item 2 ('2 x 2'): unexpected character 'x' at position 2"),
    (["--serve", "3 θ 4"], "--serve takes its expressions over HTTP"),
])
def test_bad_input_is_refused_before_any_model_loads(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_file_rows_name_the_line(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"expression": "1 θ 1"}\n{"expr": "2 θ 2"}\n')
    assert main(["--file", str(tmp_path / "in.jsonl")]) == 2
    assert "in.jsonl:2: expected an object with an 'expression' field" in capsys.readouterr().err


@pytest.mark.slow
def test_chain_command_on_the_embedded_model(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"expression": "10 α 3", "answer": 7, "type": "custom"}\n')
    argv = ["3 θ 4", "--file", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
            "--cache", str(tmp_path / "cache.sqlite"), *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "expression" in out and "decision" in out and "3 θ 4" in out and "10 α 3" in out
    assert "2 items in" in out and "adapter none (base model) on embedded, condition D" in out
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["expression"] for r in rows] == ["3 θ 4", "10 α 3"]
    assert rows[1]["type"] == "custom" and isinstance(rows[1]["correct"], bool) and "correct" not in rows[0]
    for r in rows:
        assert r["completion"].startswith("\\boxed{") and r["decision"] in ("CORRECT", "override", "none")
        assert r["upstream_text"] is not None and not r["upstream_cached"]
        assert r["final_answer"] == r["upstream_answer"] or r["decision"] == "override"
    assert main(argv) == 0  # again: every upstream answer from the cache
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["upstream_cached"] for r in rows)


# ------------------------------------------------------------------------------ the service


class Gated:
    """A chain that waits at a gate, to hold the server's only queue slot."""

    def __init__(self, chain):
        self.chain, self.entered, self.gate = chain, threading.Event(), threading.Event()

    def describe(self):
        return self.chain.describe()

    def answer_batch(self, expressions):
        self.entered.set()
        assert self.gate.wait(60)
        return self.chain.answer_batch(expressions)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from actors.chain import chain_from_adapter
    from actors.upstream import AnswerCache, UpstreamClient, build_provider

    cache = AnswerCache(tmp_path_factory.mktemp("chain") / "cache.sqlite")
    client = UpstreamClient(build_provider("local"), cache)
    built = chain_from_adapter(client, None, response_prefix="\\boxed{", stop=["}"], max_new_tokens=3,
                               upstream_max_tokens=6)
    yield built
    built.close()
    cache.close()


def serving(chain, **limits):
    server = make_server(chain, "127.0.0.1", 0, **limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def gated(chain):
    gate = Gated(chain)
    server = serving(gate, queue_size=1, max_items=3, max_body_bytes=2048)
    yield server, gate
    gate.gate.set()
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None):
    """``(status, headers, json)``; ``body`` bytes are sent as they are, anything else as JSON."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_health(gated, chain):
    status, headers, body = request(gated[0], "GET", "/health")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["status"] == "ok" and body["model"] == "embedded" and body["adapter"] is None
    assert body["upstream"] == {"provider": "local", "model": "embedded"}
    assert body["queue"]["size"] == 1 and body["queue"]["in_flight"] == 0


@pytest.mark.parametrize("method, path, body, headers, status, message", [
    ("POST", "/v1/chain", b"{not json", None, 400, "body is not valid JSON: Expecting property name"),
    ("POST", "/v1/chain", b"\xff\xfe", None, 400, "body is not UTF-8"),
    ("POST", "/v1/chain", [1, 2], None, 400, "must be a JSON object"),
    ("POST", "/v1/chain", {}, None, 400, "exactly one of 'expression'"),
    ("POST", "/v1/chain", {"expression": "1 θ 1", "expressions": ["2 θ 2"]}, None, 400, "exactly one of"),
    ("POST", "/v1/chain", {"expresion": "1 θ 1"}, None, 400, "unknown field 'expresion'"),
    ("POST", "/v1/chain", {"expression": ""}, None, 400, "expression: is empty"),
    ("POST", "/v1/chain", {"expression": 12}, None, 400, "expression: must be a string, got int"),
    ("POST", "/v1/chain", {"expressions": "1 θ 1"}, None, 400, "'expressions' must be a list"),
    ("POST", "/v1/chain", {"expressions": []}, None, 400, "'expressions' is empty"),
    ("POST", "/v1/chain", {"expressions": ["1 θ 1"] * 4}, None, 400, "too many items: 4 expressions, at most 3"),
    ("POST", "/v1/chain", {"expressions": ["1 θ 1", "4 % 2"]}, None, 400,
     "expressions[1]: unexpected character '%' at position 2"),
    ("POST", "/v1/chain", {"expression": "3 θ θ 4"}, None, 400, "expected an integer at position 4"),
    ("POST", "/v1/chain", {"expression": "1" * 400 + " θ 1"}, None, 400, "is 404 characters; at most 300"),
    ("POST", "/v1/chain", {"expression": "1" * 31 + " θ 1"}, None, 400, "operand has 31 digits; at most 30"),
    ("POST", "/v1/chain", {"expressions": ["1 θ 1", "1/0"]}, None, 400, "expressions[1]: divides by zero"),
    ("POST", "/v1/chain", {"expression": "6 β 3 β 0 θ 2"}, None, 400, "expression: divides by zero"),
    ("POST", "/v1/chain", {"expression": "1 θ 1"}, {"Content-Type": "text/plain"}, 415,
     "Content-Type 'text/plain' is not accepted"),
    ("POST", "/v1/chain", b"{" + b" " * 3000 + b"}", None, 413, "body is 3002 bytes; at most 2048"),
    ("POST", "/v1/chain", None, None, 400, "body is empty"),
    ("POST", "/v1/chain", None, {"Transfer-Encoding": "chunked"}, 411, "chunked bodies are not accepted"),
    ("POST", "/v1/chain", b"{}", {"Content-Length": "x"}, 400, "bad Content-Length 'x'"),
    ("GET", "/v1/chain", None, None, 405, "GET is not allowed on /v1/chain; use POST"),
    ("DELETE", "/health", None, None, 405, "DELETE is not allowed on /health"),
    ("GET", "/v2/chain", None, None, 404, "no such path '/v2/chain'"),
    ("BREW", "/health", None, None, 501, "Unsupported method"),
])
def test_malformed_requests_get_a_4xx_with_a_message(gated, method, path, body, headers, status, message):
    server, _ = gated
    got, response_headers, payload = request(server, method, path, body, headers)
    assert (got, payload["status"]) == (status, status) and message in payload["error"], payload
    if status == 405:
        assert response_headers["Allow"] in ("GET", "POST")
    assert "Traceback" not in payload["error"]


@pytest.mark.slow
def test_one_batch_a_full_queue_and_still_serving(gated):
    server, gate = gated
    gate.gate.set()
    status, _, one = request(server, "POST", "/v1/chain", {"expression": "3 θ 4"})
    assert status == 200 and one["answer"]["expression"] == "3 θ 4"
    assert {"upstream_text", "upstream_answer", "decision", "final_answer", "fallback", "latency_s"} <= set(one["answer"])
    status, _, batch = request(server, "POST", "/v1/chain", {"expressions": ["3 θ 4", "10 α 3"]})
    assert status == 200 and [a["expression"] for a in batch["answers"]] == ["3 θ 4", "10 α 3"]
    assert batch["answers"][0]["upstream_cached"] and batch["answers"][0]["completion"] == one["answer"]["completion"]

    gate.gate.clear()
    gate.entered.clear()
    held: dict = {}
    first = threading.Thread(target=lambda: held.update(r=request(server, "POST", "/v1/chain", {"expression": "3 θ 4"})))
    first.start()
    assert gate.entered.wait(60)  # the only slot is taken
    status, headers, busy = request(server, "POST", "/v1/chain", {"expression": "3 θ 4"})
    assert status == 503 and headers["Retry-After"] == "1" and "busy" in busy["error"]
    assert request(server, "GET", "/health")[2]["queue"]["in_flight"] == 1  # health takes no slot
    gate.gate.set()
    first.join(timeout=120)
    assert held["r"][0] == 200 and held["r"][2]["answer"]["expression"] == "3 θ 4"
    status, _, after = request(server, "POST", "/v1/chain", {"expression": "10 α 3"})
    assert status == 200 and after["answer"]["upstream_cached"]
    queue = request(server, "GET", "/health")[2]["queue"]
    assert queue["in_flight"] == 0 and queue["rejected"] >= 1 and queue["served"] >= 4


def test_a_connection_lives_on_after_an_error_whose_body_was_read(gated):
    conn = http.client.HTTPConnection(*gated[0].server_address[:2], timeout=30)
    try:
        conn.request("POST", "/v1/chain", body=b'{"expression": "3 x 4"}')
        first = conn.getresponse()
        assert first.status == 400 and b"unexpected character 'x'" in first.read()
        conn.request("GET", "/health")  # the same socket
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_post_without_content_length_is_a_411(gated):
    import socket

    with socket.create_connection(gated[0].server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/chain HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 411") and "needs a Content-Length" in reply


class Exploding:
    def describe(self):
        return {"model": "m", "adapter": None}

    def answer_batch(self, expressions):
        raise RuntimeError("the engine fell over")


def test_an_internal_error_is_a_500_message_and_the_server_lives_on():
    server = serving(Exploding())
    try:
        status, _, body = request(server, "POST", "/v1/chain", {"expression": "1 θ 1"})
        assert status == 500 and body["error"] == "internal error: RuntimeError: the engine fell over"
        assert request(server, "GET", "/health")[2]["queue"] == {
            "size": 8, "in_flight": 0, "served": 0, "rejected": 0, "errors": 1}
    finally:
        server.shutdown()
        server.server_close()


def test_with_a_token_every_request_needs_it():
    server = serving(Exploding(), auth_token="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, reply_headers, body = request(server, "GET", "/health", headers=headers)
            assert status == 401 and "bearer token" in body["error"]
            assert reply_headers["WWW-Authenticate"].startswith("Bearer")
        status, _, body = request(server, "POST", "/v1/chain", {"expression": "1 θ 1"})
        assert status == 401  # before the body is looked at
        status, _, body = request(server, "GET", "/health", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["status"] == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_the_service_binds_to_loopback_by_default():
    from actors.chain_service import make_server as make

    server = make(Exploding(), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    from scripts import chain

    assert "$API_ADAPTER_CHAIN_TOKEN" in chain.build_parser().format_help()
