"""A real S3-protocol server for the tests: moto's server (moto[s3], the dev extra) on a port
of its own, in a child process, with a recorder in front of it that logs every object's key in
the order written and can stall a PUT (to kill a writer mid-upload).

    with S3Server() as s3:          # the AWS_* variables pointing at it are set while it runs
        s3.make_bucket("runs")
        ... "s3://runs/a" ...
        s3.puts()                   # the keys written so far, in order

A child process, not a thread: moto brings Flask, and vLLM (0.32) scans every imported module's
attributes when it builds an engine, which trips on Flask's context-local proxies ("Working
outside of application context"). The test process itself never imports moto or Flask.
The recorder is driven over HTTP, under ``/__recorder__/`` (a name no bucket can take).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from urllib.parse import parse_qs, unquote

CONTROL = "/__recorder__/"


class _Recorder:
    """WSGI middleware: records the key of every object written, in order; the ``nth`` PUT (an
    object, or a part of one) whose key contains ``stall_on`` waits for a release, then fails
    with 503 without reaching the store (its writer is gone by then)."""

    def __init__(self, app):
        self.app = app
        self.puts: list[str] = []
        self.stall_on, self.nth, self.seen = None, 0, 0
        self.stalled, self.release = threading.Event(), threading.Event()

    def __call__(self, environ, start_response):
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        if environ["PATH_INFO"].startswith(CONTROL):
            return self.control(environ["PATH_INFO"][len(CONTROL):], parse_qs(query), start_response)
        key = unquote(environ["PATH_INFO"]).lstrip("/")
        if method == "PUT" and self.stall_on is not None and self.stall_on in key:
            self.seen += 1
            if self.seen == self.nth:
                self.stalled.set()
                self.release.wait(120)
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
        # an object appears with a plain PUT or a multipart upload's completing POST
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query):
            self.puts.append(key)
        return self.app(environ, start_response)

    def control(self, command: str, args: dict, start_response):
        if command == "puts":
            answer = self.puts
        elif command == "clear":
            self.puts.clear()
            answer = True
        elif command == "stall":
            self.stall_on, self.nth, self.seen = args["on"][0], int(args["nth"][0]), 0
            self.stalled.clear()
            self.release.clear()
            answer = True
        elif command == "wait_stalled":
            answer = self.stalled.wait(float(args["timeout"][0]))
        elif command == "release":
            self.stall_on = None
            self.release.set()
            answer = True
        else:
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        body = json.dumps(answer).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


class S3Server:
    """moto's S3 on ``host`` (0.0.0.0 reaches it from the multi-host harness's namespaces too)."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def env(self, address: str = "127.0.0.1") -> dict[str, str]:
        """The variables a client at ``address``'s side needs (credentials, endpoint)."""
        return {**self.ENV, "AWS_ENDPOINT_URL": f"http://{address}:{self.port}"}

    def make_bucket(self, name: str) -> None:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key="testing",
                          secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir(name)

    def _control(self, command: str, **args):
        query = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in args.items())
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{CONTROL}{command}?{query}",
                                    timeout=10 + float(args.get("timeout", 0))) as reply:
            return json.loads(reply.read())

    def puts(self) -> list[str]:
        """The keys of the objects written so far, in order."""
        return self._control("puts")

    def clear_puts(self) -> None:
        self._control("clear")

    def stall(self, on: str, nth: int) -> None:
        """Hold the ``nth`` PUT whose key contains ``on`` until ``release``; then it fails."""
        self._control("stall", on=on, nth=nth)

    def wait_stalled(self, timeout: float) -> bool:
        return self._control("wait_stalled", timeout=timeout)

    def release(self) -> None:
        self._control("release")

    def __enter__(self) -> S3Server:
        self._process = subprocess.Popen([sys.executable, __file__, self.host], stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self._process.kill()
            raise RuntimeError(f"the S3 server did not start (it printed {line!r})")
        self.port = int(line)
        for key, value in self.env().items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _serve(host: str) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = make_server(host, 0, _Recorder(DomainDispatcherApplication(create_backend_app)), threaded=True,
                         request_handler=MotoRequestHandler)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    _serve(sys.argv[1])
