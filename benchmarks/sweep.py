"""Wall time of the article's whole sweep on a GPU: both models, every depth and learning rate of
its depth and learning-rate figures, 10 epochs each, with fit()'s defaults.
"""

from __future__ import annotations

import tempfile
import time

import torch

from bnvit.experiments import Cell, Settings, run_sweep
from bnvit.experiments.claims import VIT_MODELS

# lr 0.003: depths 4-7 (depth figure) and 2-4 (learning-rate figure); lr 0.005: depths 1-4.
GRID = {0.003: (2, 3, 4, 5, 6, 7), 0.005: (1, 2, 3, 4)}
MODELS = VIT_MODELS  # the harness's labels, as in the article's sweep (bnvit.experiments.claims.BUILT_AS)


def run(device: torch.device, root=None, smoke: bool = False) -> dict:
    settings = Settings(epochs=1, train_subset=200, test_subset=100) if smoke else Settings()
    grid = {0.003: (1,)} if smoke else GRID
    cells = [Cell(m, d, lr, 0) for lr, depths in grid.items() for d in depths for m in MODELS]
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        results = run_sweep(cells, settings, out, data_dir=root, device=device, progress=False, log=lambda *a: None)
        seconds = time.perf_counter() - began
    return {
        "runs": len(cells),
        "epochs": settings.epochs,
        "seconds": seconds,
        "final_val_acc": {r["key"]: r["test_acc"] for r in results},
    }
