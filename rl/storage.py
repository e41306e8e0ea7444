"""Where a run's files live: a local folder (an NFS mount is one), ``file://``, or an object
store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``) through pyarrow's filesystems, the layer
Ray's own storage uses.

Credentials and endpoints come from each store's standard environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` and, for MinIO or another S3-compatible server,
``AWS_ENDPOINT_URL``; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS. Only the job's driver needs
them: it writes every checkpoint (the learner ranks send it their files) and the run's other
files.

A run whose ``logging.run_dir`` is in a store works in a local staging folder
(:func:`staging_folder`) and copies its files there (:func:`sync_run_files`) at every
checkpoint and at the end; a resume on any host copies them back (:func:`pull_run_files`).
Checkpoints go straight to the store (rl/checkpoint.py): an object store has no rename, so a
checkpoint's commit is ordered writes -- every file, then ``meta.json``, then the ``latest``
marker (one small object; a PUT is atomic) -- and a folder without meta.json is never read.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

CACHE_ENV = "API_ADAPTER_CACHE"
CHECKPOINTS = "checkpoints"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StorageError(OSError):
    """A store cannot be opened or read; the message names the location."""


def cache_dir() -> Path:
    """The local cache: ``$API_ADAPTER_CACHE`` if set (and non-empty), else
    ``~/.cache/api-adapter``. Not created here."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "api-adapter"


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI of a store other than the local disk.

    >>> [is_remote(x) for x in ("runs/a", "/tmp/a", "file:///tmp/a", "s3://bucket/a", "C:/runs")]
    [False, False, False, True, False]
    """
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def local_path(location: str | os.PathLike[str]) -> Path:
    """A local location as a Path (``file://`` stripped).

    >>> str(local_path("file:///tmp/run")), str(local_path("runs/x"))
    ('/tmp/run', 'runs/x')
    """
    text = str(location)
    if is_remote(text):
        raise ValueError(f"{text} is not on the local disk")
    return Path(urlsplit(text).path) if text.startswith("file:") else Path(text)


def staging_folder(location: str) -> Path:
    """The local folder a run in a store works in: under the cache, named for the location."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:10]
    tail = _UNSAFE.sub("_", location.rstrip("/").rsplit("/", 1)[-1]) or "run"
    return cache_dir() / "runs" / f"{tail}-{digest}"


class Store:
    """A folder in a store, read and written by paths relative to it (``/``-separated)."""

    def __init__(self, uri: str):
        import pyarrow
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        self._pafs = pafs
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
            raise StorageError(f"{uri}: cannot open this location ({error})") from error

    def location(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _info(self, rel: str):
        try:
            return self.fs.get_file_info(self._path(rel))
        except OSError as error:
            raise StorageError(f"{self.location(rel)}: {error}") from error

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == self._pafs.FileType.File

    def is_folder(self, rel: str) -> bool:
        return self._info(rel).type == self._pafs.FileType.Directory

    def folders(self, rel: str = "") -> list[str]:
        """The names of the folders right under ``rel`` (none when it does not exist)."""
        selector = self._pafs.FileSelector(self._path(rel), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as error:
            raise StorageError(f"{self.location(rel)}: {error}") from error
        return sorted(i.base_name for i in infos if i.type == self._pafs.FileType.Directory)

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to it."""
        base = self._path(rel)
        selector = self._pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == self._pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._path(rel)) as stream:
                return stream.read()
        except OSError as error:
            raise StorageError(f"{self.location(rel)}: {error}") from error

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object (local: one file), written whole."""
        if isinstance(self.fs, self._pafs.LocalFileSystem):  # an object store has no folders to make
            self.fs.create_dir(self._path(rel).rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self._path(rel)) as stream:
            stream.write(data)

    def upload(self, local: Path, rel: str, last: Sequence[str] = (), skip=lambda name: False) -> None:
        """Every file under the local folder to ``rel``; the names in ``last`` after all the
        others, in that order (the commit markers); ``skip(relative name)`` leaves a file out."""
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        names = [n for n in names if not skip(n)]
        ordered = [n for n in names if n not in last] + [n for n in last if n in names]
        for name in ordered:
            self.write_bytes(f"{rel}/{name}" if rel else name, (local / name).read_bytes())

    def download(self, rel: str, local: Path, skip=lambda name: False) -> Path:
        """Every file under ``rel`` into the local folder (made if missing); the folder."""
        for name in self.files(rel):
            if skip(name):
                continue
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(f"{rel}/{name}" if rel else name))
        return local

    def delete(self, rel: str) -> None:
        """A folder and everything under it (nothing when it does not exist)."""
        if self.is_folder(rel):
            self.fs.delete_dir(self._path(rel))


def _run_file(name: str) -> bool:
    """A file of the run folder that travels with it: not a checkpoint (those go to the store
    as they are made) nor an SQLite side file of a database being written."""
    return not (name.startswith(f"{CHECKPOINTS}/") or name.endswith(("-journal", "-wal", "-shm")))


def join(location: str, name: str) -> str:
    """``location/name`` for a path or a URI.

    >>> join("s3://bucket/runs/a/", "checkpoints"), join("runs/a", "checkpoints")
    ('s3://bucket/runs/a/checkpoints', 'runs/a/checkpoints')
    """
    return f"{location.rstrip('/')}/{name}" if is_remote(location) else str(local_path(location) / name)


def sync_run_files(local: Path, location: str) -> None:
    """For a run in a store, copy its files (config, metrics, results, report, answer cache)
    there from the local folder; nothing for a run on the local disk. An SQLite database (the
    answer cache, in WAL mode: its last answers may be in the -wal file) goes as a consistent
    snapshot made with SQLite's backup API."""
    if not is_remote(location):
        return
    store = Store(location)
    store.upload(local, "", skip=lambda name: not _run_file(name) or name.endswith(".sqlite"))
    for database in local.rglob("*.sqlite"):
        name = database.relative_to(local).as_posix()
        if _run_file(name):
            store.write_bytes(name, _sqlite_snapshot(database))


def _sqlite_snapshot(database: Path) -> bytes:
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory(prefix="api-adapter-") as tmp:
        copy = Path(tmp) / "snapshot.sqlite"
        source, target = sqlite3.connect(database), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        return copy.read_bytes()


def pull_run_files(location: str, local: Path) -> None:
    """Copy the run's files from the store into the local staging folder (a resume on another
    host continues its metrics and reuses its paid-for upstream answers)."""
    Store(location).download("", local, skip=lambda name: not _run_file(name))


def run_location(config) -> str:
    """Where the run's files live (``config``: an rl.config.Config): ``logging.run_dir`` with
    ``{name}`` filled in, a path or a store's URI."""
    return config.logging.run_dir.replace("{name}", config.logging.name)


def run_dir(config) -> Path:
    """The local folder the run works in: its location, or for a run in a store,
    ``logging.local_dir`` (by default a folder in the cache named for the location)."""
    location = run_location(config)
    if not is_remote(location):
        return local_path(location)
    return Path(config.logging.local_dir) if config.logging.local_dir else staging_folder(location)
