"""The results file: one JSON line per finished cell (schema 2; schema 1 still read), and what a line must hold."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._util.device import describe_machine
from ..training.history import EpochRecord, History

__all__ = ["RESULTS", "SCHEMA", "describe_machines", "load_results", "machine", "results_sha256"]

RESULTS = "results.jsonl"
SCHEMA = 2
_RECORD_FIELDS = {f.name for f in dataclasses.fields(EpochRecord)}
_CELL_FIELDS = {"model": str, "depth": int, "lr": (int, float), "seed": int}


machine = describe_machine  # what each results line records about where it ran


def _refuse(path: Path, number: int, why: str) -> ValueError:
    return ValueError(f"{path}, line {number}: {why}; it cannot be read as a finished cell")


def _check_line(entry: Any, path: Path, number: int) -> dict[str, Any]:
    """A results line as a dict with every field a report reads; raises `ValueError` naming the line."""
    if not isinstance(entry, dict):
        raise _refuse(path, number, f"expected a JSON object, got {type(entry).__name__}")
    schema = entry.get("schema", 1)
    newer = f" (written with results schema {schema}; this bnvit reads up to {SCHEMA})" if schema != 1 else ""
    cell = entry.get("cell")
    if not isinstance(cell, dict):
        raise _refuse(path, number, f"no 'cell' object{newer}")
    for name, kind in _CELL_FIELDS.items():
        if not isinstance(cell.get(name), kind) or isinstance(cell.get(name), bool):
            raise _refuse(path, number, f"cell.{name} is {cell.get(name)!r}{newer}")
    settings = entry.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("epochs"), int):
        raise _refuse(path, number, f"no 'settings' object with 'epochs'{newer}")
    raw = entry.get("history")
    if not isinstance(raw, dict) or not isinstance(raw.get("records"), list):
        raise _refuse(path, number, f"no 'history' object with 'records'{newer}")
    # Fields a newer bnvit may add to an epoch record are dropped; missing ones are refused below.
    records = [
        {k: v for k, v in r.items() if k in _RECORD_FIELDS} if isinstance(r, dict) else r for r in raw["records"]
    ]
    raw = {"diverged_at": None, "diverged_step": None, "meta": {}, **raw, "records": records}
    try:
        history = History.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise _refuse(path, number, f"no readable 'history' ({err}){newer}") from err
    key = f"{cell['model']}-d{cell['depth']}-lr{cell['lr']:g}-s{cell['seed']}"
    if entry.get("key", key) != key:
        raise _refuse(path, number, f"key {entry['key']!r} does not match its cell ({key!r})")
    out = {**entry, "history": raw}
    out.setdefault("key", key)
    out.setdefault("test_acc", history.val_acc[-1] if history.records else None)
    out.setdefault("clean_test_acc", None)
    out.setdefault("device", None)
    return out


def _read_line(entry: Any, path: Path, number: int, complete: bool) -> dict[str, Any]:
    try:
        return _check_line(entry, path, number)
    except ValueError:
        # Enough to skip a finished cell when resuming: its key.
        if complete or not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise
        return dict(entry)


def load_results(out: str | os.PathLike, *, complete: bool = False) -> list[dict[str, Any]]:
    """The finished cells recorded in `out/results.jsonl` (an empty list if none).

    `complete=True` requires every line to hold what a report reads (cell, settings, history);
    otherwise a key is enough.

    Raises:
        ValueError: A line is not JSON, lacks what is required, or repeats an earlier line's cell;
            the message names the file and the lines.
    """
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    results, seen = [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}, is not valid JSON: {err}") from err
        result = _read_line(entry, path, number, complete)
        if result["key"] in seen:
            raise ValueError(
                f"{path}, lines {seen[result['key']]} and {number} both record the cell {result['key']}: a results "
                "file holds each cell once (bnvit replaces a cell's line, never repeats it); remove one of the two"
            )
        seen[result["key"]] = number
        results.append(result)
    return results


def results_sha256(out: str | os.PathLike) -> str | None:
    """The sha256 of `out/results.jsonl` (`None` if there is none): what a report was computed from."""
    path = Path(out) / RESULTS
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def describe_machines(results: list[Mapping[str, Any]]) -> list[str]:
    """The distinct machines recorded in results lines, one phrase each (empty if none recorded)."""
    phrases = []
    for r in results:
        m = r.get("machine")
        if not isinstance(m, dict):
            continue
        threads = m.get("torch_threads")
        phrase = (
            f"{m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} logical CPUs, "
            f"{threads} torch thread{'' if threads == 1 else 's'}), torch {m.get('torch')}"
        )
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases
