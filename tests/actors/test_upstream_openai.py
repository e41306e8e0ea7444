"""The OpenAI-compatible provider (httpx) against a local chat-completions server."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.upstream import RetryPolicy, UpstreamRequest, make_provider
from actors.upstream.openai_compat import chat_url
from tests.actors.messages_server import MALFORMED, MessagesServer, error, ok

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def server():
    with MessagesServer() as running:
        yield running


def ask(server, *prompts: str, **overrides) -> list:
    kwargs = dict(model="served-model", base_url=server.url, timeout=2.0, retry=FAST, api_key="sk-test")
    provider = make_provider("openai", **{**kwargs, **overrides})

    async def go():
        try:
            return await asyncio.gather(*(provider.answer(UpstreamRequest(p, temperature=0.0)) for p in prompts))
        finally:
            await provider.aclose()
    return asyncio.run(go())


def test_chat_url_accepts_either_base():
    assert chat_url("http://h:1") == chat_url("http://h:1/v1") == "http://h:1/v1/chat/completions"


def test_answer_and_request_shape(server):
    [answer] = ask(server, "Evaluate: 6 β 4")
    assert answer.answer == 1.5 and answer.text == "3/2" and answer.stop_reason == "end_turn"
    assert answer.provider == "openai" and answer.model == "served-model" and answer.input_tokens > 0
    body = server.bodies[0]
    assert body["messages"][0]["role"] == "system" and body["messages"][1]["content"] == "Evaluate: 6 β 4"
    assert body["max_tokens"] == 64 and body["temperature"] == 0.0


def test_retries_and_failures(server):
    server.script["rate"] = [error(429, retry_after="0.2"), ok("1")]
    server.script["flaky"] = [error(500), error(503), ok("2")]
    server.script["garbled"] = [MALFORMED]
    server.script["gone"] = [error(404)]
    server.script["slow"] = [ok("3", delay=1.0)]
    start = time.monotonic()
    answers = ask(server, "rate", "flaky", "garbled", "gone", "slow", timeout=0.25)
    assert time.monotonic() - start >= 0.2
    assert [a.answer for a in answers] == [1, 2, None, None, None]
    assert [a.failed for a in answers] == [False, False, True, True, True]
    assert "malformed" in answers[2].error and "404" in answers[3].error and answers[4].error == "timeout"
    assert [server.requests[p] for p in ("rate", "flaky", "garbled", "gone", "slow")] == [2, 3, 3, 1, 3]


def test_finish_reasons_map_to_stop_reasons(server):
    server.script["cut"] = [ok("The sum is 4", stop_reason="max_tokens")]
    server.script["filtered"] = [ok("5", stop_reason="refusal")]
    cut, filtered = ask(server, "cut", "filtered")
    assert (cut.stop_reason, cut.answer, cut.error) == ("max_tokens", 4, None)
    assert (filtered.stop_reason, filtered.answer, filtered.error) == ("refusal", None, "refusal")
