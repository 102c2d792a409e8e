"""How long a sweep will take: a few short `fit()` runs on synthetic batches, extrapolated.

Timing `fit` itself (not a copy of a step) keeps the estimate true as the loop changes. Each
model is timed at its smallest and largest depth and the depths between interpolated (cost per
image is a fixed part plus one per block). The timing is taken with the machine as busy as it is
then, so the estimate holds while that load stays; the commands print `load_note()` beside it.
`choose_workers` picks processes and threads.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence

import torch

from .._util.device import CpuThreads, resolve_device, resolve_precision
from ..data import DeviceLoader
from ..training import fit
from .grid import Cell, Settings
from .parallel import available_cores
from .sweep import build_model

__all__ = ["choose_workers", "estimate_seconds", "load_note", "measure_workers"]

MNIST_TRAIN, MNIST_TEST = 60_000, 10_000


def _timed_epochs(cell: Cell, settings: Settings, device: torch.device, batches: int) -> tuple[float, float]:
    """Seconds per training image and per evaluated image, from a short `fit` (its warm epochs only)."""
    g = torch.Generator().manual_seed(0)
    n_train, n_val = batches * settings.batch_size, min(settings.eval_batch_size, 500)
    images = torch.randint(0, 256, (n_train + n_val, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train + n_val,), generator=g)
    train = DeviceLoader(
        images[:n_train],
        labels[:n_train],
        batch_size=settings.batch_size,
        augment=settings.augment != "none",
        device=device,
    )
    val = DeviceLoader(images[n_train:], labels[n_train:], batch_size=n_val, shuffle=False, device=device)
    history = fit(
        build_model(cell),
        train,
        val,
        epochs=2,
        lr=cell.lr,
        batch_size=settings.batch_size,
        eval_batch_size=n_val,
        device=device,
        precision=settings.precision,
        seed=0,
        progress=False,
    )
    warm = history.records[1:] or history.records  # the first epoch pays for warm-up
    per_train = statistics.median(1.0 / r.images_per_sec for r in warm)
    per_eval = statistics.median(max(0.0, r.seconds - n_train / r.images_per_sec) / n_val for r in warm)
    return per_train, per_eval


def estimate_seconds(
    cells: Sequence[Cell],
    settings: Settings,
    device: str | torch.device = "auto",
    batches: int = 3,
    threads: int | None = None,
) -> float:
    """Seconds the cells will take: each model timed by `fit` on a few batches at two depths, extrapolated.

    Args:
        cells: The cells to run.
        settings: Their settings (epochs, batch size, subsets, precision).
        device: Where they will run.
        batches: Training batches per timed epoch (two epochs, the first a warm-up).
        threads: The CPU threads each cell will use (`--threads`), timed with that many.
    """
    device = resolve_device(device)
    n_train = settings.train_subset or MNIST_TRAIN
    n_test = settings.test_subset or MNIST_TEST
    depths: dict[str, set[int]] = {}
    for cell in cells:
        depths.setdefault(cell.model, set()).add(cell.depth)
    with CpuThreads(threads or None):
        measured = {
            (model, depth): _timed_epochs(Cell(model, depth, 1e-3, 0), settings, device, batches)
            for model, chosen in sorted(depths.items())
            for depth in sorted({min(chosen), max(chosen)})
        }
    per_image = {
        (model, depth): _interpolated(measured, model, min(chosen), max(chosen), depth)
        for model, chosen in depths.items()
        for depth in chosen
    }
    total = 0.0
    for cell in cells:
        per_train, per_eval = per_image[(cell.model, cell.depth)]
        # every epoch trains and scores the test set; the clean test set is scored once more at the end
        total += settings.epochs * (n_train * per_train + n_test * per_eval) + n_test * per_eval
    return total


def load_note() -> str:
    """What an estimate assumes of the rest of the machine, with its load now, for the line beside it.

    Examples:
        >>> load_note().startswith("it holds while the machine stays as busy as now")
        True
    """
    try:
        load = f" (load average {os.getloadavg()[0]:.1f} on {available_cores()} cores)"
    except (AttributeError, OSError):  # no load average on this system
        load = ""
    return f"it holds while the machine stays as busy as now{load}; other programs starting or stopping change it"


def _interpolated(
    measured: dict[tuple[str, int], tuple[float, float]], model: str, low: int, high: int, depth: int
) -> tuple[float, float]:
    """The seconds per image of `model` at `depth`, on the line through its two measured depths."""
    if low == high:
        return measured[(model, low)]
    share = (depth - low) / (high - low)
    return tuple(a + share * (b - a) for a, b in zip(measured[(model, low)], measured[(model, high)], strict=True))


def _throughput_worker(cell: Cell, settings: Settings, device: str, threads: int, batches: int, barrier, queue) -> None:
    torch.set_num_threads(threads)
    import timm  # noqa: F401  imported before the start line, so no process times its imports

    barrier.wait(timeout=600)  # every process starts training at the same time
    per_train, _ = _timed_epochs(cell, settings, torch.device(device), batches)
    queue.put(1.0 / per_train)


def measure_workers(
    cell: Cell, settings: Settings, device: str | torch.device, processes: int, threads: int, batches: int = 5
) -> float:
    """Training images per second of `processes` spawned processes at once, `threads` threads each, all told."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    args = (cell, settings, str(resolve_device(device)), threads, batches, barrier, queue)
    workers = [context.Process(target=_throughput_worker, args=args, daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        rates = [queue.get(timeout=900) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.terminate()
    return sum(rates)


def choose_workers(
    cells: Sequence[Cell],
    settings: Settings,
    device: str | torch.device = "auto",
    cores: int | None = None,
    log: Callable[[str], object] = print,
) -> tuple[int, int]:
    """The workers and threads per worker that train the most images per second (`--workers auto`).

    Times the largest model in 1, 2, 4... processes (cores divided among them) and in 1 process
    with 1 thread; prints the numbers and the choice.

    Returns:
        `(workers, threads per worker)`.
    """
    cores = cores or available_cores()
    largest = max(cells, key=lambda c: (c.depth, c.model))
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= cores} | {cores})
    candidates = [(n, max(1, cores // n)) for n in counts] + ([(1, 1)] if cores > 1 else [])
    rates = {(n, t): measure_workers(largest, settings, device, n, t) for n, t in candidates}
    best = max(rates, key=rates.get)
    measured = "; ".join(f"{n} x {t} thread{'s' * (t > 1)}: {rate:.0f} images/s" for (n, t), rate in rates.items())
    precision = resolve_precision(settings.precision, resolve_device(device))
    log(
        f"--workers auto: {best[0]} x {best[1]} thread{'s' * (best[1] > 1)} (processes x threads each, for "
        f"{largest.model} depth {largest.depth} in {precision}; measured: {measured})"
    )
    return best
