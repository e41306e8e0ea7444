"""The chain's HTTP service (``api-adapter chain --serve``): a stdlib ``ThreadingHTTPServer``
over one :class:`actors.chain.Chain`, JSON in and out.

- ``GET /health`` -> 200 ``{"status": "ok", "model", "adapter", "upstream", "queue": {...}}``;
- ``POST /v1/chain`` with ``{"expression": "3 θ 4"}`` -> ``{"answer": {...}}``, or with
  ``{"expressions": [...]}`` -> ``{"answers": [...]}`` (at most ``max_items``);
- errors are JSON ``{"error": message, "status": code}``: 400 malformed JSON, a missing,
  empty, unknown or mistyped field, too many items, an expression the symbol tokenizer
  rejects (the message names the item and the position), one over 300 characters or with an
  operand over 30 digits, one that divides by zero (it has no value to check); 401 without the
  bearer token when the service has one (with ``WWW-Authenticate``); 404 unknown path; 405
  wrong method (with ``Allow``); 411 no Content-Length; 413 body over ``max_body_bytes``; 415 a
  Content-Type other than ``application/json`` (none is taken as JSON); 503 when
  ``queue_size`` requests are already admitted (with ``Retry-After``); 500 for an internal
  error (logged here; the client gets a message, never a traceback). The server keeps serving.

It binds to 127.0.0.1 unless told otherwise. With a token (``auth_token``; the CLI reads
``$API_ADAPTER_CHAIN_TOKEN``) every request must carry ``Authorization: Bearer <token>``,
compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("api_adapter.chain")


class ChainServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` over one chain; ``queue_size`` requests are admitted at
    once (the engine generates one batch at a time, so admitted requests wait their turn)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: with the stdlib's 5, a burst of clients is refused
    #                           by the kernel (connection reset) before a 503 can be sent

    def __init__(self, address, chain, *, queue_size: int = 8, max_items: int = 64,
                 max_body_bytes: int = 1 << 20, retry_after_s: int = 1, auth_token: str | None = None) -> None:
        if queue_size < 1 or max_items < 1 or max_body_bytes < 1:
            raise ValueError("queue_size, max_items and max_body_bytes must be >= 1")
        self.chain, self.queue_size, self.max_items = chain, queue_size, max_items
        self.max_body_bytes, self.retry_after_s = max_body_bytes, retry_after_s
        self.authorization = None if auth_token is None else f"Bearer {auth_token}".encode()
        self._slots = threading.BoundedSemaphore(queue_size)
        self._count_lock = threading.Lock()
        self.counts = {"in_flight": 0, "served": 0, "rejected": 0, "errors": 0}
        super().__init__(address, ChainHandler)

    def admit(self) -> bool:
        if not self._slots.acquire(blocking=False):
            self.count("rejected")
            return False
        self.count("in_flight")
        return True

    def release(self) -> None:
        self.count("in_flight", -1)
        self._slots.release()

    def count(self, key: str, by: int = 1) -> None:
        with self._count_lock:
            self.counts[key] += by

    def health(self) -> dict:
        with self._count_lock:
            queue = {"size": self.queue_size, **self.counts}
        return {"status": "ok", **self.chain.describe(), "queue": queue}


class RequestError(Exception):
    """A request we refuse: the status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


ROUTES = {"/health": "GET", "/v1/chain": "POST"}
BODY_FIELDS = ("expression", "expressions")


def parse_body(raw: bytes, max_items: int) -> tuple[list[str], bool]:
    """``(expressions, single)`` from a request body, or :class:`RequestError` (400)."""
    from actors.chain import ChainInputError, check_expression

    if not raw.strip():
        raise RequestError(400, "body is empty; send a JSON object with 'expression' or 'expressions'")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RequestError(400, f"body is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"body must be a JSON object with 'expression' or 'expressions', "
                                f"got {type(body).__name__}")
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; expected 'expression' or 'expressions'")
    if len(body) != 1:
        raise RequestError(400, "give exactly one of 'expression' (a string) or 'expressions' (a list)")
    single = "expression" in body
    items = [body["expression"]] if single else body["expressions"]
    if not isinstance(items, list):
        raise RequestError(400, f"'expressions' must be a list of strings, got {type(items).__name__}")
    if not items:
        raise RequestError(400, "'expressions' is empty")
    if len(items) > max_items:
        raise RequestError(400, f"too many items: {len(items)} expressions, at most {max_items} per request")
    try:
        return [check_expression(e, "expression" if single else f"expressions[{i}]")
                for i, e in enumerate(items)], single
    except ChainInputError as error:
        raise RequestError(400, str(error)) from None


class ChainHandler(BaseHTTPRequestHandler):
    server: ChainServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops sending mid-body frees its thread after this

    def _any_method(self) -> None:
        self._dispatch(self.command)

    # Every common method is routed, so a wrong one gets 405 (the base class answers 501).
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any_method

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            self._check_token()
            path = self.path.split("?", 1)[0]
            if path not in ROUTES:
                raise RequestError(404, f"no such path {path!r}; try GET /health or POST /v1/chain")
            if method != ROUTES[path]:
                raise RequestError(405, f"{method} is not allowed on {path}; use {ROUTES[path]}",
                                   {"Allow": ROUTES[path]})
            if path == "/health":
                self._reply(200, self.server.health())
            else:
                self._chain()
        except RequestError as error:
            if not self._body_read:  # an unread body must not be parsed as the next request
                self.close_connection = True
            self._reply(error.status, {"error": error.message, "status": error.status}, error.headers)
        except Exception as error:  # noqa: BLE001 - the client gets a message, the log the traceback
            log.exception("internal error on %s %s", method, self.path)
            self.server.count("errors")
            self._reply(500, {"error": f"internal error: {type(error).__name__}: {error}", "status": 500})

    def _check_token(self) -> None:
        expected = self.server.authorization
        if expected is not None:
            given = self.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                   {"WWW-Authenticate": 'Bearer realm="api-adapter chain"'})

    def _chain(self) -> None:
        media = self.headers.get("Content-Type", "application/json").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise RequestError(415, f"Content-Type {media!r} is not accepted; send application/json")
        raw = self._read_body()
        expressions, single = parse_body(raw, self.server.max_items)
        if not self.server.admit():
            raise RequestError(503, f"busy: {self.server.queue_size} requests already queued; retry later",
                               {"Retry-After": str(self.server.retry_after_s)})
        try:
            answers = [a.to_json() for a in self.server.chain.answer_batch(expressions)]
        finally:
            self.server.release()
        self.server.count("served")
        self._reply(200, {"answer": answers[0]} if single else {"answers": answers})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a POST needs a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if size < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if size > self.server.max_body_bytes:
            raise RequestError(413, f"body is {size} bytes; at most {self.server.max_body_bytes}")
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            raise RequestError(408, f"timed out waiting for the {size}-byte body") from None
        self._body_read = True
        return raw

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (bad request line, 414, 431, 501) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._reply(code, {"error": text + (f": {explain}" if explain else ""), "status": code})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)


def make_server(chain, host: str = "127.0.0.1", port: int = 8080, **limits) -> ChainServer:
    """The service bound to ``(host, port)`` (port 0: a free one; see ``server.server_address``)."""
    return ChainServer((host, port), chain, **limits)
