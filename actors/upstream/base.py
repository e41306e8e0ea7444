"""The upstream's records and the one loop every provider shares: call, classify, retry.

A provider implements :meth:`Provider.call` -- one HTTP request (or one local generation) that
returns a :class:`Reply` or raises :class:`UpstreamError` saying whether a retry may help.
:meth:`Provider.answer` wraps it: retries with exponential backoff and jitter (honouring a
server's ``retry-after``), then turns the reply into an :class:`UpstreamAnswer`, applying the
stop-reason rules below. It never raises for a failed call: a permanent failure is an answer
with ``answer=None``, ``failed=True`` and the error recorded.

Stop reasons (Anthropic's names; other providers map theirs onto them):

- ``end_turn``, ``stop_sequence``, ``None``/unknown: the text is read with
  :func:`verifiers.answers.parse_api_answer`.
- ``max_tokens``, ``model_context_window_exceeded``: truncated; the text is still read as it
  stands (the stop reason in the record lets an analysis drop such rows).
- ``refusal``: no answer, ``error="refusal"``.
- ``tool_use``, ``pause_turn``: the turn is incomplete (we send no tools), so no answer.
- empty content (no text): no answer, ``error="empty content"``.

These are model replies, not failed calls: ``failed`` stays False and the cache keeps them.
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping

from verifiers.answers import parse_api_answer

log = logging.getLogger(__name__)

SYMBOL_SYSTEM_PROMPT = (
    "You are an arithmetic calculator. Evaluate the given expression and respond with ONLY the "
    "numerical answer. No explanation, no working, just the number."
)
SYMBOL_USER_TEMPLATE = "Evaluate: {expression}"
SYMBOL_MAX_TOKENS = 64
GSM8K_SYSTEM_PROMPT = (
    "Solve the math word problem. Think step by step, then give the final answer as a bare "
    "number on the last line."
)
GSM8K_MAX_TOKENS = 512
DEFAULT_CONCURRENCY = 30
DEFAULT_MODEL = "claude-haiku-4-5"

NO_ANSWER_STOPS = {"refusal": "refusal", "tool_use": "incomplete turn (tool_use)",
                   "pause_turn": "incomplete turn (pause_turn)"}


@dataclass(frozen=True)
class UpstreamRequest:
    """One question for the upstream. ``temperature=None`` sends none (the provider's default);
    ``sample_index`` tells repeated samples of one prompt apart (it is part of the cache key)."""

    prompt: str
    system: str = SYMBOL_SYSTEM_PROMPT
    max_tokens: int = SYMBOL_MAX_TOKENS
    temperature: float | None = None
    sample_index: int = 0

    @classmethod
    def symbol(cls, expression: str, **overrides) -> "UpstreamRequest":
        """The seed's calculator request for one expression."""
        return cls(prompt=SYMBOL_USER_TEMPLATE.format(expression=expression), **overrides)

    @classmethod
    def gsm8k(cls, question: str, **overrides) -> "UpstreamRequest":
        overrides.setdefault("system", GSM8K_SYSTEM_PROMPT)
        overrides.setdefault("max_tokens", GSM8K_MAX_TOKENS)
        return cls(prompt=question, **overrides)


@dataclass(frozen=True)
class Reply:
    """What one successful call returned, before any reading."""

    text: str | None
    stop_reason: str | None
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class UpstreamAnswer:
    """The upstream's answer to one request.

    text: the raw reply (None when the call failed); answer: the number read from it, or None;
    stop_reason: as in the module docstring; input/output_tokens: this answer's usage;
    latency_s: wall time of the call including retries; attempts: calls made;
    error: why there is no answer (None when the reply was read normally); failed: the call
    itself failed (no reply) -- a rerun retries it; cached: served from the answer cache.
    """

    text: str | None
    answer: Fraction | None
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    latency_s: float
    provider: str
    model: str
    error: str | None = None
    failed: bool = False
    attempts: int = 1
    cached: bool = False

    def to_json(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["answer"] = None if self.answer is None else str(self.answer)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "UpstreamAnswer":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["answer"] = None if data.get("answer") is None else Fraction(data["answer"])
        return cls(**fields)


class UpstreamError(Exception):
    """A failed call. ``retryable``: a later attempt may succeed (408/409/429/5xx/529, timeouts,
    connection errors, a garbled body); ``retry_after``: seconds the server asked us to wait."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


RETRYABLE_STATUS = frozenset({408, 409, 429})


def status_is_retryable(status: int, headers: Mapping[str, str] | None = None) -> bool:
    """The SDK's rule: ``x-should-retry`` wins; else 408, 409, 429 and every 5xx (529 too)."""
    hint = (headers or {}).get("x-should-retry")
    if hint in ("true", "false"):
        return hint == "true"
    return status in RETRYABLE_STATUS or status >= 500


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``retry-after`` (seconds or an HTTP date).

    >>> parse_retry_after({"retry-after": "2"}), parse_retry_after({"retry-after-ms": "150"})
    (2.0, 0.15)
    >>> parse_retry_after({"retry-after": "soon"}) is None
    True
    """
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    date = email.utils.parsedate_tz(headers.get("retry-after") or "")
    if date is None:
        return None
    return max(0.0, email.utils.mktime_tz(date) - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` calls at most; attempt n waits ``min(max_delay, base_delay * 2**(n-1))``
    scaled by a jitter factor in ``[1 - jitter, 1]``, or the server's ``retry-after`` (capped
    at ``max_retry_after``) when it sent one."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        backoff = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return backoff * (1.0 - self.jitter * random.random())


class Provider(abc.ABC):
    """One upstream. Subclasses set ``name``, ``model`` and ``endpoint`` (base URL, region, or
    the local folder) and implement :meth:`call`; ``endpoint`` is part of the cache key."""

    name: str
    model: str
    endpoint: str
    retry: RetryPolicy

    @abc.abstractmethod
    async def call(self, request: UpstreamRequest) -> Reply:
        """One attempt; raise :class:`UpstreamError` on failure."""

    async def aclose(self) -> None:
        """Release connections or models (the default has nothing to release)."""

    async def answer(self, request: UpstreamRequest) -> UpstreamAnswer:
        """Call with retries; never raises for a failed call (see the module docstring)."""
        start = time.monotonic()
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                reply = await self.call(request)
            except UpstreamError as error:
                if error.retryable and attempt < self.retry.max_attempts:
                    wait = self.retry.delay(attempt, error.retry_after)
                    log.info("%s: %s; retry %d in %.2fs", self.name, error, attempt, wait)
                    await asyncio.sleep(wait)
                    continue
                return self._failure(str(error), start, attempt)
            except Exception as error:  # a bug or an unforeseen error: record it, keep the run
                # The traceback once per provider (missing credentials would repeat it per item).
                log.error("%s: unexpected error: %r", self.name, error,
                          exc_info=not getattr(self, "_traceback_logged", False))
                self._traceback_logged = True
                return self._failure(f"{type(error).__name__}: {error}", start, attempt)
            return self._read(reply, start, attempt)
        raise AssertionError("unreachable: the last attempt returns")

    def _failure(self, error: str, start: float, attempts: int) -> UpstreamAnswer:
        return UpstreamAnswer(None, None, None, 0, 0, time.monotonic() - start, self.name,
                              self.model, error=error, failed=True, attempts=attempts)

    def _read(self, reply: Reply, start: float, attempts: int) -> UpstreamAnswer:
        error = NO_ANSWER_STOPS.get(reply.stop_reason or "")
        if error is None and not (reply.text or "").strip():
            error = "empty content"
        answer = None if error else parse_api_answer(reply.text)
        return UpstreamAnswer(reply.text, answer, reply.stop_reason, reply.input_tokens,
                              reply.output_tokens, time.monotonic() - start, self.name,
                              self.model, error=error, attempts=attempts)
