"""How long a sweep will take: one short `fit()` per (model, depth) on synthetic batches, extrapolated.

The timing runs the training code itself (the loop, the optimizer, the precision, the
evaluation) rather than a copy of a training step, so the estimate follows the loop when it
changes. Synthetic data stands in for MNIST: the same shapes, uint8 images augmented on the
device like the `"fast"` pipeline (the `"torchvision"` pipeline is slower than this assumes).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from ..data import DeviceLoader
from ..device import resolve_device
from ..training import fit
from .grid import Cell, Settings
from .sweep import build_model

__all__ = ["estimate_seconds"]

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
        epochs=3,
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
    cells: Sequence[Cell], settings: Settings, device: str | torch.device = "auto", batches: int = 3
) -> float:
    """Seconds the cells will take: each (model, depth) timed by `fit` on a few batches, extrapolated.

    Args:
        cells: The cells to run.
        settings: Their settings (epochs, batch size, subsets, precision).
        device: Where they will run.
        batches: Training batches per timed epoch.
    """
    device = resolve_device(device)
    n_train = settings.train_subset or MNIST_TRAIN
    n_test = settings.test_subset or MNIST_TEST
    per_image = {
        (model, depth): _timed_epochs(Cell(model, depth, 1e-3, 0), settings, device, batches)
        for model, depth in sorted({(c.model, c.depth) for c in cells})
    }
    total = 0.0
    for cell in cells:
        per_train, per_eval = per_image[(cell.model, cell.depth)]
        # every epoch trains and scores the test set; the clean test set is scored once more at the end
        total += settings.epochs * (n_train * per_train + n_test * per_eval) + n_test * per_eval
    return total
