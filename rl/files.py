"""Writing result files so that a crash never leaves half of one (a temporary file beside the
target, fsynced, then renamed over it: a rename within a folder is atomic on POSIX), and
folders as values, to move them between hosts that share no disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) all at once, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make a result file private to its writer
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its path relative to it: a folder as a value that can
    travel to another host (through Ray), where :func:`write_files` lays it out again."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_files(folder: str | Path, files: dict[str, bytes]) -> Path:
    """Write :func:`folder_files`' output under ``folder`` (created); returns ``folder``."""
    folder = Path(folder)
    for name, data in files.items():
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{name!r} leaves {folder}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder
