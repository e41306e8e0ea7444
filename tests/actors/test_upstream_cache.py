"""The answer cache, the retry policy and the client's in-flight sharing, with a fake
in-process provider (a real :class:`Provider` subclass; no HTTP)."""

from __future__ import annotations

import asyncio
import sqlite3
from fractions import Fraction

import pytest

from actors.upstream import (
    AnswerCache, Pricing, Provider, Reply, RetryPolicy, UpstreamAnswer, UpstreamClient,
    UpstreamError, UpstreamRequest, cache_key,
)
from actors.upstream.base import parse_retry_after, status_is_retryable
from actors.upstream.cache import cache_identity


class Scripted(Provider):
    """Answers ``len(prompt)`` after ``delay`` seconds; prompts in ``fail`` fail for good."""

    name, model, endpoint = "scripted", "m", "here"

    def __init__(self, delay: float = 0.0, fail: tuple[str, ...] = ()):
        self.retry = RetryPolicy(max_attempts=2, base_delay=0.0)
        self.delay, self.fail, self.calls = delay, fail, []

    async def call(self, request: UpstreamRequest) -> Reply:
        self.calls.append(request.prompt)
        await asyncio.sleep(self.delay)
        if request.prompt in self.fail:
            raise UpstreamError("HTTP 503", retryable=True)
        return Reply(str(len(request.prompt)), "end_turn", 10, 2)


def answer(text="7", failed=False) -> UpstreamAnswer:
    value = None if failed else Fraction(text)
    return UpstreamAnswer(None if failed else text, value, "end_turn", 3, 1, 0.1, "p", "m",
                          error="HTTP 500" if failed else None, failed=failed)


def test_key_covers_every_field():
    identity = cache_identity("p", "e", "m")
    base = UpstreamRequest("q")
    variants = [UpstreamRequest("q2"), UpstreamRequest("q", system="s"), UpstreamRequest("q", max_tokens=1),
                UpstreamRequest("q", temperature=0.0), UpstreamRequest("q", sample_index=3)]
    keys = {cache_key(identity, r) for r in [base, *variants]}
    keys |= {cache_key(cache_identity(*ids), base) for ids in [("x", "e", "m"), ("p", "x", "m"), ("p", "e", "x")]}
    assert len(keys) == 9 and cache_key(identity, base) == cache_key(dict(identity), UpstreamRequest("q"))


def test_wal_persistence_and_failure_rules(tmp_path):
    path = tmp_path / "c.sqlite"
    ident, request = cache_identity("p", "e", "m"), UpstreamRequest("q")
    with AnswerCache(path) as cache:
        cache.put("k1", ident, request, answer(failed=True))
        assert cache.get("k1") is None and cache.counts() == {"answered": 0, "failed": 1}
        cache.put("k1", ident, request, answer("7"))  # a success replaces the failure
        cache.put("k1", ident, request, answer(failed=True))  # ... and is never replaced by one
        cache.put("k2", ident, request, answer("1/2"))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with AnswerCache(path) as cache:
        got = cache.get("k1")
        assert got.answer == 7 and got.cached and not got.failed
        assert cache.get("k2").answer == Fraction(1, 2) and cache.counts() == {"answered": 2, "failed": 0}


def test_retry_policy_and_retry_after():
    policy = RetryPolicy(base_delay=1.0, max_delay=3.0, jitter=0.0, max_retry_after=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    assert policy.delay(1, retry_after=0.2) == 0.2 and policy.delay(1, retry_after=99) == 5.0
    assert 0.75 <= RetryPolicy(base_delay=1.0).delay(1) <= 1.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    assert all(status_is_retryable(code) for code in (408, 409, 429, 500, 503, 529))
    assert not any(status_is_retryable(code) for code in (400, 401, 403, 404, 413))
    assert not status_is_retryable(503, {"x-should-retry": "false"}) and status_is_retryable(400, {"x-should-retry": "true"})


def test_in_flight_requests_share_one_call(tmp_path):
    provider = Scripted(delay=0.05, fail=("bad",))

    async def go():
        with AnswerCache(tmp_path / "c.sqlite") as cache:
            client = UpstreamClient(provider, cache, concurrency=2, pricing=Pricing(1.0, 5.0))
            requests = [UpstreamRequest("aa")] * 5 + [UpstreamRequest("aa", sample_index=1), UpstreamRequest("bad")]
            answers = await client.answer_all(requests)
            again = await client.answer(UpstreamRequest("aa"))
            return answers, again, client.tally
    answers, again, tally = asyncio.run(go())
    assert provider.calls.count("aa") == 2 and provider.calls.count("bad") == 2  # sample 0 and 1; one retry
    assert [a.answer for a in answers] == [2] * 6 + [None] and again.cached
    assert (tally.calls, tally.shared, tally.cache_hits, tally.failed, tally.no_answer) == (3, 4, 1, 1, 1)
    assert tally.to_json(Pricing(1.0, 5.0))["cost_usd"] == pytest.approx((20 * 1 + 4 * 5) / 1e6)


def test_a_cancelled_owner_does_not_strand_its_sharers():
    provider = Scripted(delay=0.05)

    async def go():
        client = UpstreamClient(provider, None)
        owner = asyncio.create_task(client.answer(UpstreamRequest("abc")))
        await asyncio.sleep(0.01)
        sharer = asyncio.create_task(client.answer(UpstreamRequest("abc")))
        await asyncio.sleep(0.01)
        owner.cancel()
        return await sharer
    assert asyncio.run(go()).answer == 3 and provider.calls == ["abc", "abc"]


def test_max_requests_stops_before_the_limit_and_keeps_every_answer_paid_for(tmp_path):
    from actors.upstream import UpstreamBudgetExceeded

    provider = Scripted(delay=0.02)
    requests = [UpstreamRequest("x" * n) for n in range(1, 8)]  # 7 different prompts

    async def go(limit):
        with AnswerCache(tmp_path / "c.sqlite") as cache:
            client = UpstreamClient(provider, cache, concurrency=2, max_requests=limit)
            try:
                return await client.answer_all(requests + requests[:2]), client.calls_started
            except UpstreamBudgetExceeded as error:
                return error, client.calls_started

    error, started = asyncio.run(go(3))
    assert isinstance(error, UpstreamBudgetExceeded) and started == 3 and len(provider.calls) == 3
    assert error.unanswered == 4 and "max_requests 3 reached" in str(error) and "4 request(s) left" in str(error)
    with AnswerCache(tmp_path / "c.sqlite") as cache:
        assert cache.counts()["answered"] == 3  # every call made was saved
    answers, started = asyncio.run(go(4))  # the rerun pays only for the 4 left
    assert started == 4 and len(provider.calls) == 7 and [a.answer for a in answers] == [*range(1, 8), 1, 2]
    import pickle

    again = pickle.loads(pickle.dumps(error))  # as it crosses from the Ray actor to the driver
    assert (again.limit, again.unanswered, str(again)) == (3, 4, str(error))
