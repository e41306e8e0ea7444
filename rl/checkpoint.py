"""Checkpoints: atomic step folders, keep-last-K pruning, resume resolution, a graceful stop.

One checkpoint is a folder ``<root>/step_000200`` (the number: optimizer steps completed, so
also the step a resumed run starts at)::

    adapter/            PEFT adapter (adapter_config.json + adapter_model.safetensors): loads
                        in transformers + PEFT and in vLLM as is
    learner_state.pt    optimizer, LR-scheduler position, counters, torch RNG (Learner.save_state)
    meta.json           written last: step, data position, policy version, time, RNG states of
                        Python's ``random`` (and NumPy's, when imported), what the caller adds
                        (a curriculum's stage position: rl/curriculum.py)

Atomicity: everything is written into ``<root>/.tmp-step_000200-<random>``, every file is
fsynced, ``meta.json`` is written last, and the folder is renamed into place (a rename within a
directory is atomic on POSIX). A folder without ``meta.json`` is never a checkpoint, so a crash
at any point leaves the previous checkpoints as they were; the next save removes the leftover
temporary folder. Older checkpoints beyond ``keep_last`` are pruned only after the new one is in
place, so the last complete one always exists. A SIGKILL loses the steps since the last save.
Last of all, the ``latest`` marker (a file holding the folder's name, replaced atomically) names
the run's newest checkpoint: the one ``resume: true`` takes when it is complete (else, e.g. in
a run folder from before the marker, the highest complete step).

In an object store (``s3://``, ``gs://``...: rl/storage.py) there is no rename: the folder is
made in a local staging folder, then its files are uploaded, ``meta.json`` after all of them and
the marker last (one small object: its PUT is atomic), and a resume downloads the checkpoint
into the staging folder first. A save killed mid-upload leaves a folder without meta.json,
which nothing reads and the next save of that step replaces.

:class:`GracefulStop` turns SIGTERM (``ray job stop``) and SIGINT into a flag the controller
reads at the end of a step: it saves and raises :class:`TrainingStopped` out of the loop.

No torch, no ray: the caller's ``write(folder)`` callback writes the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from rl.storage import CHECKPOINTS, Store, is_remote, join, local_path, staging_folder

META = "meta.json"
LATEST = "latest"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or incomplete."""


class RunAborted(RuntimeError):
    """The run cannot go on (e.g. its learner's node left the cluster); the message says why
    and which checkpoint a resumed run continues from."""


class TrainingStopped(Exception):
    """Raised from the step-end hook after a stop was requested and the checkpoint written;
    ``step``: the steps completed, ``checkpoint``: the folder saved (None if none)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"stopped after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def step_dir_name(step: int) -> str:
    """The folder name of checkpoint ``step``.

    >>> step_dir_name(200)
    'step_000200'
    """
    return f"step_{step:06d}"


def is_due(step: int, every_steps: int, total_steps: int) -> bool:
    """Whether to save after 0-based ``step``: every ``every_steps`` completed steps (0: never
    on a schedule) and after the last one.

    >>> [s for s in range(7) if is_due(s, 3, 7)]
    [2, 5, 6]
    """
    done = step + 1
    return (every_steps > 0 and done % every_steps == 0) or done == total_steps


class CheckpointManager:
    """Saves step folders under ``root`` atomically and keeps the newest ``keep_last``
    (0 keeps all). ``root``: a local path, ``file://`` or a store's URI; for a store,
    ``staging`` is the local folder checkpoints are made in and downloaded to (default: one in
    the cache). See the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str], keep_last: int, staging: str | os.PathLike[str] | None = None):
        if keep_last < 0:
            raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps all)")
        self.location, self.keep_last = str(root), keep_last
        self.store = Store(self.location) if is_remote(self.location) else None
        self.origin: dict[Path, str] = {}  # a downloaded checkpoint's URI, by its local folder
        if self.store is None:
            self.root = local_path(root)
        else:  # checkpoints are made and downloaded here
            self.root = Path(staging) if staging is not None else staging_folder(self.location)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, write: Callable[[Path], None], meta: dict) -> Path | str:
        """Write checkpoint ``step`` (steps completed): ``write(folder)`` fills a temporary
        folder, then ``meta`` (plus step, time, format and RNG states) goes to meta.json, and
        the folder is renamed to ``step_XXXXXX`` (in a store: uploaded); then the ``latest``
        marker names it and older ones beyond keep_last are pruned. If ``write`` raises, nothing
        changes but a temporary folder the next save removes. Returns the checkpoint's folder
        (in a store: its URI)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        write(tmp)
        record = {**meta, "step": step, "format": FORMAT, "time": time.time(),
                  "rng": capture_rng()}
        if self.store is not None:
            _write_synced(tmp / META, _render(record))
            self.store.delete(name)  # what a killed upload of this step left, or an older save of it
            self.store.upload(tmp, name, last=(META,))
            shutil.rmtree(tmp)
            self.store.write_bytes(LATEST, name.encode())
            self._prune(keep=name)
            return self.store.location(name)
        _fsync_tree(tmp)
        _write_synced(tmp / META, _render(record))
        _fsync_dir(tmp)
        final = self.root / name
        if final.exists():  # the same step saved again (e.g. a stop right after a save)
            old = self.root / f"{_TMP_PREFIX}replaced-{name}-{secrets.token_hex(4)}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(self.root)
        marker = self.root / f"{_TMP_PREFIX}{LATEST}-{secrets.token_hex(4)}"
        _write_synced(marker, name)
        os.replace(marker, self.root / LATEST)
        _fsync_dir(self.root)
        self._prune(keep=name)
        return final

    def _remove_leftovers(self) -> None:
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _prune(self, keep: str) -> None:
        """Remove all but the keep_last highest steps -- never ``keep``, the one just saved
        (after a resume from an older checkpoint, higher steps may exist)."""
        if self.keep_last == 0:
            return
        for step, found in self.complete()[: -self.keep_last]:
            if step_dir_name(step) == keep:
                continue
            if self.store is not None:
                self.store.delete(step_dir_name(step))
            else:
                shutil.rmtree(found)

    # ------------------------------------------------------------------ finding
    def complete(self) -> list[tuple[int, Path | str]]:
        """(step, folder or URI) of every complete checkpoint (with meta.json), oldest first."""
        if self.store is not None:
            return sorted((int(m.group(1)), self.store.location(name)) for name in self.store.folders()
                          if (m := _STEP_DIR.match(name)) and self.store.is_file(f"{name}/{META}"))
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / META).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | str | None:
        """The checkpoint the ``latest`` marker names when it is complete; else (no marker, or
        it names a pruned folder) the complete one with the highest step; None if there is none."""
        name = self._marked()
        if name is not None:
            return self.store.location(name) if self.store is not None else self.root / name
        done = self.complete()
        return done[-1][1] if done else None

    def _marked(self) -> str | None:
        if self.store is not None:
            if not self.store.is_file(LATEST):
                return None
            name = self.store.read_bytes(LATEST).decode().strip()
            return name if _STEP_DIR.match(name) and self.store.is_file(f"{name}/{META}") else None
        marker = self.root / LATEST
        name = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
        return name if _STEP_DIR.match(name) and (self.root / name / META).is_file() else None

    def resolve(self, resume: bool | str | os.PathLike[str] | None) -> Path | None:
        """The local folder of the checkpoint to resume from: False/None -> None; True, "auto"
        or "latest" -> the latest under root (None when there is none: a first start); a path
        or URI (absolute, relative to the working directory, or a folder name under root) ->
        that checkpoint, which must exist and be complete. One in a store is downloaded into
        the staging folder first."""
        if resume is None or resume is False:
            return None
        if resume is True or (isinstance(resume, str) and resume.lower() in ("auto", "latest")):
            found = self.latest()
            return self._fetch(Store(found)) if isinstance(found, str) else found
        text = str(resume)
        if is_remote(text):
            return self._fetch(Store(text), text)
        if self.store is not None and not Path(text).exists() and _STEP_DIR.match(text):
            return self._fetch(Store(self.store.location(text)), text)
        path = Path(text)
        if not path.exists() and (self.root / path).exists():
            path = self.root / path
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={text!r}: no such folder "
                                  f"(latest under {self.location}: {self.latest()})")
        if not (path / META).is_file():
            raise CheckpointError(f"checkpoint.resume={text!r}: {path} is not a complete "
                                  f"checkpoint (no {META}: its save never finished)")
        return path

    def _fetch(self, checkpoint: Store, asked: str | None = None) -> Path:
        """Download a checkpoint in a store into the staging folder (replacing an older copy)."""
        if not checkpoint.is_file(META):
            what = "no such checkpoint" if not checkpoint.is_folder("") else f"no {META}: its save never finished"
            raise CheckpointError(f"checkpoint.resume={asked or checkpoint.uri!r}: {checkpoint.uri}: {what}")
        local = self.root / checkpoint.uri.rsplit("/", 1)[-1]
        if local.exists():
            shutil.rmtree(local)
        self.origin[local] = checkpoint.uri
        return checkpoint.download("", local)


def run_checkpoints(config) -> CheckpointManager:
    """A run's checkpoints (``config``: an rl.config.Config): RUN/checkpoints; for a run in a
    store, made in (and downloaded to) its local folder's ``checkpoints`` first."""
    from rl.storage import run_dir, run_location

    return CheckpointManager(join(run_location(config), CHECKPOINTS), config.checkpoint.keep_last,
                             staging=run_dir(config) / CHECKPOINTS)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (the resolved config, recorded in meta.json)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: str | os.PathLike[str]) -> dict:
    """meta.json of a checkpoint folder."""
    file = Path(path) / META
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
    return json.loads(file.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> dict:
    """Python's global ``random`` state, and NumPy's global one when NumPy is imported, as JSON.
    (The item order does not depend on them -- ItemStream seeds its own -- but code that draws
    from the globals then resumes exactly too.)"""
    version, internal, gauss = random.getstate()
    state: dict = {"python": [version, list(internal), gauss]}
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = [kind, keys.tolist(), pos, has_gauss, cached]
    return state


def restore_rng(state: dict) -> None:
    """Set the global RNGs :func:`capture_rng` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------- graceful stop
class GracefulStop:
    """A context manager: inside it, SIGTERM and SIGINT set ``requested`` (and ``signal``)
    instead of killing the process; the loop's step-end hook checkpoints and stops. A second
    SIGINT raises KeyboardInterrupt (an impatient Ctrl-C still works). The previous handlers
    come back on exit. Must be entered in the main thread (Python's rule for signals), after
    ``ray.init()``, which sets a SIGTERM handler of its own.

    ``ray job stop`` sends SIGTERM, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by
    default): for the stop to end with a checkpoint, that must exceed a step plus a save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        print(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint",
              file=sys.stderr, flush=True)

    @property
    def installed(self) -> bool:
        """Whether our handler still holds SIGTERM: ``ray.init()`` installs its own (an exit),
        so enter this after ray.init, and check."""
        return signal.getsignal(signal.SIGTERM) == self._handle

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop must be entered in the main thread (signal handlers)")
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------- durability
def _render(record: dict) -> str:
    """JSON with one top-level key per line (readable) and compact values (the RNG lists)."""
    lines = (f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items())
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every file under root, then every folder (so their entries are durable too)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: folders cannot be opened for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
