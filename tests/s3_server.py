"""A real S3-protocol server for the tests: moto's server (moto[s3], the dev extra) on a port
of its own, in a thread of the test process, with a recorder in front of it that logs every
object's key in the order written and can stall the PUTs a predicate picks (to kill a writer mid-upload).

    with S3Server() as s3:          # the AWS_* variables pointing at it are set while it runs
        s3.make_bucket("runs")
        ... "s3://runs/a" ...
"""

from __future__ import annotations

import os
import threading
from typing import Callable
from urllib.parse import unquote

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


class _Recorder:
    """WSGI middleware: records the key of every object written, in order (``puts``); a PUT
    (an object, or a part of one) that ``stall(key)`` picks waits for ``release``, then fails
    with 503 without reaching the store (its writer is gone by then)."""

    def __init__(self, app):
        self.app = app
        self.puts: list[str] = []
        self.stall: Callable[[str], bool] | None = None
        self.stalled, self.release = threading.Event(), threading.Event()

    def __call__(self, environ, start_response):
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        key = unquote(environ["PATH_INFO"]).lstrip("/")
        if method == "PUT" and self.stall is not None and self.stall(key):
            self.stalled.set()
            self.release.wait(120)
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]
        # an object appears with a plain PUT or a multipart upload's completing POST
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query):
            self.puts.append(key)
        return self.app(environ, start_response)


class S3Server:
    """moto's S3 on ``host`` (0.0.0.0 reaches it from the multi-host harness's namespaces too)."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self, host: str = "127.0.0.1"):
        self.recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(host, 0, self.recorder, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._saved: dict[str, str | None] = {}

    def env(self, address: str = "127.0.0.1") -> dict[str, str]:
        """The variables a client at ``address``'s side needs (credentials, endpoint)."""
        return {**self.ENV, "AWS_ENDPOINT_URL": f"http://{address}:{self.port}"}

    def make_bucket(self, name: str) -> None:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key="testing",
                          secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir(name)

    def __enter__(self) -> S3Server:
        self._thread.start()
        for key, value in self.env().items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.release.set()
        self._server.shutdown()
        self._thread.join(timeout=10)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
