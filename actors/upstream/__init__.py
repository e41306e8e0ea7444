"""The upstream: the model behind an API whose answers the adapter checks.

Providers (one async interface, ``await provider.answer(request) -> UpstreamAnswer``):

- ``anthropic``: Claude through the ``anthropic`` SDK (:mod:`.anthropic_provider`);
- ``vertex``: Claude on Vertex AI through the same SDK;
- ``openai``: any OpenAI-compatible chat endpoint, e.g. a vLLM server (:mod:`.openai_compat`);
- ``local``: a local Hugging Face model in-process, by default the embedded
  SmolLM2-135M-Instruct (:mod:`.local`), so a run needs no credentials.

:class:`UpstreamClient` puts a provider behind the persistent :class:`AnswerCache`, bounds
concurrency, shares identical in-flight requests and tallies tokens and cost. Importing this
package imports no SDK, httpx or torch; :func:`make_provider` imports the one it builds.

>>> client = UpstreamClient(make_provider("anthropic", api_key="..."), AnswerCache("run/cache.sqlite"))  # doctest: +SKIP
>>> answer = await client.answer(UpstreamRequest.symbol("12 θ 7 γ 3"))  # doctest: +SKIP
"""

from __future__ import annotations

from actors.upstream.base import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MODEL,
    SYMBOL_SYSTEM_PROMPT,
    Provider,
    Reply,
    RetryPolicy,
    UpstreamAnswer,
    UpstreamError,
    UpstreamRequest,
)
from actors.upstream.cache import AnswerCache, cache_key
from actors.upstream.client import FREE, Pricing, Tally, UpstreamBudgetExceeded, UpstreamClient

PROVIDERS = ("local", "anthropic", "vertex", "openai")


def make_provider(kind: str, **kwargs) -> Provider:
    """Build the provider named ``kind`` (one of :data:`PROVIDERS`) with its keyword arguments."""
    if kind == "anthropic":
        from actors.upstream.anthropic_provider import AnthropicProvider

        return AnthropicProvider(**kwargs)
    if kind == "vertex":
        from actors.upstream.anthropic_provider import VertexProvider

        return VertexProvider(**kwargs)
    if kind == "openai":
        from actors.upstream.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(**kwargs)
    if kind == "local":
        from actors.upstream.local import LocalProvider

        return LocalProvider(**kwargs)
    raise ValueError(f"unknown upstream provider {kind!r}; choose one of {', '.join(PROVIDERS)}")


def build_provider(kind: str, model: str | None = None, *, base_url: str | None = None,
                   project: str | None = None, region: str | None = None,
                   access_token: str | None = None, timeout: float = 60.0,
                   retry: RetryPolicy | None = None, **local_options) -> Provider:
    """A provider from flat settings (a CLI's or the config's), each kind taking what it uses.

    ``model=None`` means the kind's default (the embedded model for ``local``, Claude Haiku for
    ``anthropic``/``vertex``); ``openai`` needs a model name. ``local_options`` (batch_size,
    device, threads) go to the local provider only.
    """
    if kind == "local":
        return make_provider("local", model=model or "embedded", retry=retry, **local_options)
    common = dict(timeout=timeout, retry=retry)
    if kind == "openai":
        if not model:
            raise ValueError("the openai provider needs --model (upstream.model): the name the server serves")
        return make_provider("openai", model=model, base_url=base_url or "http://127.0.0.1:8000", **common)
    if kind == "anthropic":
        return make_provider("anthropic", model=model or DEFAULT_MODEL, base_url=base_url, **common)
    if kind == "vertex":
        return make_provider("vertex", model=model or DEFAULT_MODEL, project=project, region=region,
                             access_token=access_token, base_url=base_url, **common)
    raise ValueError(f"unknown upstream provider {kind!r}; choose one of {', '.join(PROVIDERS)}")


__all__ = [
    "AnswerCache", "DEFAULT_CONCURRENCY", "DEFAULT_MODEL", "FREE", "PROVIDERS", "Pricing",
    "Provider", "Reply", "RetryPolicy", "SYMBOL_SYSTEM_PROMPT", "Tally", "UpstreamAnswer",
    "UpstreamBudgetExceeded", "UpstreamClient", "UpstreamError", "UpstreamRequest", "build_provider", "cache_key", "make_provider",
]
