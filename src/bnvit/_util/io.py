"""Crash-safe file writes, folder locks the kernel releases when their holder dies, and checkpoint integrity."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import filelock
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`, fsynced and renamed over it on success: the one atomic-write core.

    If the block raises or the process dies, `path` is unchanged. Permissions are a new file's (not 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_exclusive(path)
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


def _create_exclusive(path: Path) -> str:
    """Create a new empty file next to `path` under a fresh random name, with the process's umask applied."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:  # name the file the caller asked for, not the hidden temporary one
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        return str(tmp)
    raise FileExistsError(f"could not create a temporary file next to {path}")


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


# ----------------------------------------------------------------------------- folder locks


class FolderLockedError(RuntimeError):
    """Another holder (a running process, or another thread of this one) holds the folder's lock."""


_held: dict[Path, FolderLock] = {}  # lock files this process holds
_guard = threading.Lock()  # makes "is it held here? take it" one step for the threads of this process


def _forget_in_child() -> None:
    """In a forked child: drop the parent's lock descriptors without unlocking them."""
    global _guard
    _guard = threading.Lock()
    for lock in _held.values():
        with contextlib.suppress(OSError):
            os.close(lock._fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder removes the file it locked)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


class FolderLock:
    """`with FolderLock(folder, "x.lock", "what runs there"):` one holder at a time writes `folder`.

    An OS lock the kernel releases however the holder ends; a second holder (process or thread) gets
    a `FolderLockedError` naming the first. Not re-entrant (docs/checkpoints.md).

    Args:
        folder: The folder to lock (created if needed).
        name: The lock file's name inside `folder`.
        activity: What the holder does there, for the message.
        what: What the folder is, for the message if it cannot be written.
    """

    def __init__(self, folder: str | os.PathLike, name: str, activity: str, what: str = "folder") -> None:
        self.path = Path(folder).resolve() / name
        self.activity, self.what = activity, what
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise `FolderLockedError` naming the folder and its holder."""
        check_writable(self.path.parent, self.what)
        with _guard:
            fd = None if self.path in _held else self._lock_file()
            if fd is None:
                raise FolderLockedError(self._refusal(self.path in _held))
            self._fd, _held[self.path] = fd, self
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "thread": threading.current_thread().name,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
            }
            with contextlib.suppress(OSError):  # the record only informs a refused caller
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(record).encode())

    def _lock_file(self) -> int | None:
        """A descriptor of the lock file with the OS lock taken, or None if someone else holds it."""
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file: locking needs only read access
                fd = os.open(self.path, os.O_RDONLY)
            try:
                if not filelock.lock_descriptor(fd, blocking=False):
                    os.close(fd)
                    return None
                if _same_file(fd, self.path):
                    return fd
                filelock.unlock_descriptor(fd)  # a file its holder removed on release: lock the new one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise FolderLockedError(f"{self.path.parent} is in use: its lock file {self.path} keeps being replaced")

    def _refusal(self, here: bool) -> str:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = None
        if not isinstance(holder, dict):
            who = "holder not recorded yet"
        else:
            who = f"pid {holder.get('pid')} on {holder.get('host')}"
            if here:
                who += f", thread {holder.get('thread')!r} of this process"
            who += f", since {holder.get('started')}: {holder.get('command')}"
        return f"{self.path.parent} is in use: {self.activity} ({who}); the lock ends when that run ends"

    def release(self) -> None:
        """Give the lock back and remove the lock file (nothing happens if this lock is not held)."""
        with _guard:
            if _held.get(self.path) is not self:
                return
            del _held[self.path]
            fd, self._fd = self._fd, -1
            try:
                if _same_file(fd, self.path):
                    with contextlib.suppress(OSError):  # Windows keeps a file that is open
                        os.unlink(self.path)  # before unlocking: a waiter that opened it sees it is gone
                with contextlib.suppress(OSError):
                    filelock.unlock_descriptor(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def append_line_atomic(path: str | os.PathLike, line: str, *, keep: Callable[[str], bool] | None = None) -> None:
    """Append one line to a text file by rewriting it atomically; `keep` may drop existing lines in the same write."""
    path = Path(path)
    old = path.read_text().splitlines() if path.exists() else []
    if keep is not None:
        old = [entry for entry in old if keep(entry)]
    atomic_write_text(path, "".join(entry + "\n" for entry in [*old, line]))


# ----------------------------------------------------------------------------- checkpoint integrity


def tensors_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over a state dict's tensors (names, dtypes, shapes, bytes) in key order, independent of the file format.

    Examples:
        >>> tensors_sha256({"w": torch.zeros(2)}) == tensors_sha256({"w": torch.zeros(2)})
        True
        >>> tensors_sha256({"w": torch.zeros(2)}) == tensors_sha256({"w": torch.ones(2)})
        False
    """
    digest = hashlib.sha256()
    for name, tensor in _tensors(state, ""):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise `ValueError` naming `path` if the file is visibly damaged (empty, bad zip CRCs), before unpickling.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: For an empty file or a zip file whose CRCs or structure do not check out.
    """
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError for a missing file
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    with open(path, "rb") as handle:
        starts_like_zip = handle.read(4) == b"PK\x03\x04"
    if not zipfile.is_zipfile(path):
        if starts_like_zip:
            raise ValueError(f"{path} is a damaged zip checkpoint: its central directory is missing (truncated?)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise ValueError(f"{path} is a damaged zip checkpoint ({type(err).__name__}: {err})") from err
    if bad is not None:
        raise ValueError(f"{path} is damaged: its member {bad} fails its CRC-32 check (the bytes changed after saving)")
