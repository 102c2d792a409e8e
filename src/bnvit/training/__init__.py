"""Training: the loop (`fit`, `evaluate`), checkpoint/resume, history, callbacks, the world of processes.

Imports the models' and data's layers, never the article harness. Device and precision
resolution lives one layer down in `bnvit._util.device`, so that inference needs no training code.
"""

from __future__ import annotations

from .._util.device import PRECISIONS, cpu_has_fast_bf16, resolve_device, resolve_precision
from .._util.io import FolderLockedError
from .callbacks import Callback, CSVLogger, JSONLLogger, MLflowLogger, TensorBoardLogger, TrainState
from .history import EpochRecord, History, StepRecord
from .loop import evaluate, fit, recalibrate_bn

__all__ = [
    "PRECISIONS",
    "CSVLogger",
    "Callback",
    "EpochRecord",
    "FolderLockedError",
    "History",
    "JSONLLogger",
    "MLflowLogger",
    "StepRecord",
    "TensorBoardLogger",
    "TrainState",
    "cpu_has_fast_bf16",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "resolve_device",
    "resolve_precision",
]
