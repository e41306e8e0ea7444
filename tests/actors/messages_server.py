"""A local HTTP server that speaks enough of three APIs for the upstream tests:

- Anthropic's Messages API: ``POST /v1/messages`` (needs the key, as ``x-api-key`` or a bearer token);
- Claude on Vertex AI: ``POST /v1/projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict``
  (needs ``Authorization: Bearer ...``; ``anthropic_version`` in the body);
- OpenAI chat completions: ``POST /v1/chat/completions``.

What it does is scripted per prompt (the first user message's text: for a one-message
request, its only message): ``server.script[prompt]`` is a list of :class:`Action`, one per
request in order (the last repeats); a prompt without a script gets :func:`ok` with
:func:`default_answer`.

Tool conversations (Messages API only): :func:`tool_use` replies with ``tool_use`` blocks
(stop reason ``tool_use``); :func:`respond` builds the reply from the ``tool_result`` blocks
of the request's last user turn, so a scripted model can answer with what the tools said.
Each turn of a conversation is one request, so ``[tool_use(...), respond(...)]`` scripts a
two-turn conversation. It counts ``requests[prompt]`` (every
request) and ``responses[prompt]`` (answers actually sent with status 200 and a valid body).
``delay`` slows every response; ``hold_after = K`` answers K requests in all and then holds
every later one unanswered until :meth:`MessagesServer.release` (which drops them).

Used as a context manager: ``with MessagesServer() as server: server.url ...``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from verifiers.symbols import evaluate

VERTEX_PATH = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)"
    r"/publishers/anthropic/models/(?P<model>[^/:]+):rawPredict$"
)
OPENAI_FINISH = {"end_turn": "stop", "max_tokens": "length", "refusal": "content_filter"}


@dataclass(frozen=True)
class Action:
    status: int = 200
    text: str | None = None
    stop_reason: str = "end_turn"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    malformed: bool = False
    tool_calls: tuple = ()          # ((name, input), ...): reply with tool_use blocks
    respond: Callable | None = None  # (tool results) -> Action: reply built from them


def ok(text: str | None = None, stop_reason: str = "end_turn", delay: float = 0.0) -> Action:
    """An answer (``text=None``: the default answer)."""
    return Action(text=text, stop_reason=stop_reason, delay=delay)


def error(status: int, **headers: str) -> Action:
    return Action(status=status, headers={k.replace("_", "-"): v for k, v in headers.items()})


MALFORMED = Action(malformed=True)


def tool_use(*calls: tuple[str, dict], text: str | None = "") -> Action:
    """A turn that calls tools: ``tool_use(("solve", {"equations": [...], ...}), ...)``."""
    return Action(text=text, stop_reason="tool_use", tool_calls=tuple(calls))


def respond(build: Callable[[list[dict]], Action]) -> Action:
    """A turn computed from the tool results received: ``build(results)`` gets the last user
    turn's ``tool_result`` blocks as ``{"tool_use_id", "content", "is_error"}`` dicts."""
    return Action(respond=build)


def request_prompt(body: dict) -> str:
    """The script key of a request: the first user message's text."""
    first = next(m for m in body["messages"] if m["role"] == "user")
    content = first["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def tool_results(body: dict) -> list[dict]:
    """The ``tool_result`` blocks of the request's last message (empty when there are none)."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return []
    return [{"tool_use_id": b["tool_use_id"], "content": _result_text(b.get("content")),
             "is_error": bool(b.get("is_error"))} for b in content if b.get("type") == "tool_result"]


def _result_text(content) -> str:
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content)
    return content or ""


def default_answer(prompt: str) -> str:
    """The true value of ``Evaluate: <expression>``; ``42`` for anything else."""
    if prompt.startswith("Evaluate: "):
        return str(evaluate(prompt.removeprefix("Evaluate: ")))
    return "42"


class MessagesServer:
    def __init__(self, api_key: str = "test-key", access_token: str = "test-token"):
        self.api_key, self.access_token = api_key, access_token
        self.script: dict[str, list[Action]] = {}
        self.requests: Counter = Counter()
        self.responses: Counter = Counter()
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self.delay = 0.0
        self.hold_after: int | None = None
        self._answered = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MessagesServer":
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def release(self) -> None:
        """Stop holding: held requests are dropped unanswered, later ones are answered."""
        with self._lock:
            self.hold_after = None
        self._release.set()

    def _next_action(self, prompt: str) -> Action | None:
        """Count the request and pick its action; None: hold it."""
        with self._lock:
            attempt = self.requests[prompt]
            self.requests[prompt] += 1
            if self.hold_after is not None and self._answered >= self.hold_after:
                return None
            script = self.script.get(prompt) or [ok()]
            action = script[min(attempt, len(script) - 1)]
            if action.status == 200 and not action.malformed:
                self._answered += 1
                self.responses[prompt] += 1
            return action


def _anthropic_body(prompt: str, action: Action, model: str, turn: int = 0) -> dict:
    text = default_answer(prompt) if action.text is None else action.text
    content = [{"type": "text", "text": text}] if text else []
    content += [{"type": "tool_use", "id": f"toolu_{turn}_{i}", "name": name, "input": arguments}
                for i, (name, arguments) in enumerate(action.tool_calls)]
    return {
        "id": "msg_test", "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": action.stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": len(prompt), "output_tokens": len(text)},
    }


def _openai_body(prompt: str, action: Action, model: str) -> dict:
    text = default_answer(prompt) if action.text is None else action.text
    finish = OPENAI_FINISH.get(action.stop_reason, action.stop_reason)
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text)},
    }


def _handler(server: MessagesServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (a timeout test, a killed run)
                pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            vertex = VERTEX_PATH.match(self.path)
            if self.path == "/v1/chat/completions":
                kind, model = "openai", body.get("model", "")
            elif self.path == "/v1/messages":
                kind, model = "anthropic", body.get("model", "")
                # The SDK sends the key as x-api-key or (newer versions) a bearer token.
                keys = {self.headers.get("x-api-key"), self.headers.get("authorization", "").removeprefix("Bearer ")}
                if server.api_key not in keys:
                    return self._send(401, b'{"type":"error","error":{"type":"authentication_error","message":"bad key"}}')
            elif vertex:
                kind, model = "vertex", vertex.group("model")
                if self.headers.get("authorization") != f"Bearer {server.access_token}" or "anthropic_version" not in body:
                    return self._send(401, b'{"error":{"code":401,"message":"unauthenticated"}}')
            else:
                return self._send(404, b'{"error":"not found"}')
            with server._lock:
                server.paths.append(self.path)
                server.bodies.append(body)
            prompt = request_prompt(body)
            time.sleep(server.delay)
            action = server._next_action(prompt)
            if action is None:
                server._release.wait()
                return  # dropped: the connection closes without an answer
            if action.respond is not None:
                action = action.respond(tool_results(body))
            time.sleep(action.delay)
            if action.malformed:
                return self._send(200, b'{"id": "msg_test", "content": [tru')
            if action.status != 200:
                message = json.dumps({"type": "error", "error": {"type": "api_error", "message": f"status {action.status}"}})
                return self._send(action.status, message.encode(), action.headers)
            if kind == "openai":
                reply = _openai_body(prompt, action, model)
            else:
                reply = _anthropic_body(prompt, action, model, turn=len(body["messages"]) // 2)
            self._send(200, json.dumps(reply).encode(), action.headers)

    return Handler
