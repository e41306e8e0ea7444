"""Any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, OpenAI itself) over plain
HTTP: ``POST {base_url}/v1/chat/completions`` with httpx.

``finish_reason`` is mapped onto the Anthropic stop reasons the rest of the code handles
(:data:`FINISH_TO_STOP`); a ``message.refusal`` string counts as a refusal. Retries are the
shared loop's (:class:`actors.upstream.base.Provider`), with the same status rules.
"""

from __future__ import annotations

import json
import os
from typing import Any

from actors.upstream.base import (
    Provider,
    Reply,
    RetryPolicy,
    UpstreamError,
    UpstreamRequest,
    parse_retry_after,
    status_is_retryable,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}


def chat_url(base_url: str) -> str:
    """``http://h:8000`` and ``http://h:8000/v1`` both give ``http://h:8000/v1/chat/completions``.

    >>> chat_url("http://h:8000/v1/")
    'http://h:8000/v1/chat/completions'
    """
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def _reply_from_body(body: Any) -> Reply:
    try:
        choice = body["choices"][0]
        message = choice.get("message") or {}
        usage = body.get("usage") or {}
        text = message.get("content")
        finish = choice.get("finish_reason")
        stop = "refusal" if message.get("refusal") else FINISH_TO_STOP.get(finish, finish)
        return Reply(
            text=text if isinstance(text, str) else None,
            stop_reason=stop,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise UpstreamError(f"malformed response: {type(error).__name__}: {error}", retryable=True) from error


class OpenAICompatProvider(Provider):
    """A chat-completions endpoint. ``api_key`` (default ``$OPENAI_API_KEY``, may be absent for
    a local vLLM) is sent as a bearer token; ``timeout`` is per attempt, in seconds."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        import httpx

        self.model = model
        self.retry = retry or RetryPolicy()
        self.endpoint = chat_url(base_url)
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(timeout=timeout, headers=headers)

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        messages = [{"role": "user", "content": request.prompt}]
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": request.max_tokens}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    async def call(self, request: UpstreamRequest) -> Reply:
        import httpx

        try:
            response = await self.http.post(self.endpoint, json=self._body(request))
        except httpx.TimeoutException as error:
            raise UpstreamError("timeout", retryable=True) from error
        except httpx.TransportError as error:
            raise UpstreamError(f"connection error: {error!r}", retryable=True) from error
        if response.status_code >= 400:
            headers = response.headers
            raise UpstreamError(
                f"HTTP {response.status_code}: {response.text[:300]}",
                retryable=status_is_retryable(response.status_code, headers),
                retry_after=parse_retry_after(headers),
            )
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UpstreamError(f"malformed response: {error}", retryable=True) from error
        return _reply_from_body(body)

    async def aclose(self) -> None:
        await self.http.aclose()
