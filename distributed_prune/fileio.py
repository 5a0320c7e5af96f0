"""Atomic file writes: the one place that writes a file through a temp file and a rename.

A reader (another rank, a resumed run, ``dprune report`` on a live run) sees the old file or the
complete new one, never a partial write. The temp file lives in the target's directory (a rename
is only atomic within one file system) and starts with a dot, so globs over ``*.pt`` or
``summary.json`` never pick it up. Bottom layer: imports nothing from the package.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["atomic_path", "write_with", "write_bytes", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, executable: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on a clean exit it replaces ``path``, on an error it
    is removed. For writers that need a file name rather than a file object (e.g. a library
    that opens the file itself)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if executable:
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None], *,
               executable: bool = False, fsync: bool = True) -> Path:
    """Call ``writer(f)`` on a binary temp file, flush and fsync it (a crash right after the
    rename must not leave an empty file on disk), then rename it over ``path``."""
    path = Path(path)
    try:
        with atomic_path(path, executable=executable) as tmp:
            with open(tmp, "wb") as f:
                writer(f)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
    except OSError as e:
        temp = e.filename is not None and Path(str(e.filename)).name.startswith(f".{path.name}.")
        if e.errno is not None and (e.filename is None or temp):
            # name the target, not the temp file (a full disk, a read-only mount, ...)
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes, **kw) -> Path:
    return write_with(path, lambda f: f.write(data), **kw)


def write_text(path: str | os.PathLike, text: str, **kw) -> Path:
    return write_with(path, lambda f: f.write(text.encode()), **kw)
