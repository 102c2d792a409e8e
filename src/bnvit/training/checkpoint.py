"""Training checkpoints that survive a crash at any instant.

`fit(checkpoint_dir=...)` writes the complete training state after every epoch. A save
never overwrites the only good copy: the new file is written completely under a temporary
name, the previous checkpoint is kept as `previous.pt`, and only then is the new one renamed
to `last.pt`. Loading picks the newest readable file, warning about any that is damaged.
Files are read with `weights_only=True`: a checkpoint can hold tensors and plain Python
values, never code. A file that asks the unpickler to import a Python object (which `fit`
never writes, and a crash cannot produce) is refused with a `ValueError` rather than skipped:
nothing from it is executed, and training does not silently start over on top of it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_torch_save

__all__ = ["load_checkpoint", "save_checkpoint"]

LAST = "last.pt"
PREVIOUS = "previous.pt"
INCOMING = "last.pt.new"
FORMAT = "bnvit.fit/1"


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` as the newest checkpoint in `folder`, keeping the previous one.

    Returns:
        The path of the new checkpoint (`folder/last.pt`).
    """
    folder = Path(folder)
    incoming, last = folder / INCOMING, folder / LAST
    atomic_torch_save({"format": FORMAT, **payload}, incoming)
    if last.exists():
        os.replace(last, folder / PREVIOUS)
    os.replace(incoming, last)
    return last


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable checkpoint in `folder`, or `None` if there is none.

    A damaged file (truncated, not a checkpoint) is skipped with a warning and an older good
    one is used instead.

    Raises:
        ValueError: If a file would import Python objects when unpickled (a crafted file;
            `weights_only=True` refuses it before anything runs).
    """
    folder = Path(folder)
    found: list[dict[str, Any]] = []
    for name in (LAST, INCOMING, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            _refuse_code(path, err)
            warnings.warn(f"ignoring damaged checkpoint {path}: {err}", RuntimeWarning, stacklevel=2)
            continue
        except Exception as err:  # the unpickler raises many kinds on foreign bytes
            warnings.warn(f"ignoring damaged checkpoint {path}: {err}", RuntimeWarning, stacklevel=2)
            continue
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            warnings.warn(f"ignoring {path}: not a bnvit training checkpoint", RuntimeWarning, stacklevel=2)
            continue
        found.append(payload)
    if not found:
        return None
    return max(found, key=lambda p: p["epoch"])


def _refuse_code(path: Path, err: pickle.UnpicklingError) -> None:
    """Raise if the weights-only unpickler stopped `path` because it names a Python object to import."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        raise ValueError(
            f"refusing {path}: it asks to import the Python object {found.group(1)}, which a bnvit checkpoint "
            "never holds (nothing from it was run); remove the file or use another checkpoint_dir"
        ) from err
