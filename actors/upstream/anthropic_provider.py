"""Claude through the ``anthropic`` SDK: directly (``AsyncAnthropic``) or on Vertex AI
(``AsyncAnthropicVertex``).

Retries: the SDK's own retry loop is switched off (``max_retries=0``) and
:meth:`actors.upstream.base.Provider.answer` retries instead. The SDK's loop does the right
things (408/409/429/5xx, ``retry-after``/``retry-after-ms``, exponential backoff with jitter,
timeouts), but its delays are module constants (0.5 s doubling to 8 s) that a test cannot
shorten without patching private code, it does not retry a 200 whose body is not JSON (a
``JSONDecodeError`` escapes it), and it would retry invisibly to our tally. One loop for
every provider, with the SDK's status rules (:func:`~actors.upstream.base.status_is_retryable`),
keeps the behaviour the same for Anthropic, Vertex and OpenAI-compatible servers.
The SDK's ``timeout`` is used per attempt; a timeout is retried.
"""

from __future__ import annotations

import json
import os
from typing import Any

from actors.upstream.base import (
    DEFAULT_MODEL,
    Provider,
    Reply,
    RetryPolicy,
    UpstreamError,
    UpstreamRequest,
    parse_retry_after,
    status_is_retryable,
)

DEFAULT_TIMEOUT_S = 60.0


def _messages_kwargs(model: str, request: UpstreamRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "messages": [{"role": "user", "content": request.prompt}],
    }
    if request.system:
        kwargs["system"] = request.system
    if request.temperature is not None:
        # The body field the Messages API reads; anthropic 2.x's create() has no argument for it
        # (a keyword would be a TypeError on every request), so it goes in as body JSON.
        kwargs["extra_body"] = {"temperature": request.temperature}
    return kwargs


def _reply_from_message(message: Any) -> Reply:
    """Join the text blocks; a reply with none has ``text=None`` (read as empty content)."""
    texts = [block.text for block in message.content if getattr(block, "type", None) == "text"]
    usage = message.usage
    return Reply(
        text="".join(texts) if texts else None,
        stop_reason=message.stop_reason,
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
    )


def _classify(error: Exception) -> UpstreamError | None:
    """The SDK's exceptions as :class:`UpstreamError`; None for anything else."""
    import anthropic

    if isinstance(error, anthropic.APITimeoutError):
        return UpstreamError("timeout", retryable=True)
    if isinstance(error, anthropic.APIConnectionError):
        return UpstreamError(f"connection error: {error}", retryable=True)
    if isinstance(error, anthropic.APIStatusError):
        headers = error.response.headers
        return UpstreamError(
            f"HTTP {error.status_code}: {str(error)[:300]}",
            retryable=status_is_retryable(error.status_code, headers),
            retry_after=parse_retry_after(headers),
        )
    if isinstance(error, (anthropic.APIResponseValidationError, json.JSONDecodeError)):
        # A 200 with a garbled body: most likely a proxy's fault, so worth another try.
        return UpstreamError(f"malformed response: {str(error)[:200]}", retryable=True)
    return None


class AnthropicProvider(Provider):
    """The Messages API. ``api_key`` defaults to ``$ANTHROPIC_API_KEY`` (or
    ``$ANTHROPIC_AUTH_TOKEN``); ``base_url`` to the SDK's default (or ``$ANTHROPIC_BASE_URL``);
    ``timeout`` is per attempt, in seconds."""

    name = "anthropic"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        import anthropic

        if api_key is None and not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            raise ValueError("no Anthropic API key: pass api_key or set ANTHROPIC_API_KEY")
        self.model = model
        self.retry = retry or RetryPolicy()
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0
        )
        self.endpoint = str(self.client.base_url)

    async def call(self, request: UpstreamRequest) -> Reply:
        try:
            message = await self.client.messages.create(**_messages_kwargs(self.model, request))
        except Exception as error:
            classified = _classify(error)
            if classified is None:
                raise
            raise classified from error
        return _reply_from_message(message)

    async def aclose(self) -> None:
        await self.client.close()


class VertexProvider(AnthropicProvider):
    """Claude on Vertex AI. ``project``/``region`` default to ``$GOOGLE_CLOUD_PROJECT`` /
    ``$GOOGLE_CLOUD_REGION`` (then the SDK's ``$ANTHROPIC_VERTEX_PROJECT_ID`` /
    ``$CLOUD_ML_REGION``). ``access_token`` skips Google's credential lookup (tests pass a fixed
    one); without it the SDK uses Application Default Credentials. The cache key's endpoint is
    the region (the same model in any project answers alike)."""

    name = "vertex"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        project: str | None = None,
        region: str | None = None,
        access_token: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        from anthropic import AsyncAnthropicVertex

        project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("ANTHROPIC_VERTEX_PROJECT_ID")
        region = region or os.environ.get("GOOGLE_CLOUD_REGION") or os.environ.get("CLOUD_ML_REGION")
        if not project or not region:
            raise ValueError(
                "Vertex AI needs a project and a region: pass them (--vertex-project, "
                "--vertex-region) or set GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_REGION"
            )
        self.model = model
        self.retry = retry or RetryPolicy()
        self.client = AsyncAnthropicVertex(
            project_id=project, region=region, access_token=access_token, base_url=base_url,
            timeout=timeout, max_retries=0,
        )
        self.endpoint = f"vertex:{region}"
