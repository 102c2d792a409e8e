"""Resumable sweeps: train every cell not yet recorded in the folder, one results line per cell.

`run_sweep` trains each cell with `fit()` and appends its `History` to `results.jsonl`
atomically (every line is always complete JSON). Rerunning it skips finished cells and resumes
an unfinished one from its per-epoch checkpoint, so an interrupted sweep (Ctrl-C, SIGKILL, a
reboot) loses at most the epoch in progress. A diverged cell is a result like any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import data  # looked up at call time (data.mnist_loaders...), so a test may wrap a loader
from .._io import append_line_atomic
from ..device import resolve_device, resolve_precision
from ..training import evaluate, fit
from ..training.history import finite_or_none
from .folder import FolderLock, prepare_folder
from .grid import Cell, Settings
from .results import RESULTS, SCHEMA, load_results, machine

__all__ = ["build_model", "run_sweep", "todo"]


def build_model(cell: Cell) -> torch.nn.Module:
    """The cell's model, initialized from its seed."""
    import timm  # deferred: importing timm takes seconds, and only a sweep or an estimate builds models

    torch.manual_seed(cell.seed)
    return timm.create_model(cell.model, depth=cell.depth)


_build_model = build_model  # what run_sweep calls; tests replace it to count or interrupt model builds


def todo(cells: Sequence[Cell], out: str | os.PathLike) -> list[Cell]:
    """The cells not yet recorded in `out/results.jsonl`."""
    done = {r["key"] for r in load_results(out)}
    return [c for c in cells if c.key not in done]


def _record(cell: Cell, settings: Settings, history, clean_acc, device, began: float) -> str:
    record = dict(
        schema=SCHEMA,
        key=cell.key,
        cell=dataclasses.asdict(cell),
        settings=dataclasses.asdict(settings),
        history=history.to_dict(),
        test_acc=history.val_acc[-1] if history.records else None,
        clean_test_acc=clean_acc,
        device=str(device),
        precision=resolve_precision(settings.precision, device),
        machine=machine(device),
        seconds=time.perf_counter() - began,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return json.dumps(finite_or_none(record), allow_nan=False)


def run_sweep(
    cells: Sequence[Cell],
    settings: Settings,
    out: str | Path,
    *,
    experiment: str | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    download: bool = True,
    log: Callable[[str], object] = print,
) -> list[dict[str, Any]]:
    """Train every cell not yet in `out/results.jsonl` and record it there.

    Args:
        cells: The cells to run (see `Experiment.cells`).
        settings: Training settings shared by all cells.
        out: Output folder: `results.jsonl`, `sweep.json` and `checkpoints/<cell>/`.
        experiment: The experiment the folder belongs to (recorded in `sweep.json`; a folder
            of another experiment is refused). `None`: not checked.
        data_dir: Where MNIST is (else `BNVIT_DATA`, else the cache folder).
        device: `"auto"`, `"cpu"`, `"cuda"`...
        progress: Show progress bars.
        download: Download MNIST with torchvision if it is not found.
        log: Where to print one line per cell.

    Returns:
        All results in the folder, old and new.

    Raises:
        ValueError: The folder holds other settings or another experiment's results.
        FolderLockedError: Another process is sweeping the folder.
    """
    out = Path(out)
    device = resolve_device(device)
    resolve_precision(settings.precision, device)  # refuse e.g. fp16 on a CPU before touching the folder
    clean_images, clean_labels = data.load_mnist(data_dir, train=False, download=download)
    with FolderLock(out):
        prepare_folder(out, settings, experiment)
        remaining = todo(cells, out)
        if len(remaining) < len(cells):
            log(f"{len(cells) - len(remaining)} of {len(cells)} cells already in {out / RESULTS}; skipping them")
        n_clean = settings.test_subset or len(clean_labels)  # the same first images as the augmented test subset
        clean = data.DeviceLoader(
            clean_images[:n_clean],
            clean_labels[:n_clean],
            batch_size=settings.eval_batch_size,
            shuffle=False,
            device=device,
        )
        for index, cell in enumerate(remaining, start=1):
            train, val = data.mnist_loaders(
                data_dir,
                batch_size=settings.batch_size,
                eval_batch_size=settings.eval_batch_size,
                device=device,
                augment=None if settings.augment == "none" else settings.augment,
                test=settings.test,
                seed=cell.seed,
                train_subset=settings.train_subset,
                test_subset=settings.test_subset,
                download=download,
            )
            log(f"[{index}/{len(remaining)}] {cell.key}")
            began = time.perf_counter()
            model = _build_model(cell)
            history = fit(
                model,
                train,
                val,
                epochs=settings.epochs,
                lr=cell.lr,
                batch_size=settings.batch_size,
                eval_batch_size=settings.eval_batch_size,
                device=device,
                precision=settings.precision,
                seed=cell.seed,
                progress=progress,
                checkpoint_dir=out / "checkpoints" / cell.key,
                meta=dataclasses.asdict(cell),
            )
            clean_acc = None if history.diverged else evaluate(model, clean, device=device)["acc"]
            line = _record(cell, settings, history, clean_acc, device, began)
            append_line_atomic(out / RESULTS, line, keep=lambda entry, key=cell.key: json.loads(entry)["key"] != key)
            state = "diverged" if history.diverged else f"val_acc {history.val_acc[-1]:.2%}, clean {clean_acc:.2%}"
            log(f"    done in {json.loads(line)['seconds']:.0f} s: {state}")
        return load_results(out)
