"""Resumable sweeps: train every cell not yet recorded in the folder, one results line per cell.

Each cell's `History` is appended to `results.jsonl` atomically; a rerun skips finished cells
and resumes an unfinished one from its checkpoint. Cells can run in worker processes or as Ray
tasks (`bnvit.experiments.parallel`); only the calling process writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import data  # looked up at call time (data.mnist_loaders...), so a test may wrap a loader
from .._util.device import resolve_device, resolve_precision
from .._util.io import append_line_atomic
from ..training import evaluate, fit
from ..training.history import finite_or_none
from .claims import BUILT_AS
from .folder import check_not_foreign, prepare_folder, sweep_lock
from .grid import Cell, Settings
from .parallel import LocalProcesses, RayTasks, SweepError, available_cores, check_ray, check_workers, run_jobs
from .results import RESULTS, SCHEMA, load_results, machine

__all__ = ["Job", "SweepError", "build_model", "run_sweep", "todo", "train_cell"]


def build_model(cell: Cell) -> torch.nn.Module:
    """The cell's model, initialized from its seed, built through its current name (`claims.BUILT_AS`)."""
    import timm  # deferred: importing timm takes seconds, and only a sweep or an estimate builds models

    torch.manual_seed(cell.seed)
    return timm.create_model(BUILT_AS.get(cell.model, cell.model), depth=cell.depth)


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


@dataclass(frozen=True)
class Job:
    """Everything a process needs to train one cell and return its results line (picklable)."""

    cell: Cell
    settings: Settings
    out: str
    data_dir: str | None
    device: str
    download: bool
    threads: int | None = None
    progress: bool = False


def train_cell(job: Job) -> str:
    """Train one cell (resuming from its checkpoint) and return its results line; writes no results file."""
    if job.threads:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.device)
    settings, cell = job.settings, job.cell
    began = time.perf_counter()
    train, val = data.mnist_loaders(
        job.data_dir,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        device=device,
        augment=None if settings.augment == "none" else settings.augment,
        test=settings.test,
        seed=cell.seed,
        train_subset=settings.train_subset,
        test_subset=settings.test_subset,
        download=job.download,
    )
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
        threads=job.threads or "auto",  # no count asked for: follow the cores other programs leave free
        seed=cell.seed,
        log_every=settings.log_every,
        progress=job.progress,
        checkpoint_dir=Path(job.out) / "checkpoints" / cell.key,
        meta=dataclasses.asdict(cell),
    )
    clean_acc = None
    if not history.diverged:
        images, labels = data.load_mnist(job.data_dir, train=False, download=job.download)
        n_clean = settings.test_subset or len(labels)  # the same first images as the augmented test subset
        clean = data.DeviceLoader(
            images[:n_clean], labels[:n_clean], batch_size=settings.eval_batch_size, shuffle=False, device=device
        )
        clean_acc = evaluate(model, clean, device=device)["acc"]
    return _record(cell, settings, history, clean_acc, device, began)


def _summary(line: str) -> str:
    result = json.loads(line)
    state = "diverged" if result["history"]["diverged_at"] else f"val_acc {result['test_acc']:.2%}"
    if result["clean_test_acc"] is not None:
        state += f", clean {result['clean_test_acc']:.2%}"
    return f"{result['seconds']:.0f} s: {state}"


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
    workers: int = 1,
    threads: int | None = None,
    ray: str | None = None,
    cells_per_gpu: int = 1,
) -> list[dict[str, Any]]:
    """Train every cell not yet in `out/results.jsonl` and record it there.

    Args:
        cells: The cells to run (see `Experiment.cells`).
        settings: Training settings shared by all cells.
        out: Output folder: `results.jsonl`, `sweep.json` and `checkpoints/<cell>/`.
        experiment: The experiment the folder belongs to (another's folder is refused); `None`: not checked.
        data_dir: Where MNIST is (else `BNVIT_DATA`, else the cache folder).
        device: `"auto"`, `"cpu"`, `"cuda"`...; several workers on CUDA use every visible GPU.
        progress: Show progress bars (one process only).
        download: Download MNIST with torchvision if it is not found.
        log: Where to print one line per cell.
        workers: Cells trained at once in spawned worker processes (call from under
            `if __name__ == "__main__":`); 1: in this process.
        threads: CPU threads per cell; default: the cores divided among the workers, 1 per Ray task.
        ray: Run cells as Ray tasks: `"local"`, `"auto"` or a cluster's `HOST:PORT`.
        cells_per_gpu: With Ray on CUDA, how many cells share a GPU.

    Returns:
        All results in the folder, old and new.

    Raises:
        ValueError: The folder holds other settings, another experiment's results or foreign
            files; a learning rate is not a finite number > 0; or the workers or Ray cannot run.
            Nothing is written then.
        FolderLockedError: Another process is sweeping the folder.
        SweepError: Some cells failed twice (the others are recorded).
    """
    out = Path(out)
    _check_cells(cells)
    check_not_foreign(out)  # before anything is read, downloaded or written there
    device = resolve_device(device)
    resolve_precision(settings.precision, device)  # refuse e.g. fp16 on a CPU before touching the folder
    if ray is not None:
        check_ray(ray)
    elif workers != 1:
        check_workers(workers)
    data.load_mnist(data_dir, train=False, download=download)
    if ray is not None or workers > 1:
        data.load_mnist(data_dir, train=True, download=download)  # found (or downloaded) once, before the workers
    with sweep_lock(out):
        prepare_folder(out, settings, experiment)
        remaining = todo(cells, out)
        if len(remaining) < len(cells):
            log(f"{len(cells) - len(remaining)} of {len(cells)} cells already in {out / RESULTS}; skipping them")
        if not remaining:
            return load_results(out)
        job = Job(remaining[0], settings, str(out), None if data_dir is None else str(data_dir), str(device), download)
        jobs = [dataclasses.replace(job, cell=cell) for cell in remaining]
        if ray is None and workers == 1:
            _run_here(jobs, threads, progress, log)
        else:
            _run_parallel(jobs, out, device, log, workers, threads, ray, cells_per_gpu)
        return load_results(out)


def _check_cells(cells: Sequence[Cell]) -> None:
    """Refuse cells no run can have (a NaN learning rate, say) before the folder is touched."""
    for cell in cells:
        if not (isinstance(cell.lr, (int, float)) and 0 < cell.lr < math.inf):
            raise ValueError(f"cell {cell.key}: the learning rate must be a finite number > 0, got {cell.lr!r}")


def _append(out: Path, line: str) -> None:
    key = json.loads(line)["key"]
    append_line_atomic(out / RESULTS, line, keep=lambda entry: json.loads(entry)["key"] != key)


def _run_here(jobs: Sequence[Job], threads: int | None, progress: bool, log: Callable[[str], object]) -> None:
    for index, job in enumerate(jobs, start=1):
        log(f"[{index}/{len(jobs)}] {job.cell.key}")
        line = train_cell(dataclasses.replace(job, threads=threads or job.threads, progress=progress))
        _append(Path(job.out), line)
        log(f"    done in {_summary(line)}")


def _run_parallel(
    jobs: Sequence[Job],
    out: Path,
    device: torch.device,
    log: Callable[[str], object],
    workers: int,
    threads: int | None,
    ray: str | None,
    cells_per_gpu: int,
) -> None:
    finished = 0

    def done(job: Job, line: str) -> None:
        nonlocal finished
        _append(out, line)
        finished += 1
        log(f"[{finished}/{len(jobs)}] {job.cell.key} done in {_summary(line)}")

    if ray is not None:
        threads = threads or 1
        gpus = 1.0 / cells_per_gpu if device.type == "cuda" else 0.0
        backend = RayTasks(ray, cpus=threads, gpus=gpus, slots=len(jobs))
        jobs = [dataclasses.replace(j, threads=threads, device=device.type) for j in jobs]  # Ray picks the GPU
        log(f"{len(jobs)} cells as Ray tasks ({threads} CPU{'s' * (threads > 1)}, {gpus:g} GPU each)")
    else:
        threads = threads or max(1, available_cores() // workers)
        devices = _devices(device)
        backend = LocalProcesses(workers, devices)
        jobs = [dataclasses.replace(j, threads=threads) for j in jobs]
        where = ", ".join(devices)
        each = f"{threads} thread{'s' * (threads > 1)} each"
        log(f"{len(jobs)} cells, {workers} at once in worker processes ({each}, on {where})")
    run_jobs(jobs, backend, train_cell, out, key=lambda j: j.cell.key, done=done, log=log)


def _devices(device: torch.device) -> list[str]:
    """Where local workers train: every visible GPU for `cuda` without an index, else `device`."""
    if device.type == "cuda" and device.index is None:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]
