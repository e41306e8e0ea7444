"""The upstream client: a provider behind the answer cache, with bounded concurrency,
in-flight sharing and a per-run token and cost tally.

``await client.answer(request)`` looks the request up in the cache; on a miss it joins an
identical request already in flight (one asyncio future per cache key, so duplicates make one
call), else it takes a slot of the semaphore (``concurrency`` calls at a time; retry waits
hold their slot, which eases a rate-limited server), asks the provider, stores the answer
(one committed transaction) and counts it. It has the providers' interface, so anything that
takes a provider takes a client.

Spend: with ``max_requests`` the client makes at most that many provider calls (cache hits and
shared calls are free). The call that would cross it raises :class:`UpstreamBudgetExceeded`
instead; ``answer_all`` first lets every call already under way finish and be cached, so a
rerun with a higher limit pays only for what is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from actors.upstream.base import DEFAULT_CONCURRENCY, Provider, UpstreamAnswer, UpstreamRequest
from actors.upstream.cache import AnswerCache, cache_identity, cache_key


@dataclass(frozen=True)
class Pricing:
    """US dollars per million tokens. The default is Claude Haiku 4.5's list price."""

    input_per_mtok: float = 1.0
    output_per_mtok: float = 5.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


FREE = Pricing(0.0, 0.0)


@dataclass
class Tally:
    """Counts for one run. ``calls``: answers fetched from the provider in this run (each may
    have taken several ``attempts``); ``cache_hits``: served from the cache; ``shared``: served
    by an identical call in flight; ``failed``: calls that got no reply; ``no_answer``: answers
    without a number (failed, refused, unreadable). Tokens: ``input``/``output_tokens`` were
    spent in this run; ``cached_*`` were spent by the earlier run that cached them."""

    answers: int = 0
    calls: int = 0
    attempts: int = 0
    cache_hits: int = 0
    shared: int = 0
    failed: int = 0
    no_answer: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cached_output_tokens: int = 0

    def add(self, answer: UpstreamAnswer, shared: bool = False) -> None:
        self.answers += 1
        self.no_answer += answer.answer is None
        if shared:
            self.shared += 1
        elif answer.cached:
            self.cache_hits += 1
            self.cached_input_tokens += answer.input_tokens
            self.cached_output_tokens += answer.output_tokens
        else:
            self.calls += 1
            self.attempts += answer.attempts
            self.failed += answer.failed
            self.input_tokens += answer.input_tokens
            self.output_tokens += answer.output_tokens

    def to_json(self, pricing: Pricing) -> dict:
        data = asdict(self)
        data["cost_usd"] = round(pricing.cost(self.input_tokens, self.output_tokens), 6)
        data["cost_usd_with_cached"] = round(pricing.cost(
            self.input_tokens + self.cached_input_tokens,
            self.output_tokens + self.cached_output_tokens), 6)
        return data


class UpstreamBudgetExceeded(RuntimeError):
    """``max_requests`` provider calls were made; ``unanswered``: requests left without an answer
    (None from a single :meth:`UpstreamClient.answer`)."""

    def __init__(self, limit: int, unanswered: int | None = None):
        self.limit, self.unanswered = limit, unanswered
        left = "" if unanswered is None else f"; {unanswered} request(s) left unanswered"
        super().__init__(f"upstream.max_requests {limit} reached: {limit} calls made{left}. Every answer "
                         "fetched is in the answer cache; raise the limit and rerun to pay only for the rest")

    def __reduce__(self):  # crosses Ray's process boundary with its fields
        return type(self), (self.limit, self.unanswered)


class UpstreamClient:
    """``provider`` behind ``cache`` (None: no cache); see the module docstring. The client
    closes its provider in :meth:`aclose`; the cache belongs to the caller."""

    def __init__(
        self,
        provider: Provider,
        cache: AnswerCache | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        pricing: Pricing | None = None,
        max_requests: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_requests is not None and max_requests < 0:
            raise ValueError(f"max_requests must be >= 0 or None, got {max_requests}")
        self.max_requests, self._calls_started = max_requests, 0
        self.provider = provider
        self.cache = cache
        self.pricing = pricing or Pricing()
        self.tally = Tally()
        self.identity = cache_identity(provider.name, provider.endpoint, provider.model)
        self.name, self.model, self.endpoint = provider.name, provider.model, provider.endpoint
        self._semaphore = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Future] = {}

    @property
    def calls_started(self) -> int:
        """Provider calls this client has started (what ``max_requests`` bounds)."""
        return self._calls_started

    def key(self, request: UpstreamRequest) -> str:
        return cache_key(self.identity, request)

    async def answer(self, request: UpstreamRequest) -> UpstreamAnswer:
        key = self.key(request)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.tally.add(hit)
            return hit
        pending = self._inflight.get(key)
        if pending is not None:
            await asyncio.wait([pending])  # raises only if *this* caller is cancelled
            if pending.cancelled():  # the caller that owned the call was cancelled: ask again
                return await self.answer(request)
            self.tally.add(pending.result(), shared=True)
            return pending.result()
        if self.max_requests is not None and self._calls_started >= self.max_requests:
            raise UpstreamBudgetExceeded(self.max_requests)
        self._calls_started += 1
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            async with self._semaphore:
                answer = await self.provider.answer(request)
            if self.cache is not None:
                self.cache.put(key, self.identity, request, answer)
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[key]
        self.tally.add(answer)
        future.set_result(answer)
        return answer

    async def answer_all(
        self,
        requests: Iterable[UpstreamRequest],
        on_answer: Callable[[int, UpstreamAnswer], None] | None = None,
    ) -> list[UpstreamAnswer]:
        """Answer every request (in input order); ``on_answer(index, answer)`` as each arrives.
        A failure is raised once every other request has finished (so nothing already paid
        for is dropped); over ``max_requests``, :class:`UpstreamBudgetExceeded` with the count
        left unanswered."""

        async def one(index: int, request: UpstreamRequest) -> UpstreamAnswer:
            answer = await self.answer(request)
            if on_answer is not None:
                on_answer(index, answer)
            return answer

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        over = [e for e in errors if isinstance(e, UpstreamBudgetExceeded)]
        if len(over) < len(errors):
            raise next(e for e in errors if not isinstance(e, UpstreamBudgetExceeded))
        if over:
            raise UpstreamBudgetExceeded(over[0].limit, len(over))
        return results

    async def answer_all_with_progress(self, requests: list[UpstreamRequest], label: str = "upstream"):
        """:meth:`answer_all`, printing ``label: n/total (c from the cache)`` as answers arrive."""
        from rl.metrics import Progress

        progress, cached = Progress(label, len(requests)), [0, 0]

        def on_answer(index: int, answer: UpstreamAnswer) -> None:
            cached[0] += 1
            cached[1] += answer.cached
            progress.update(cached[0], f" answers ({cached[1]} from the cache)")

        return await self.answer_all(requests, on_answer)

    async def aclose(self) -> None:
        await self.provider.aclose()

    async def __aenter__(self) -> "UpstreamClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
