"""`History`: what a training run measured, epoch by epoch, and whether it diverged."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._util.io import atomic_write_text

__all__ = ["EpochRecord", "History", "StepRecord"]


@dataclass
class EpochRecord:
    """The measurements of one epoch (from 1); accuracies in [0, 1], `val_*` `None` without validation data."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float
    images_per_sec: float


@dataclass
class StepRecord:
    """Mean training loss and accuracy over the `fit(log_every=N)` steps ending at `step` (counted from 1)."""

    step: int
    epoch: int
    train_loss: float
    train_acc: float


@dataclass
class History:
    """Per-epoch measurements of a `fit()` run.

    Attributes:
        records: One `EpochRecord` per completed epoch.
        diverged_at: The epoch in which the training loss became non-finite, or whose last step
            left the weights or optimizer state non-finite (it has no record), or `None`.
        diverged_step: The step (from 1 within that epoch) where it was detected.
        meta: Free-form run information (learning rate, batch size, model, device...).
        steps: With `fit(log_every=N)`, one `StepRecord` every N training steps; else empty.

    Examples:
        >>> h = History()
        >>> h.append(EpochRecord(1, 0.9, 0.7, 0.5, 0.85, 3e-3, 12.0, 5000.0))
        >>> h.val_acc, h.diverged
        ([0.85], False)
        >>> History.from_json(h.to_json()) == h
        True
    """

    records: list[EpochRecord] = field(default_factory=list)
    diverged_at: int | None = None
    diverged_step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)

    # -------------------------------------------------------------- access

    def append(self, record: EpochRecord) -> None:
        """Add the record of the next epoch."""
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epochs_done(self) -> int:
        """Number of completed epochs."""
        return len(self.records)

    @property
    def diverged(self) -> bool:
        """Whether the training loss became non-finite."""
        return self.diverged_at is not None

    def column(self, name: str) -> list[Any]:
        """One field of every record, e.g. `history.column("val_acc")`."""
        valid = [f.name for f in fields(EpochRecord)]
        if name not in valid:
            raise ValueError(f"unknown History column {name!r}; valid: {', '.join(valid)}")
        return [getattr(r, name) for r in self.records]

    @property
    def train_loss(self) -> list[float]:
        return self.column("train_loss")

    @property
    def train_acc(self) -> list[float]:
        return self.column("train_acc")

    @property
    def val_loss(self) -> list[float | None]:
        return self.column("val_loss")

    @property
    def val_acc(self) -> list[float | None]:
        return self.column("val_acc")

    @property
    def lr(self) -> list[float]:
        return self.column("lr")

    # -------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (safe for JSON and for `torch.load(weights_only=True)`)."""
        return dict(
            records=[asdict(r) for r in self.records],
            diverged_at=self.diverged_at,
            diverged_step=self.diverged_step,
            meta=dict(self.meta),
            steps=[asdict(r) for r in self.steps],
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Inverse of `to_dict`."""
        try:
            records = [EpochRecord(**r) for r in data["records"]]
            steps = [StepRecord(**r) for r in data.get("steps") or ()]
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a History dict: {err}") from err
        return cls(
            records=records,
            diverged_at=data.get("diverged_at"),
            diverged_step=data.get("diverged_step"),
            meta=dict(data.get("meta") or {}),
            steps=steps,
        )

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The History as JSON; written atomically to `path` if given. Non-finite floats become null."""
        text = json.dumps(finite_or_none(self.to_dict()), indent=None, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> History:
        """Read a History from a JSON string or a file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path) as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per epoch; written atomically to `path` if given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(EpochRecord)], lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow(asdict(record))
        text = buffer.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def __repr__(self) -> str:
        head = f"History({self.epochs_done} epochs"
        if self.diverged:
            head += f", diverged in epoch {self.diverged_at} at step {self.diverged_step}"
        if not self.records:
            return head + ")"
        lines = [head + "):", "  epoch  train_loss  train_acc  val_loss  val_acc        lr   seconds  img/s"]
        for r in self.records:
            val_loss = "-" if r.val_loss is None else f"{r.val_loss:.4f}"
            val_acc = "-" if r.val_acc is None else f"{r.val_acc:.2%}"
            lines.append(
                f"  {r.epoch:5d}  {r.train_loss:10.4f}  {r.train_acc:9.2%}  {val_loss:>8}  {val_acc:>7}"
                f"  {r.lr:8.2g}  {r.seconds:8.1f}  {r.images_per_sec:5.0f}"
            )
        return "\n".join(lines)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float (nan, inf) replaced by `None`, for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, Iterable) and not isinstance(obj, str):
        return [finite_or_none(v) for v in obj]
    return obj
