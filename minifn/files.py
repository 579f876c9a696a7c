"""Durable file writes: a file is replaced whole or not at all, and a rename survives a crash."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class OutputLocationError(ValueError):
    """An output path that cannot be created, because a file stands where one of its folders should be."""


def check_output_location(path: str | os.PathLike) -> None:
    """Raise OutputLocationError when a folder above path is a file: said plainly and up front, before any
    work, instead of an 'Errno 17 File exists' from mkdir at the end."""
    path = Path(path)
    for folder in path.parents:  # nearest first; the first that exists decides
        if folder.exists():
            if not folder.is_dir():
                raise OutputLocationError(f"cannot write {path}: {folder} is a file, not a folder")
            return


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside path for writing and rename it into place when the block ends without an
    error; on any exception, Ctrl-C included, the temporary is removed and path is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file beside it, renamed into place: readers, and a crash
    mid-write, see the old file or the new one, never half of one."""
    with atomic_file(path) as f:
        f.write(data)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk, so a rename into it survives a crash."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
