"""The persistent answer cache: one SQLite file, one row per answered request.

Key: the SHA-256 of a canonical JSON of everything that changes the answer -- provider,
endpoint (base URL, Vertex region, or local model folder), model, system prompt, prompt,
``max_tokens``, ``temperature`` and ``sample_index`` (:func:`cache_key`).

Durability: WAL journal, autocommit, one ``INSERT`` (one transaction) per answer, written the
moment the answer arrives. A committed transaction is in the WAL file, so killing the process
at any point loses no answer already stored. ``synchronous=NORMAL`` (the default) does not
fsync each commit: a power cut or OS crash may lose the last few answers (never corrupt the
file); pass ``synchronous="FULL"`` to fsync every commit (see scripts/bench_cache.py for the
cost of each).

Failures: a failed call (no reply after the retries) is stored too, with ``failed=1``, so the
file records what happened -- but :meth:`AnswerCache.get` does not return it, so a rerun calls
again, and a later success replaces it. A success is never replaced by a failure. Model
replies without an answer (a refusal, empty content, an unreadable number) are answers: they
were paid for and would most likely repeat, so they are kept like any other.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from actors.upstream.base import UpstreamAnswer, UpstreamRequest

KEY_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key      TEXT PRIMARY KEY,
    failed   INTEGER NOT NULL,
    provider TEXT NOT NULL,
    model    TEXT NOT NULL,
    request  TEXT NOT NULL,
    answer   TEXT NOT NULL,
    created  REAL NOT NULL
)
"""
_UPSERT = """
INSERT INTO answers (key, failed, provider, model, request, answer, created)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    failed = excluded.failed, answer = excluded.answer, created = excluded.created
WHERE answers.failed = 1
"""


def cache_identity(provider: str, endpoint: str, model: str) -> dict:
    return {"provider": provider, "endpoint": endpoint, "model": model}


def cache_key(identity: dict, request: UpstreamRequest) -> str:
    """The content address of ``request`` sent to the upstream named by ``identity``.

    >>> a = cache_key(cache_identity("p", "e", "m"), UpstreamRequest("Evaluate: 1 θ 2"))
    >>> b = cache_key(cache_identity("p", "e", "m"), UpstreamRequest("Evaluate: 1 θ 2", sample_index=1))
    >>> len(a), a == b
    (64, False)
    """
    payload = {"v": KEY_VERSION, **identity, **asdict(request)}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AnswerCache:
    """A SQLite answer cache at ``path`` (created with its folder when absent). Safe to share
    between threads of one process (a lock serialises statements) and between processes
    (SQLite's locking, with a ``busy_timeout``)."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", busy_timeout_ms: int = 30_000):
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, so each statement is its own transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._db.execute(_SCHEMA)

    def get(self, key: str) -> UpstreamAnswer | None:
        """The stored answer (``cached=True``), or None when absent or stored as failed."""
        with self._lock:
            row = self._db.execute(
                "SELECT answer FROM answers WHERE key = ? AND failed = 0", (key,)
            ).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["cached"] = True
        return UpstreamAnswer.from_json(data)

    def put(self, key: str, identity: dict, request: UpstreamRequest, answer: UpstreamAnswer) -> None:
        """Store ``answer`` now (one committed transaction); see the module docstring."""
        record = answer.to_json()
        record.pop("cached")
        params = (
            key, int(answer.failed), identity["provider"], identity["model"],
            json.dumps({**identity, **asdict(request)}, ensure_ascii=False),
            json.dumps(record, ensure_ascii=False), time.time(),
        )
        with self._lock:
            self._db.execute(_UPSERT, params)

    def counts(self) -> dict[str, int]:
        """``{"answered": n, "failed": m}``."""
        with self._lock:
            rows = self._db.execute("SELECT failed, COUNT(*) FROM answers GROUP BY failed").fetchall()
        found = dict(rows)
        return {"answered": found.get(0, 0), "failed": found.get(1, 0)}

    def records(self) -> Iterator[tuple[dict, UpstreamAnswer]]:
        """Every stored ``(request fields, answer)``, failures included, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT request, answer FROM answers ORDER BY created").fetchall()
        for request, answer in rows:
            yield json.loads(request), UpstreamAnswer.from_json(json.loads(answer))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
