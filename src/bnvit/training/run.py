"""What defines a run of `fit`: its arguments, checked once, how each step is taken, and the optimizer and scheduler."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from .._util import checks as _checks
from .world import World

__all__ = ["OptimizerFactory", "Run", "SchedulerFactory", "StepSettings", "optimizer_and_scheduler"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass(frozen=True, kw_only=True)
class Run:
    """The arguments that define a run, checked once; `record` is what History.meta and checkpoints keep of them.

    Examples:
        >>> Run(epochs=2, lr=1e-3, batch_size=100, eval_batch_size=5000, optimizer="adam", weight_decay=0.0,
        ...     scheduler=None, seed=0, max_grad_norm=None).record("fp32")["optimizer"]
        'adam'
        >>> Run(epochs=0, lr=1e-3, batch_size=100, eval_batch_size=5000, optimizer="adam", weight_decay=0.0,
        ...     scheduler=None, seed=None, max_grad_norm=None)
        Traceback (most recent call last):
        ...
        ValueError: epochs must be an int >= 1, got 0
    """

    epochs: int
    lr: float
    batch_size: int
    eval_batch_size: int
    optimizer: str | OptimizerFactory
    weight_decay: float
    scheduler: str | SchedulerFactory | None
    seed: int | None
    max_grad_norm: float | None
    log_every: int | None = None  # a measurement, not part of what makes the run: not in `record`
    precise_bn: int | None = None

    def __post_init__(self) -> None:
        checked = dict(
            epochs=_checks.positive_int("epochs", self.epochs),
            lr=_checks.positive_float("lr", self.lr),
            batch_size=_checks.positive_int("batch_size", self.batch_size),
            eval_batch_size=_checks.positive_int("eval_batch_size", self.eval_batch_size),
        )
        checked["weight_decay"] = _checks.non_negative_float("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            checked["max_grad_norm"] = _checks.positive_float("max_grad_norm", self.max_grad_norm)
        if self.seed is not None:
            checked["seed"] = _checks.positive_int("seed", self.seed, minimum=0)
        if self.log_every is not None:
            checked["log_every"] = _checks.positive_int("log_every", self.log_every)
        if self.precise_bn is not None:
            checked["precise_bn"] = _checks.positive_int("precise_bn", self.precise_bn)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def record(self, precision: str) -> dict[str, Any]:
        """The run's arguments as plain values (factories by their qualified names); a resume must repeat them."""
        return dict(
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer if isinstance(self.optimizer, str) else _qualname(self.optimizer),
            weight_decay=self.weight_decay,
            scheduler=self.scheduler
            if self.scheduler is None or isinstance(self.scheduler, str)
            else _qualname(self.scheduler),
            seed=self.seed,
            max_grad_norm=self.max_grad_norm,
            precision=precision,
            precise_bn=self.precise_bn,
        )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """How every step of a run is taken, besides the model, the data and the optimizer; set once.

    Attributes:
        world: The processes training together (a world of one for one process).
        precision: `"fp32"`, `"bf16"` or `"fp16"` (resolved).
        loss_fn: `(logits, labels) -> loss`.
        max_grad_norm: Clip the gradient norm to this, or None.
        progress: Show a progress bar (rank 0 only).
        dtype: The model's dtype, which floating-point images are cast to.
        num_classes: The model's number of outputs: labels must lie in `[0, num_classes)`.
        log_every: Record the training loss and accuracy every this many steps, or None.
        scaler: The gradient scaler, made from `precision`: enabled for fp16 only.
    """

    world: World
    precision: str = "fp32"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    max_grad_norm: float | None = None
    progress: bool = False
    dtype: torch.dtype = torch.float32
    num_classes: int = 0
    log_every: int | None = None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        enabled = self.precision == "fp16"  # a disabled scaler passes every call through: no branch in the step
        object.__setattr__(self, "scaler", torch.amp.GradScaler(self.device.type, enabled=enabled))

    @property
    def device(self) -> torch.device:
        return self.world.device


def optimizer_and_scheduler(model: nn.Module, r: Run) -> tuple[torch.optim.Optimizer, Any]:
    """The run's optimizer (timm's weight-decay groups for a name) and its per-epoch scheduler, or None."""
    optimizer = _make_optimizer(model, r.optimizer, r.lr, r.weight_decay)
    return optimizer, _make_scheduler(r.scheduler, optimizer, r.epochs)


def _make_optimizer(
    model: nn.Module, optimizer: str | OptimizerFactory, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer, refused if the model has nothing to train or any of its settings is not finite."""
    _checks.trainable_parameters(model)
    if callable(optimizer):
        opt = optimizer(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return _checks.finite_hyperparameters(opt)
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a name or a factory, got {optimizer!r}")
    names = list_optimizers()
    if optimizer.lower() not in names:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'adam', 'adamw', 'sgd', ... ({len(names)} in timm)")
    return _checks.finite_hyperparameters(create_optimizer_v2(model, opt=optimizer, lr=lr, weight_decay=weight_decay))


def _make_scheduler(scheduler: str | SchedulerFactory | None, opt: torch.optim.Optimizer, epochs: int) -> Any:
    if scheduler is None:
        return None
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if isinstance(scheduler, str):
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: None, 'cosine', or a factory optimizer -> scheduler")
    return scheduler(opt)
