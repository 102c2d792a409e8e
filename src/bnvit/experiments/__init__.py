"""The article's reproduction harness: grids, resumable sweeps, claims with verdicts, reports, figures.

Modules, each one idea, importing training, data and the models, never imported by them:

- `grid`: `Cell`, `Settings`, `Experiment`, and the article's experiments as data;
- `sweep`: `run_sweep`, which trains the cells a folder does not hold yet (`results` reads and
  checks the results file; `folder` keeps a folder to one experiment and one process;
  `parallel` runs several cells at once, in worker processes or as Ray tasks);
- `estimate`: how long cells take, timed with `fit()` itself;
- `stats`, `claims`: curves, means, t-intervals and tests (scipy); the claims and their verdicts;
- `window`: the learning-rate window each model tolerates (`LR_WINDOW`, beyond the article);
  `TRANSFER`, also beyond it, asks whether the effect holds in timm's own ViT layout;
- `report`, `plots`: `report.md` and the figures;
- `cli`, `study`: the examples' command line, and the three-seed study's one command
  (`bnvit reproduce`).
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("scipy") is None:  # the verdicts' t tests
    raise ImportError("bnvit.experiments needs scipy: pip install 'bnvit[experiments]'")

from .claims import CLAIMS, Verdict, verdicts
from .cli import build_parser, run_cli
from .estimate import estimate_seconds
from .folder import FolderLock, FolderLockedError, sweep_lock
from .grid import (
    ARTICLE_FP32,
    ARTICLE_MLP,
    ARTICLE_VIT,
    COMPARE_DEPTHS,
    COMPARE_LR,
    DNN_BATCHNORM,
    EXPERIMENTS,
    LR_WINDOW,
    TRANSFER,
    Cell,
    Experiment,
    Settings,
)
from .parallel import SweepError
from .report import report_folder, write_report
from .results import load_results
from .stats import summarize, t_interval
from .sweep import run_sweep

__all__ = [
    "ARTICLE_FP32",
    "ARTICLE_MLP",
    "ARTICLE_VIT",
    "CLAIMS",
    "COMPARE_DEPTHS",
    "COMPARE_LR",
    "DNN_BATCHNORM",
    "EXPERIMENTS",
    "LR_WINDOW",
    "TRANSFER",
    "Cell",
    "Experiment",
    "FolderLock",
    "FolderLockedError",
    "Settings",
    "SweepError",
    "Verdict",
    "build_parser",
    "estimate_seconds",
    "load_results",
    "report_folder",
    "run_cli",
    "run_sweep",
    "summarize",
    "sweep_lock",
    "t_interval",
    "verdicts",
    "write_report",
]
