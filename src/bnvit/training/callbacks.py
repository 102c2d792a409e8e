"""Callbacks for `fit()`: hooks at the start and end of a run and after every epoch.

Loggers rewrite their output from the run's `History`, so a resumed run logs each epoch once.
MLflow and TensorBoard are optional extras, imported when their logger is created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util.io import atomic_write_text
from .history import EpochRecord, History, finite_or_none

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

__all__ = ["CSVLogger", "Callback", "CallbackList", "JSONLLogger", "MLflowLogger", "TensorBoardLogger", "TrainState"]


class TrainState:
    """What callbacks can see of a running `fit()`."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, history: History, epochs: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.history = history
        self.epochs = epochs
        self.stop = False
        """Set to True in `on_epoch_end` to end the run after this epoch."""


class Callback:
    """Base class: override any of the hooks. Only rank 0 of a distributed run calls them."""

    def on_fit_start(self, state: TrainState) -> None:
        """Called once before the first epoch (also when resuming: `state.history` holds the past)."""

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        """Called after every completed epoch."""

    def on_fit_end(self, state: TrainState) -> None:
        """Called once when the run ends: finished, diverged or stopped."""


class CallbackList(Callback):
    """Several callbacks as one: each hook calls theirs in order.

    Examples:
        >>> CallbackList([Callback(), Callback()]).on_fit_end(None)
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_fit_start(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(state)

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(state, record)

    def on_fit_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(state)


class JSONLLogger(Callback):
    """One JSON line per epoch in `path`, plus a final line with the run's outcome.

    Examples:
        >>> logger = JSONLLogger("runs/a/log.jsonl")
        >>> history = fit(model, train, epochs=3, lr=1e-3, callbacks=[logger])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _write(self, history: History, final: bool = False) -> None:
        lines = [json.dumps(finite_or_none(asdict(r))) for r in history.records]
        if final:
            outcome = {"diverged_at": history.diverged_at, "diverged_step": history.diverged_step}
            lines.append(json.dumps({"end": True, **outcome}))
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def on_fit_start(self, state: TrainState) -> None:
        self._write(state.history)

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        self._write(state.history)

    def on_fit_end(self, state: TrainState) -> None:
        self._write(state.history, final=True)


class CSVLogger(Callback):
    """The `History` as a CSV table in `path`, rewritten after every epoch."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_fit_start(self, state: TrainState) -> None:
        state.history.to_csv(self.path)

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        state.history.to_csv(self.path)


class MLflowLogger(Callback):
    """Log parameters and per-epoch metrics to MLflow (the article tracked its runs with it).

    Args:
        experiment: MLflow experiment name.
        run_name: Name of the run.
        params: Parameters to log once at the start (the run's `History.meta` is added).
        tracking_uri: Where MLflow stores runs; MLflow's default if `None`.
    """

    def __init__(
        self,
        experiment: str = "bnvit",
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        try:
            import mlflow  # deferred: an optional extra, needed only by this logger
        except ImportError as err:
            raise ImportError('MLflowLogger needs MLflow: pip install "bnvit[mlflow]"') from err
        self.mlflow = mlflow
        self.experiment, self.run_name = experiment, run_name
        self.params, self.tracking_uri = params or {}, tracking_uri

    def on_fit_start(self, state: TrainState) -> None:
        if self.tracking_uri:
            self.mlflow.set_tracking_uri(self.tracking_uri)
        self.mlflow.set_experiment(self.experiment)
        self.mlflow.start_run(run_name=self.run_name)
        self.mlflow.log_params({**_flat(state.history.meta), **self.params})
        for record in state.history.records:
            self.on_epoch_end(state, record)

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        metrics = {k: v for k, v in asdict(record).items() if k != "epoch" and v is not None}
        self.mlflow.log_metrics(metrics, step=record.epoch)

    def on_fit_end(self, state: TrainState) -> None:
        if state.history.diverged:
            self.mlflow.set_tag("diverged_at", state.history.diverged_at)
        self.mlflow.end_run()


class TensorBoardLogger(Callback):
    """Write per-epoch scalars for TensorBoard into `log_dir`."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # deferred: optional extra (tensorboard)
        except ImportError as err:
            raise ImportError('TensorBoardLogger needs TensorBoard: pip install "bnvit[tensorboard]"') from err
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        for key, value in asdict(record).items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, record.epoch)
        self.writer.flush()

    def on_fit_end(self, state: TrainState) -> None:
        self.writer.close()


def _flat(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in meta.items()}
