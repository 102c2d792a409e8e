"""A sweep's output folder: which experiment and settings it belongs to, and who is writing it.

`sweep.json` records the settings every cell of the folder shares and the experiment the folder
belongs to; a sweep with other settings or of another experiment is refused. (Folders written
before the experiment was recorded have settings only; the next sweep adopts them.)

`FolderLock` keeps two sweeps out of one folder: `sweep.lock` holds the pid, host, start time
and command of the process running there. A second process is refused with one line naming the
holder; a lock left by a process that no longer runs on this host (a SIGKILL, a reboot) is
taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, check_writable
from .grid import Settings

__all__ = ["LOCK", "SETTINGS", "FolderLock", "FolderLockedError", "prepare_folder", "read_folder"]

SETTINGS = "sweep.json"
LOCK = "sweep.lock"


class FolderLockedError(RuntimeError):
    """Another running process holds the folder's lock."""


def read_folder(out: str | os.PathLike) -> dict[str, Any]:
    """What `out/sweep.json` records (`{}` if there is none)."""
    path = Path(out) / SETTINGS
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(stored, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(stored).__name__}")
    return stored


def check_folder(out: str | os.PathLike, settings: Settings, experiment: str | None) -> dict[str, Any]:
    """Refuse a folder that holds another experiment's results or other settings; returns what it records."""
    out = Path(out)
    stored = read_folder(out)
    owner = stored.get("experiment")
    if owner and experiment and owner != experiment:
        raise ValueError(
            f"{out} holds results of the experiment {owner!r}, not {experiment!r}; use another --out "
            f"(or the command that made it)"
        )
    differences = settings.comparable(stored) if stored else []
    if differences:
        raise ValueError(
            f"{out} holds a sweep with other settings; use another --out or the same settings:\n  "
            + "\n  ".join(differences)
        )
    return stored


def prepare_folder(out: str | os.PathLike, settings: Settings, experiment: str | None = None, **extra: Any) -> None:
    """Check the folder (see `check_folder`), create it and record the settings, experiment and `extra`."""
    out = Path(out)
    stored = check_folder(out, settings, experiment)
    check_writable(out, "output folder")
    record = {**stored, **dataclasses.asdict(settings), **{k: v for k, v in extra.items() if v is not None}}
    if experiment:
        record["experiment"] = experiment
    if record != stored:
        atomic_write_text(out / SETTINGS, json.dumps(record, indent=2) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


class FolderLock:
    """`with FolderLock(out):` ... only one process at a time sweeps `out` (re-entrant within a process)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out).resolve() / LOCK

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
        fd, tmp = tempfile.mkstemp(prefix=".sweep.lock.", dir=self.path.parent)
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
        if self.path in _held:
            _held[self.path] += 1
            return
        check_writable(self.path.parent, "output folder")
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
                f"{self.path.parent} is in use: a sweep runs there (pid {pid} on {host}, since "
                f"{holder.get('started')}: {holder.get('command')}); if that process is gone, delete {self.path}"
            )
        raise FolderLockedError(f"{self.path.parent} is in use: another process took its lock just now")

    def release(self) -> None:
        depth = _held.get(self.path, 0)
        if depth > 1:
            _held[self.path] = depth - 1
            return
        _held.pop(self.path, None)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
