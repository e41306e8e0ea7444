"""Tool-calling conversations with Claude (Anthropic's API or Vertex AI), every turn cached.

:func:`converse` runs the loop: send the system prompt, the messages so far and the tool
schemas with ``messages.create(tools=...)``; while the reply stops with ``tool_use``, run each
``tool_use`` block with the caller's ``execute(name, input) -> ToolResult`` (off the event
loop: tools block) and answer with one user turn of ``tool_result`` blocks (``is_error``
where the tool failed); stop at ``end_turn`` (or any other stop reason), or after
``max_rounds`` model calls.

Caching and retries: each turn is one :class:`UpstreamRequest` sent through an ordinary
:class:`UpstreamClient`, so it gets the :class:`AnswerCache`, the shared retry loop, in-flight
sharing, the concurrency bound and the tally. The request's ``prompt`` is the canonical JSON
of the conversation so far (messages including tool results, and the tools), and ``system``,
``max_tokens`` and ``temperature`` are its own fields, so the cache key is the provider
identity plus the full request. The reply is stored as the JSON of its content blocks in the
answer's ``text``. A rerun with the same tool results therefore replays the whole
conversation from the cache with no HTTP request. (A tool call that timed out in one run and
finishes in the next changes the next request, so that turn is asked again.)

With ``tools=[]`` a conversation is one plain turn (no ``tools`` key is sent).
OpenAI-style function calling is not implemented: nothing here needs it yet.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from actors.upstream.base import Provider, Reply, UpstreamRequest
from actors.upstream.client import UpstreamClient
from verifiers.sympy_tools import ToolResult

PROTOCOL = "anthropic-messages-tools/1"
DEFAULT_MAX_ROUNDS = 8


class ToolTurnProvider(Provider):
    """One turn of a tool conversation as one :meth:`Provider.call`, on an Anthropic or Vertex
    provider's SDK client (its SDK retries are off; :meth:`Provider.answer` retries). With no
    tools it is a plain Messages turn, which the synthesis generator uses: unlike
    :class:`~actors.upstream.anthropic_provider.AnthropicProvider` it sends ``temperature``
    through ``extra_body``, which the installed SDK (2.12, no ``temperature`` argument) needs."""

    def __init__(self, provider: Provider) -> None:
        if not hasattr(provider, "client") or provider.name not in ("anthropic", "vertex"):
            raise ValueError(f"tool calling needs an anthropic or vertex provider, not {provider.name!r}")
        self.inner = provider
        self.name, self.model, self.endpoint, self.retry = (
            provider.name, provider.model, provider.endpoint, provider.retry)

    async def call(self, request: UpstreamRequest) -> Reply:
        from actors.upstream.anthropic_provider import _classify

        payload = json.loads(request.prompt)
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                  "messages": payload["messages"]}
        if payload["tools"]:
            kwargs["tools"] = payload["tools"]
        if request.system:
            kwargs["system"] = request.system
        if request.temperature is not None:
            # extra_body: the installed SDK (2.12) has no `temperature` parameter, the API does.
            kwargs["extra_body"] = {"temperature": request.temperature}
        try:
            message = await self.inner.client.messages.create(**kwargs)
        except Exception as error:
            classified = _classify(error)
            if classified is None:
                raise
            raise classified from error
        usage = message.usage
        return Reply(
            text=json.dumps({"content": [_block(b) for b in message.content]}, ensure_ascii=False),
            stop_reason=message.stop_reason,
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _block(block: Any) -> dict:
    """A content block as the API takes it back: only the fields it needs for text and tool_use."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return block.model_dump(exclude_none=True)


@dataclass(frozen=True)
class ToolCall:
    """One tool call: the model's ``tool_use`` block and what the tool answered."""

    id: str
    name: str
    input: dict
    result: str
    is_error: bool


@dataclass
class Conversation:
    """A finished conversation. ``text``: the final turn's text (None when there is none);
    ``stop_reason``: the final turn's; ``error``: why it has no final answer (a failed call,
    too many rounds), else None; ``turns``: one record per model call (cache key, whether it
    came from the cache, tokens); ``tool_calls`` in order."""

    text: str | None
    stop_reason: str | None
    provider: str
    model: str
    error: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def turn_request(system: str, messages: list[dict], tools: list[dict], max_tokens: int,
                 temperature: float | None, sample_index: int = 0) -> UpstreamRequest:
    """The cacheable request for the next turn (see the module docstring); ``sample_index``
    tells repeated conversations with one prompt apart in the cache, and is not sent."""
    prompt = json.dumps({"protocol": PROTOCOL, "tools": tools, "messages": messages},
                        sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return UpstreamRequest(prompt=prompt, system=system, max_tokens=max_tokens, temperature=temperature,
                           sample_index=sample_index)


async def converse(
    client: UpstreamClient,
    *,
    system: str,
    prompt: str,
    tools: list[dict],
    execute: Callable[[str, dict], ToolResult],
    max_tokens: int = 1024,
    temperature: float | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    sample_index: int = 0,
) -> Conversation:
    """Run one tool conversation; never raises for a failed call (see :class:`Conversation`).

    ``client`` must wrap a :class:`ToolTurnProvider`.
    """
    if not isinstance(client.provider, ToolTurnProvider):
        raise TypeError("converse needs an UpstreamClient around a ToolTurnProvider")
    messages: list[dict] = [{"role": "user", "content": prompt}]
    result = Conversation(None, None, client.name, client.model)
    for _ in range(max_rounds):
        request = turn_request(system, messages, tools, max_tokens, temperature, sample_index)
        answer = await client.answer(request)
        result.turns.append({"key": client.key(request), "cached": answer.cached,
                             "input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens,
                             "stop_reason": answer.stop_reason})
        if answer.failed:
            result.error = f"call failed: {answer.error}"
            return result
        content = json.loads(answer.text)["content"]
        result.stop_reason = answer.stop_reason
        messages.append({"role": "assistant", "content": content})
        uses = [block for block in content if block.get("type") == "tool_use"]
        if answer.stop_reason != "tool_use" or not uses:
            texts = [block["text"] for block in content if block.get("type") == "text"]
            result.text = "".join(texts) if texts else None
            return result
        replies = []
        for use in uses:
            outcome = await asyncio.to_thread(execute, use["name"], use.get("input") or {})
            result.tool_calls.append(ToolCall(use["id"], use["name"], use.get("input") or {},
                                              outcome.content, outcome.is_error))
            reply = {"type": "tool_result", "tool_use_id": use["id"], "content": outcome.content}
            if outcome.is_error:
                reply["is_error"] = True
            replies.append(reply)
        messages.append({"role": "user", "content": replies})
    result.error = f"no final answer after {max_rounds} model calls"
    return result
