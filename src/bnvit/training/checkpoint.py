"""Training checkpoints that survive a crash at any instant.

`fit(checkpoint_dir=...)` writes the complete training state after every epoch. A save
never overwrites the only good copy: the new file is written completely under a temporary
name, the previous checkpoint is kept as `previous.pt`, and only then is the new one renamed
to `last.pt`. Loading picks the newest readable file, warning about any that is damaged.
Files are read with `weights_only=True`: a checkpoint can hold tensors and plain Python
values, never code. A file that asks the unpickler to import a Python object (which `fit`
never writes, and a crash cannot produce) is refused with a `ValueError` rather than skipped:
nothing from it is executed, and training does not silently start over on top of it.

A checkpoint resumes only the run that wrote it: it records the run's arguments and its
fingerprint (`bnvit.training.fingerprint`: the model's configuration, the loss, the data), and
a call that differs in any of them is refused with the differences named. While `fit` trains,
the process that writes the folder holds its lock (`fit.lock`, an OS lock the kernel releases when
that process ends, however it ends): a second `fit` there, in another process or thread, is refused.
A disk that fills up during a save is reported with its cause and the checkpoint still intact.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util import checks as _checks
from .._util.io import FolderLock, atomic_torch_save, check_writable, tensors_sha256, verify_checkpoint_file
from .history import History
from .world import World

__all__ = [
    "FolderClaim",
    "Resumable",
    "finite_state",
    "load_checkpoint",
    "restore",
    "rng_state",
    "save_checkpoint",
    "save_divergence",
    "save_state",
    "set_rng_state",
]

LAST = "last.pt"
PREVIOUS = "previous.pt"
INCOMING = "last.pt.new"
LOCK = "fit.lock"
FORMAT = "bnvit.fit/1"


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` as the newest checkpoint in `folder`, keeping the previous one.

    The file carries `sha256`, a checksum of the payload's tensors (`bnvit._util.io.tensors_sha256`)
    that `load_checkpoint` verifies.

    Returns:
        The path of the new checkpoint (`folder/last.pt`).

    Raises:
        OSError: If the file cannot be written (a full disk, say): one line naming the cause
            and the checkpoint that is still intact; nothing in `folder` changed.
    """
    folder = Path(folder)
    incoming, last = folder / INCOMING, folder / LAST
    payload = {"format": FORMAT, **payload}
    try:
        atomic_torch_save({**payload, "sha256": tensors_sha256(payload)}, incoming)
    except (OSError, RuntimeError) as err:
        cause = _os_error(err)  # torch reports a failed write as "[enforce fail at inline_container.cc...]"
        if cause is None:
            raise
        kept = next((path for path in (last, incoming, folder / PREVIOUS) if path.exists()), None)
        intact = "no checkpoint was saved before" if kept is None else f"{kept} is intact and a resume starts from it"
        raise OSError(
            cause.errno,
            f"cannot save the checkpoint of epoch {payload.get('epoch')} in {folder}: {cause.strerror or cause}; "
            f"{intact}; free space (or fix the folder) and run the same call to resume",
        ) from err
    if last.exists():
        os.replace(last, folder / PREVIOUS)
    os.replace(incoming, last)
    return last


def _os_error(err: BaseException | None) -> OSError | None:
    """The first `OSError` with an errno in `err`'s chain of causes (`err` itself included), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class FolderClaim:
    """The checkpoint folder of one `fit` call, held for the call's duration.

    `open` checks the folder (an empty string is refused: it would mean the current folder),
    and in the process that writes there proves it writable, takes its lock (`fit.lock`: a
    second `fit` training into the same folder, from another process or thread, is refused with a
    `FolderLockedError` naming the first) and removes the temporary files of a save that a killed
    process left behind. Leaving the `with` block releases the lock.

    Examples:
        >>> import tempfile
        >>> with FolderClaim() as claim:
        ...     folder = claim.open(tempfile.mkdtemp(), main=True)
        ...     (folder / LOCK).exists()
        True
        >>> (folder / LOCK).exists()
        False
    """

    def __init__(self) -> None:
        self._lock: FolderLock | None = None

    def open(self, folder: str | os.PathLike | None, main: bool) -> Path | None:
        """`folder` as a Path (None stays None), checked, locked and cleaned by the `main` process.

        Raises:
            TypeError: If `folder` is not a path.
            ValueError: If `folder` is an empty string.
            OSError: If the main process cannot write there.
            FolderLockedError: If another running `fit` (process or thread) trains into `folder`
                (`bnvit.training.FolderLockedError`).
        """
        if folder is None:
            return None
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a folder path or None, got {folder!r} ({type(folder).__name__})")
        if not str(os.fspath(folder)).strip():
            raise ValueError(
                f"checkpoint_dir is {os.fspath(folder)!r}, an empty path; give a folder (or None for no checkpoints)"
            )
        folder = Path(folder)
        if not main:
            return folder
        check_writable(folder, "checkpoint_dir")
        lock = FolderLock(folder, LOCK, "fit() is training with it as its checkpoint_dir", "checkpoint_dir")
        lock.acquire()
        self._lock = lock
        for leftover in folder.glob(f".{INCOMING}.*.tmp"):  # a save cut short: only the lock holder saves here
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        return folder

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
            verify_checkpoint_file(path)
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            _refuse_code(path, err)
            warnings.warn(f"ignoring damaged checkpoint {path}: {_reason(err, path)}", RuntimeWarning, stacklevel=2)
            continue
        except Exception as err:  # the unpickler raises many kinds on foreign bytes
            warnings.warn(f"ignoring damaged checkpoint {path}: {_reason(err, path)}", RuntimeWarning, stacklevel=2)
            continue
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            warnings.warn(f"ignoring {path}: not a bnvit training checkpoint", RuntimeWarning, stacklevel=2)
            continue
        stored = payload.pop("sha256", None)  # absent from checkpoints of bnvit 0.x before checksums
        if stored is not None and stored != tensors_sha256(payload):
            warnings.warn(
                f"ignoring damaged checkpoint {path}: its tensors fail their SHA-256 checksum (changed after saving)",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        found.append(payload)
    if not found:
        return None
    return max(found, key=lambda p: p["epoch"])


def _reason(err: Exception, path: Path) -> str:
    """One line saying why a file could not be read, instead of torch's message (which may be several
    lines, end in ': ' for an empty file, or advise unpickling with `weights_only=False`)."""
    text = str(err).strip()
    first = _checks.first_line(err).strip() if text else ""
    if isinstance(err, ValueError) and first:  # from verify_checkpoint_file: already one clear line
        return first.removeprefix(f"{path} is ").removeprefix(f"{path} ")
    if "weights_only" in text.lower() or "weights only" in text.lower():
        return "torch's weights-only loader refused it: it holds more than tensors and plain values"
    if not zipfile.is_zipfile(path):
        return "its bytes are neither torch's zip format nor a pickle torch can read (a text file, foreign data?)"
    if "zip archive" in text or "central directory" in text:
        return "it is a damaged zip file (torch cannot read its archive)"
    return f"{type(err).__name__}: {first.rstrip(': ') or 'unreadable'}"


def _refuse_code(path: Path, err: pickle.UnpicklingError) -> None:
    """Raise if the weights-only unpickler stopped `path` because it names a Python object to import."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        raise ValueError(
            f"refusing {path}: it asks to import the Python object {found.group(1)}, which a bnvit checkpoint "
            "never holds (it holds tensors and plain values; nothing from the file was run); remove the file or "
            "use another checkpoint_dir"
        ) from None


# ----------------------------------------------------------------------------- the state of a run


@dataclass
class Resumable:
    """What a checkpoint of `fit` restores, besides the History: the objects and the run's arguments.

    Attributes:
        model: The model (plain BatchNorms or synchronized ones: they share their state).
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler, or None.
        scaler: The fp16 gradient scaler, or None.
        run: The arguments that define the run, with its fingerprint (`bnvit.training.fingerprint`);
            a checkpoint resumes only a run with the same.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    run: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step may draw from."""
    np_state = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        python=random.getstate(),
        numpy=[np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    )


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *others = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *others))


def save_state(folder: Path, epoch: int, parts: Resumable, history: History, world: World) -> None:
    """Rank 0 saves the state after `epoch`; the others wait until the file is complete, so any may read it next."""
    if world.is_main:
        _save(folder, epoch, parts, history)
    world.barrier()


def finite_state(parts: Resumable) -> torch.Tensor:
    """Whether every floating-point value of the model's and the optimizer's state is finite (a 0-d bool
    tensor on the model's device: no host sync until it is read)."""
    tensors = [t for t in parts.model.state_dict().values() if t.is_floating_point()]
    for state in parts.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    device = tensors[0].device
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all()


def save_divergence(folder: Path, history: History, world: World) -> None:
    """Record that the run diverged, keeping the last finite state: the newest checkpoint's model, optimizer
    and random state, now with the History that says where it diverged.

    The model in memory (non-finite) is never saved. Without a checkpoint of the epoch before (the first
    epoch diverged), nothing is written: `last.pt` never holds a state the run did not finish finite.
    """
    if world.is_main:
        saved = load_checkpoint(folder)
        if saved is not None and saved["epoch"] == history.epochs_done:
            save_checkpoint(folder, {**saved, "history": history.to_dict()})
    world.barrier()


def _save(folder: Path, epoch: int, parts: Resumable, history: History) -> None:
    save_checkpoint(
        folder,
        dict(
            epoch=epoch,
            model=parts.model.state_dict(),
            config=getattr(parts.model, "config", None),
            optimizer=parts.optimizer.state_dict(),
            scheduler=None if parts.scheduler is None else parts.scheduler.state_dict(),
            scaler=None if parts.scaler is None else parts.scaler.state_dict(),
            rng=rng_state(),
            history=history.to_dict(),
            run=parts.run,
        ),
    )


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """`name: checkpoint X, this call Y` for every value of `current` that `saved` records otherwise.

    Nested records (the model's configuration, the data) are compared value by value. What the
    checkpoint does not record at all (a checkpoint of an older bnvit) is not compared.
    """
    found = []
    for key, value in current.items():
        if key not in saved:
            continue
        old = saved[key]
        if isinstance(old, dict) and isinstance(value, dict):
            found += _differences(old, value, f"{prefix}{key}.")
        elif old != value:
            found.append(f"{prefix}{key}: checkpoint {old!r}, this call {value!r}")
    return found


def restore(folder: Path, parts: Resumable, epochs: int, map_location: torch.device) -> History | None:
    """Load the newest checkpoint in `folder` into `parts` and return its History; `None` if there is none.

    Raises:
        ValueError: If the checkpoint is of another run (other arguments, model configuration,
            loss or data, more epochs, another model); the message names every difference.
    """
    saved = load_checkpoint(folder, map_location=map_location)
    if saved is None:
        return None
    differences = _differences(saved["run"], parts.run)
    if differences:
        raise ValueError(
            f"{folder} holds a checkpoint of a different run; use another checkpoint_dir or repeat its "
            "arguments:\n  " + "\n  ".join(differences)
        )
    if saved["epoch"] > epochs:
        raise ValueError(f"{folder} already holds {saved['epoch']} epochs, more than epochs={epochs}")
    mismatch = _checks.state_dict_mismatch(parts.model.state_dict(), saved["model"])
    if mismatch:
        raise ValueError(f"the checkpoint in {folder} is for a different model: {mismatch}")
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    if parts.scheduler is not None and saved["scheduler"] is not None:
        parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.scaler is not None and saved["scaler"] is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    history = History.from_dict(saved["history"])
    history.meta.update(epochs=epochs)
    return history
