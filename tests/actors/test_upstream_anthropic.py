"""The real ``anthropic`` SDK (``AsyncAnthropic`` and ``AsyncAnthropicVertex``) against a local
Messages API server: answers, retries, permanent failures, stop reasons and the cache."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import pytest
from tests.actors.messages_server import MALFORMED, MessagesServer, error, ok

from actors.upstream import AnswerCache, RetryPolicy, UpstreamClient, UpstreamRequest, make_provider

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def server():
    with MessagesServer() as running:
        yield running


def anthropic(server: MessagesServer, **overrides):
    kwargs = dict(api_key=server.api_key, base_url=server.url, timeout=2.0, retry=FAST)
    return make_provider("anthropic", **{**kwargs, **overrides})


def vertex(server: MessagesServer, **overrides):
    kwargs = dict(project="proj-1", region="us-east5", access_token=server.access_token,
                  base_url=server.url + "/v1", timeout=2.0, retry=FAST)
    return make_provider("vertex", **{**kwargs, **overrides})


def ask(provider, *prompts: str) -> list:
    async def go():
        try:
            return await asyncio.gather(*(provider.answer(UpstreamRequest(p)) for p in prompts))
        finally:
            await provider.aclose()
    return asyncio.run(go())


def test_normal_answer_sends_the_seed_request(server):
    [answer] = ask(anthropic(server), "Evaluate: 12 θ 7")
    assert answer.answer == Fraction(19) and answer.text == "19" and answer.error is None
    assert answer.stop_reason == "end_turn" and not answer.failed and answer.attempts == 1
    assert (answer.input_tokens, answer.output_tokens) == (len("Evaluate: 12 θ 7"), 2)
    assert answer.provider == "anthropic" and answer.model == "claude-haiku-4-5"
    body = server.bodies[0]
    assert body["max_tokens"] == 64 and body["model"] == "claude-haiku-4-5"
    assert body["system"].startswith("You are an arithmetic calculator.")
    assert "temperature" not in body  # None: the API's default


def test_a_set_temperature_reaches_the_request_body(server):
    provider = anthropic(server)

    async def go():
        try:
            return await provider.answer(UpstreamRequest("Evaluate: 2 θ 3", temperature=0.7))
        finally:
            await provider.aclose()

    answer = asyncio.run(go())
    assert answer.error is None and answer.answer == Fraction(5)
    assert server.bodies[0]["temperature"] == 0.7


def test_retries_then_answers(server):
    server.script["Evaluate: 1 θ 1"] = [error(429, retry_after="0.3"), ok()]
    server.script["Evaluate: 2 θ 2"] = [error(529), error(500), ok()]
    server.script["Evaluate: 3 θ 3"] = [MALFORMED, ok()]
    start = time.monotonic()
    answers = ask(anthropic(server), "Evaluate: 1 θ 1", "Evaluate: 2 θ 2", "Evaluate: 3 θ 3")
    assert time.monotonic() - start >= 0.3  # retry-after was honoured
    assert [a.answer for a in answers] == [2, 4, 6]
    assert [a.attempts for a in answers] == [2, 3, 2]
    assert [server.requests[f"Evaluate: {i} θ {i}"] for i in (1, 2, 3)] == [2, 3, 2]


def test_permanent_failures_become_no_answer(server):
    server.script["overloaded"] = [error(529)]
    server.script["garbled"] = [MALFORMED]
    server.script["bad request"] = [error(400)]
    server.script["slow"] = [ok("5", delay=1.0)]
    answers = ask(anthropic(server, timeout=0.25), "overloaded", "garbled", "bad request", "slow")
    assert all(a.answer is None and a.failed and a.text is None for a in answers)
    assert "529" in answers[0].error and "malformed" in answers[1].error
    assert "400" in answers[2].error and answers[3].error == "timeout"
    assert [server.requests[p] for p in ("overloaded", "garbled", "bad request", "slow")] == [3, 3, 1, 3]


@pytest.mark.parametrize("stop, text, error_text, answer", [
    ("refusal", "", "refusal", None),
    ("refusal", "I won't", "refusal", None),
    ("pause_turn", "7", "incomplete turn (pause_turn)", None),
    ("tool_use", "", "incomplete turn (tool_use)", None),
    ("end_turn", "", "empty content", None),
    ("end_turn", "I cannot evaluate θ.", None, None),
    ("max_tokens", "The answer is 1", None, 1),
    ("stop_sequence", "8", None, 8),
])
def test_stop_reasons(server, stop, text, error_text, answer):
    server.script["q"] = [ok(text, stop_reason=stop)]
    [got] = ask(anthropic(server), "q")
    assert got.stop_reason == stop and got.error == error_text and got.answer == answer
    assert not got.failed and server.requests["q"] == 1


def test_vertex_uses_the_rawpredict_path_and_the_token(server):
    server.script["Evaluate: 5 γ 5"] = [error(429, retry_after_ms="20"), ok()]
    [answer] = ask(vertex(server), "Evaluate: 5 γ 5")
    assert answer.answer == 25 and answer.provider == "vertex" and answer.attempts == 2
    assert server.paths[-1] == (
        "/v1/projects/proj-1/locations/us-east5/publishers/anthropic/models/claude-haiku-4-5:rawPredict")
    assert "model" not in server.bodies[-1] and server.bodies[-1]["anthropic_version"]


def test_vertex_wrong_token_fails_without_retry(server):
    [answer] = ask(vertex(server, access_token="wrong"), "Evaluate: 1 θ 2")
    assert answer.failed and "401" in answer.error and answer.attempts == 1


def test_vertex_project_and_region_from_env(server, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-proj")
    monkeypatch.setenv("GOOGLE_CLOUD_REGION", "europe-west1")
    provider = vertex(server, project=None, region=None)
    assert provider.endpoint == "vertex:europe-west1"
    [answer] = ask(provider, "Evaluate: 2 γ 3")
    assert answer.answer == 6 and "/projects/env-proj/locations/europe-west1/" in server.paths[-1]
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    monkeypatch.delenv("ANTHROPIC_VERTEX_PROJECT_ID", raising=False)
    with pytest.raises(ValueError, match="project and a region"):
        vertex(server, project=None)


SCRIPTED = {
    "Evaluate: 1 θ 1": [error(429, retry_after="0.05"), ok()],  # answered after a retry
    "Evaluate: 2 θ 2": [ok()],
    "refused": [ok("", stop_reason="refusal")],                  # a reply: kept
    "overloaded": [error(529)],                                   # failed: retried on rerun
    "garbled": [MALFORMED],
}


def run_client(provider, cache: AnswerCache, prompts: list[str]):
    async def go():
        async with UpstreamClient(provider, cache, concurrency=4) as client:
            answers = await client.answer_all([UpstreamRequest(p) for p in prompts])
            return answers, client.tally
    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["anthropic", "vertex"])
def test_cache_holds_exactly_what_was_answered(server, tmp_path, kind):
    build = anthropic if kind == "anthropic" else vertex
    server.script.update(SCRIPTED)
    prompts = list(SCRIPTED) + ["Evaluate: 2 θ 2"]  # a duplicate shares the call
    with AnswerCache(tmp_path / "cache.sqlite") as cache:
        answers, tally = run_client(build(server), cache, prompts)
        assert [a.answer for a in answers] == [2, 4, None, None, None, 4]
        assert tally.calls == 5 and tally.shared == 1 and tally.failed == 2
        assert server.requests["Evaluate: 2 θ 2"] == 1
        assert cache.counts() == {"answered": 3, "failed": 2}
        stored = {req["prompt"]: ans for req, ans in cache.records()}
        assert stored["Evaluate: 1 θ 1"].answer == 2 and stored["refused"].error == "refusal"
        assert stored["overloaded"].failed and stored["garbled"].failed
        assert {req["endpoint"] for req, _ in cache.records()} == {build(server).endpoint}

        before = dict(server.requests)
        server.script["overloaded"] = [ok("9")]  # the upstream has recovered
        answers, tally = run_client(build(server), cache, prompts)
        assert tally.cache_hits == 4 and tally.calls == 2 and tally.input_tokens > 0
        for prompt in ("Evaluate: 1 θ 1", "Evaluate: 2 θ 2", "refused"):
            assert server.requests[prompt] == before[prompt]  # no call repeated
        assert server.requests["overloaded"] == before["overloaded"] + 1
        assert answers[3].answer == 9 and cache.counts() == {"answered": 4, "failed": 1}


def test_concurrency_is_bounded(server, tmp_path):
    server.delay = 0.1
    prompts = [f"Evaluate: {i} θ 1" for i in range(8)]
    start = time.monotonic()
    with AnswerCache(tmp_path / "c.sqlite") as cache:
        answers, tally = run_client(anthropic(server), cache, prompts)  # 4 at a time
    assert [a.answer for a in answers] == [i + 1 for i in range(8)]
    assert time.monotonic() - start >= 0.2 and tally.calls == 8
