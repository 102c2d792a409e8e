"""Crash-safe file writes: a file is either the old one or the complete new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write to; on success it is fsynced and renamed over `path`.

    If the block raises, or the process dies, `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """`open(path, mode)` through `atomic_path`: `path` is the old file or the complete new one."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a half-written `path`."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `folder` if needed and prove a file can be written there; raise a clear error if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        # OSError(errno, ...) picks the matching subclass: PermissionError, NotADirectoryError...
        raise OSError(err.errno, f"cannot write to the {what} {folder}: {err.strerror or err}") from err
    return folder


def append_line_atomic(path: str | os.PathLike, line: str, *, keep: Callable[[str], bool] | None = None) -> None:
    """Append one line to a text file by rewriting it atomically.

    Every reader sees either the old file or the old file plus the complete new line. With
    `keep`, existing lines for which it returns False are dropped in the same write.
    """
    path = Path(path)
    old = path.read_text().splitlines() if path.exists() else []
    if keep is not None:
        old = [entry for entry in old if keep(entry)]
    atomic_write_text(path, "".join(entry + "\n" for entry in [*old, line]))
