"""The article's reproduction harness: grids, resumable sweeps, claims with verdicts, reports, figures.

`grid` (cells, experiments), `sweep` with `results`, `folder` and `parallel`, `estimate`,
`stats` / `protocol` / `claims`, `window` and `transfer` (beyond the article), `report` /
`plots`, and `cli` / `study` (`bnvit reproduce`). Nothing below imports it.
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
