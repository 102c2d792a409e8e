"""A sweep's output folder: which experiment and settings it belongs to, and who is writing it.

A folder holding files bnvit did not write is refused before anything is written; `sweep.json`
records the settings and experiment; `sweep_lock` keeps two sweeps out of one folder with an OS
lock on `sweep.lock` (`bnvit._util.io.FolderLock`, the lock of checkpoint folders too), which the
kernel releases when the holder's process ends, however it ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .._util.io import FolderLock, FolderLockedError, atomic_write_text, check_writable
from .grid import Settings

__all__ = [
    "LOCK",
    "SETTINGS",
    "FolderLock",
    "FolderLockedError",
    "check_folder",
    "check_not_foreign",
    "prepare_folder",
    "read_folder",
    "sweep_lock",
]

SETTINGS = "sweep.json"
LOCK = "sweep.lock"
_OWN = (SETTINGS, "results.jsonl", LOCK)  # any one makes a folder bnvit's (results.py names the second)


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


def check_not_foreign(out: str | os.PathLike) -> None:
    """Refuse a folder holding files bnvit did not write (and none of `sweep.json`, `results.jsonl`, `sweep.lock`).

    Raises:
        ValueError: One line naming the folder and some of what it holds.
        NotADirectoryError: If `out` is a file.

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> check_not_foreign(folder)  # empty: fine
        >>> _ = (folder / "report.md").write_text("my notes")
        >>> check_not_foreign(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... holds files bnvit did not write (report.md) and no sweep.json: ...
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder; give --out a folder (new, empty or a sweep's)")
    if not out.is_dir() or any((out / name).exists() for name in _OWN):
        return
    entries = sorted(entry.name for entry in out.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(
            f"{out} holds files bnvit did not write ({shown}) and no {SETTINGS}: it is not a sweep's folder, "
            "and a sweep would overwrite what is there; use a new or empty folder for --out"
        )


def check_folder(out: str | os.PathLike, settings: Settings, experiment: str | None) -> dict[str, Any]:
    """Refuse a folder that is not bnvit's (`check_not_foreign`), or holds another experiment's results or
    other settings; returns what it records."""
    out = Path(out)
    check_not_foreign(out)
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


def sweep_lock(out: str | os.PathLike) -> FolderLock:
    """The lock of a sweep's folder: `with sweep_lock(out):` ... no other sweep (process or thread) writes `out`."""
    return FolderLock(out, LOCK, "a sweep runs there", "output folder")
