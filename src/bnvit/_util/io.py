"""Crash-safe file writes (a file is either the old one or the complete new one, never half), folder
locks (one writing process per folder), and checkpoint integrity: checksums over tensors, CRC
verification of torch's zip files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write to; on success it is fsynced and renamed over `path`.

    If the block raises, or the process dies, `path` keeps its previous content. The file gets
    the permissions of any new file of this process (0o666 less the umask: 0o644 typically),
    not the 0o600 of `tempfile.mkstemp`. This is the one atomic-write core: every writer uses it.
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
    """Another running process holds the folder's lock."""


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class FolderLock:
    """`with FolderLock(folder, "x.lock", "what runs there"):` only one process at a time writes `folder`.

    The lock file holds the pid, host, start time and command of the process holding it. A
    second process is refused with a `FolderLockedError` naming the holder; a lock left by a
    process that no longer runs on this host (a SIGKILL, a reboot) is taken over. Re-entrant
    within a process.

    Args:
        folder: The folder to lock (created if needed).
        name: The lock file's name inside `folder`.
        activity: What the holder does there, for the message (`"a sweep runs there"`).
        what: What the folder is, for the message if it cannot be written (`"output folder"`).
    """

    def __init__(self, folder: str | os.PathLike, name: str, activity: str, what: str = "folder") -> None:
        self.path = Path(folder).resolve() / name
        self.activity, self.what = activity, what

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _try_create(self) -> bool:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            os.link(tmp, self.path)  # atomic, and fails if the lock exists: the lock is never half-written
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self) -> None:
        """Take the lock, or raise `FolderLockedError` naming the process that holds it."""
        if self.path in _held:
            _held[self.path] += 1
            return
        check_writable(self.path.parent, self.what)
        for _ in range(2):
            if self._try_create():
                _held[self.path] = 1
                return
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its process is gone
                continue
            raise FolderLockedError(
                f"{self.path.parent} is in use: {self.activity} (pid {pid} on {host}, since "
                f"{holder.get('started')}: {holder.get('command')}); if that process is gone, delete {self.path}"
            )
        raise FolderLockedError(f"{self.path.parent} is in use: another process took its lock just now")

    def release(self) -> None:
        """Give the lock back (the outermost release of this process removes the file)."""
        depth = _held.get(self.path, 0)
        if depth > 1:
            _held[self.path] = depth - 1
            return
        if _held.pop(self.path, None) is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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


# ----------------------------------------------------------------------------- checkpoint integrity


def tensors_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over the tensors of a (nested) state dict, in sorted key order: names, dtypes, shapes, bytes.

    Tensors are hashed as they are in memory (moved to the CPU, made contiguous), so the
    value does not depend on the file format; non-tensor values are not covered.

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
    """Raise `ValueError` naming `path` if the file is visibly damaged, before anything unpickles it.

    A file in torch's zip format (what `torch.save` writes) has a CRC-32 per member: every
    member is read and checked. An empty file is refused. Other formats (legacy pickles) pass:
    they have no checksum to verify. The checksum bnvit stores inside its training checkpoints
    is verified after loading, by `bnvit.training.checkpoint`.

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
