"""`fit()`: train a classifier and return its `History`; `evaluate()` and `recalibrate_bn()`.

`fit` is deliberately small: cross-entropy, top-1 accuracy, one optimizer, an optional
per-epoch scheduler. What it adds over a hand-written loop is what the article's
experiments need to be trustworthy:

- **divergence is a result**: a non-finite loss ends the run cleanly and is recorded;
- **reproducibility**: with `seed`, every epoch's randomness (data order, augmentation,
  dropout) is a function of `(seed, epoch)` only, so the same call gives the same History;
- **resumability**: with `checkpoint_dir`, the full state is saved after every epoch and a
  new call with the same folder continues where the last complete epoch ended, giving the
  same History as an uninterrupted run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import _checks
from ..device import autocast, resolve_device, resolve_precision
from . import checkpoint, fingerprint, inputs
from . import distributed as _ddp
from .callbacks import Callback, CallbackList, TrainState
from .history import EpochRecord, History

__all__ = ["evaluate", "fit", "recalibrate_bn"]

TrainData = Dataset | DataLoader | Iterable | tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


# ----------------------------------------------------------------------------- data


def _set_epoch(loader: Any, epoch: int) -> None:
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            return


def _seed_everything(seed: int) -> None:
    seed %= 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch; each process of a distributed run gets its own (dropout, augmentation)."""
    return (seed * 1_000_003 + epoch + rank * 0x9E3779B97F4A7C15) % 2**63


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Settings:
    """How every step of a run is taken, besides the model, the data and the optimizer.

    Attributes:
        world: The processes training together (`distributed.alone` for one process).
        precision: `"fp32"`, `"bf16"` or `"fp16"` (resolved).
        loss_fn: `(logits, labels) -> loss`.
        scaler: The fp16 gradient scaler, or None.
        max_grad_norm: Clip the gradient norm to this, or None.
        progress: Show a progress bar (rank 0 only).
        dtype: The model's dtype, which floating-point images are cast to.
        num_classes: The model's number of outputs: labels must lie in `[0, num_classes)`.
    """

    world: _ddp.Distributed
    precision: str = "fp32"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float | None = None
    progress: bool = False
    dtype: torch.dtype = torch.float32
    num_classes: int = 0

    @property
    def device(self) -> torch.device:
        return self.world.device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TrainData,
    *,
    batch_size: int = 5000,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy of `model` on `data`, in eval mode.

    Args:
        model: A classifier returning `(batch, num_classes)` logits.
        data: Anything `fit` accepts as data.
        batch_size: Batch size for datasets and tensors.
        device: Where to evaluate; the model is moved there.
        precision: `"fp32"`, `"bf16"`, `"fp16"` or `"auto"`.
        loss_fn: Loss; cross-entropy by default.

    Returns:
        `{"loss": ..., "acc": ..., "n": ...}`.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> images, labels = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
        >>> sorted(evaluate(ViTBNFFN(depth=1), (images, labels), device="cpu"))
        ['acc', 'loss', 'n']
    """
    world = _ddp.alone(device)
    settings = Settings(world, resolve_precision(precision, world.device), loss_fn or F.cross_entropy)
    loader = inputs.as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=world.device, seed=0)
    settings.num_classes = inputs.preflight(model.to(world.device), loader, "data", world.device)
    settings.dtype = inputs.model_dtype(model)
    return _evaluate(model, loader, settings, "evaluation")


def _evaluate(model: nn.Module, loader: Any, s: Settings, split: str = "validation") -> dict:
    """Loss and accuracy over `loader`, summed over every process of the world."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.int64)
    n, check, problem, where = 0, not inputs.checked_up_front(loader), None, f"{split} data"
    try:
        with torch.no_grad():
            for step, (images, labels) in enumerate(loader, start=1):
                problem = inputs.batch_problem(images, labels, s.num_classes) if check else None
                if problem is not None:  # the processes may hold different numbers of batches: agree after the loop
                    where = f"{split} data, batch {step}"
                    break
                images, labels = inputs.to_device(images, labels, s.device, s.dtype)
                with autocast(s.device, s.precision):
                    logits = model(images)
                loss_sum += s.loss_fn(logits.float(), labels).double() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                n += len(labels)
    finally:
        model.train(was_training)
    if check:
        inputs.raise_together(s.world, problem, where)
    loss, hits, n = s.world.sum(loss_sum, correct, n)
    return {"loss": loss / n, "acc": hits / n, "n": int(n)}


# ----------------------------------------------------------------------------- training


def fit(
    model: nn.Module,
    train: TrainData,
    val: TrainData | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 100,
    eval_batch_size: int = 5000,
    optimizer: str | OptimizerFactory = "adam",
    weight_decay: float = 0.0,
    scheduler: str | SchedulerFactory | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    compile: bool = False,
    seed: int | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    max_grad_norm: float | None = None,
    meta: dict[str, Any] | None = None,
    distributed: bool | str = "auto",
    sync_bn: bool = True,
) -> History:
    """Train `model` on `train` for `epochs` epochs, evaluating on `val` after each.

    **Several processes.** Started by `torchrun` (or inside an initialized process group),
    `fit` trains with `DistributedDataParallel`: each process takes its share of every batch,
    gradients are averaged, and the metrics are reduced over all processes, so every process
    returns the same `History`. `batch_size` is the *global* batch (each of `W` processes
    takes `batch_size / W`), so `batch_size=100` means the same training at any world size.
    With `sync_bn=True` the model's BatchNorms compute their statistics over the global batch
    too (torch's `SyncBatchNorm` on CUDA, `bnvit.training.distributed.CPUSyncBatchNorm` on the CPU); they are swapped in
    the model you pass for the duration of `fit` and swapped back at the end, so the trained
    weights are in your model, as plain BatchNorms, and the checkpoints load into a plain
    model. Only rank 0 writes checkpoints, shows progress and runs the callbacks;
    `checkpoint_dir` must be a folder every process can read (a shared filesystem), as every
    process resumes from it. See `bnvit.training.distributed` for how loaders are sharded.

    Args:
        model: A classifier returning `(batch, num_classes)` logits; moved to `device`.
        train: Training data: a `Dataset`, a `DataLoader`, a `bnvit.data.DeviceLoader`, or an
            `(images, labels)` pair of tensors (shuffled every epoch).
        val: Validation data, same kinds; evaluated after every epoch in eval mode.
        epochs: Number of epochs (an int >= 1).
        lr: Learning rate (> 0).
        batch_size: Batch size for datasets and tensors (loaders keep their own); the global
            batch of all processes together in a distributed run.
        eval_batch_size: Batch size for validation datasets and tensors (per process: it
            does not change the results).
        optimizer: `"adam"` (the article's), `"adamw"`, `"sgd"`, any name
            `timm.optim.create_optimizer_v2` knows, or a factory `params -> Optimizer`.
            Named optimizers exclude biases, norms, the CLS token and the positional
            embedding from weight decay (`model.no_weight_decay()`).
        weight_decay: Weight decay for named optimizers (a finite number >= 0).
        scheduler: `None`, `"cosine"` (cosine decay to 0 over `epochs`), or a factory
            `optimizer -> scheduler`; stepped once per epoch.
        loss_fn: `(logits, labels) -> loss`; cross-entropy by default.
        device: `"auto"` (CUDA when present), `"cpu"`, `"cuda"`, ... In a distributed run
            `"auto"` and `"cuda"` mean `cuda:LOCAL_RANK`.
        precision: `"auto"` (bf16 autocast on CUDA and on CPUs with native bf16, else fp32;
            see `resolve_precision`), `"fp32"`, `"bf16"`, `"fp16"` (CUDA only).
        compile: Train through `torch.compile(model)`.
        seed: Makes the run reproducible: each epoch's randomness is seeded from `(seed, epoch)`
            (and the rank, in a distributed run).
        callbacks: `bnvit.training.callbacks.Callback` objects (loggers, early stopping...); run by
            rank 0 only. A stop requested there stops every process.
        progress: Show a progress bar per epoch and a summary line after it (rank 0 only).
        checkpoint_dir: Save the full training state there after every epoch, and resume
            from it if it already holds a checkpoint of this run: the same arguments, model
            configuration, loss and data (`bnvit.training.fingerprint`). The process that
            writes there holds the folder's lock while it trains.
        max_grad_norm: Clip the gradient norm to this value.
        meta: Extra information stored in `History.meta`.
        distributed: `"auto"`: train with several processes when started by torchrun with
            `WORLD_SIZE > 1` (or inside an initialized process group of several processes);
            `True` to require it, `False` to train this process alone.
        sync_bn: In a distributed run, synchronize the BatchNorm statistics across processes.

    Returns:
        The `History` of the run. A run whose loss becomes non-finite (on any process) stops
        at once and is returned with `history.diverged_at` set; nothing is raised.

    Raises:
        ValueError: For invalid arguments (a NaN or infinite hyperparameter, in a named
            optimizer or one a factory built, is a configuration error, not a divergence), a
            model with no trainable parameter, empty data, labels outside `[0, num_classes)`, NaN or
            inf in the images, a model whose output does not fit the labels, a checkpoint of
            another run, or a global batch size not divisible by the number of processes; all
            checked before any training step (in a distributed run, on every process: if one
            fails, all raise). Data that cannot be checked whole up front (a `Dataset` or
            `DataLoader`) is checked batch by batch, each before its forward pass, so a refused
            batch never updates the BatchNorm statistics; see `bnvit.training.inputs`.
        FolderLockedError: If another process trains with the same `checkpoint_dir`.
        OSError: If `checkpoint_dir` cannot be written, or a save fails (a full disk): the
            message names the cause and the checkpoint that is still intact.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
        >>> history = fit(ViTBNFFN(depth=1), (images, labels), epochs=2, lr=1e-3, batch_size=32,
        ...               device="cpu", seed=0, progress=False)
        >>> len(history), history.diverged
        (2, False)

        Under torchrun, the same call trains with every process:
        `torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --epochs 1 --quick`.
    """
    # -- arguments, before anything expensive
    r = _Run(epochs, lr, batch_size, eval_batch_size, optimizer, weight_decay, scheduler, seed, max_grad_norm)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn must be a bool, got {sync_bn!r}")
    world = _ddp.setup(distributed, device) or _ddp.alone(device)
    device, main = world.device, world.is_main  # main: the process that writes, reports and runs callbacks
    s = Settings(world, resolve_precision(precision, device), loss_fn or F.cross_entropy, None, r.max_grad_norm)
    s.dtype = inputs.model_dtype(model)
    s.progress, hooks = progress and main, CallbackList(callbacks if main else ())
    run = r.record(s.precision)
    history = History(meta={**run, "epochs": r.epochs, **world.describe(sync_bn), **(meta or {})})

    model.to(device)
    claim = checkpoint.FolderClaim()  # the checkpoint folder, locked until fit returns
    with claim, _ddp.synced_batchnorm(model, enabled=world.world_size > 1 and sync_bn, device=device):
        # -- data, model, optimizer, resume: anything that can fail, before any collective
        with _ddp.fail_together(world):
            checkpoint_dir = claim.open(checkpoint_dir, main)
            data_seed = 0 if r.seed is None else r.seed
            train_loader = _prepared(model, train, "train", r.batch_size, True, data_seed, s)
            val_loader = None if val is None else _prepared(model, val, "val", r.eval_batch_size, False, 0, s)
            opt = _make_optimizer(model, r.optimizer, r.lr, r.weight_decay)
            sched = _make_scheduler(r.scheduler, opt, r.epochs)
            s.scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
            parts = checkpoint.Resumable(model, opt, sched, s.scaler, run)
            history = _resume(checkpoint_dir, parts, r.epochs, s, (train, val)) or history

        _agree(world, len(train_loader), history, checkpoint_dir)
        step_model, eval_model = _step_and_eval_models(model, world, compile)

        state = TrainState(model, opt, history, r.epochs)
        hooks.on_fit_start(state)
        start = r.epochs + 1 if history.diverged else history.epochs_done + 1  # a diverged run is finished
        for epoch in range(start, r.epochs + 1):
            if r.seed is not None:
                _seed_everything(_epoch_seed(r.seed, epoch, world.rank))
            _set_epoch(train_loader, epoch)
            current_lr, began = opt.param_groups[0]["lr"], time.perf_counter()
            result = _train_epoch(step_model, train_loader, opt, s, f"epoch {epoch}/{r.epochs}")
            train_seconds = time.perf_counter() - began
            if result["diverged_step"] is not None:
                history.diverged_at, history.diverged_step = epoch, result["diverged_step"]
                if checkpoint_dir is not None:
                    checkpoint.save_state(checkpoint_dir, epoch - 1, parts, history, world)
                break
            world.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: what it evaluates and saves
            val_metrics = {"loss": None, "acc": None} if val_loader is None else _evaluate(eval_model, val_loader, s)
            if sched is not None:
                sched.step()
            # the slowest process sets the pace; every History gets the same numbers
            train_seconds, seconds = world.max(train_seconds, time.perf_counter() - began)
            record = EpochRecord(
                epoch=epoch,
                train_loss=result["loss"],
                train_acc=result["acc"],
                val_loss=val_metrics["loss"],
                val_acc=val_metrics["acc"],
                lr=current_lr,
                seconds=seconds,
                images_per_sec=result["n"] / train_seconds,
            )
            history.append(record)
            if checkpoint_dir is not None:
                checkpoint.save_state(checkpoint_dir, epoch, parts, history, world)
            if s.progress:
                tqdm.write(_summary(record, r.epochs))
            hooks.on_epoch_end(state, record)
            state.stop = world.from_main(state.stop)  # a callback's request to stop stops every process
            if state.stop:
                break
        hooks.on_fit_end(state)
    return history


@dataclass
class _Run:
    """The arguments that define a run, checked; `record` is what History.meta and checkpoints keep of them."""

    epochs: int
    lr: float
    batch_size: int
    eval_batch_size: int
    optimizer: str | OptimizerFactory
    weight_decay: float
    scheduler: str | SchedulerFactory | None
    seed: int | None
    max_grad_norm: float | None

    def __post_init__(self) -> None:
        self.epochs = _checks.positive_int("epochs", self.epochs)
        self.lr = _checks.positive_float("lr", self.lr)
        self.batch_size = _checks.positive_int("batch_size", self.batch_size)
        self.eval_batch_size = _checks.positive_int("eval_batch_size", self.eval_batch_size)
        self.weight_decay = _checks.non_negative_float("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            self.max_grad_norm = _checks.positive_float("max_grad_norm", self.max_grad_norm)
        if self.seed is not None:
            self.seed = _checks.positive_int("seed", self.seed, minimum=0)

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
        )


def _resume(
    folder: Path | None, parts: checkpoint.Resumable, epochs: int, s: Settings, data: tuple[Any, Any]
) -> History | None:
    """The History of the run saved in `folder`, with its state loaded into `parts`; None if there is none.

    With a folder, the run's fingerprint (model configuration, loss, `data`) joins `parts.run`:
    what the checkpoints record and a resume must repeat.
    """
    if folder is not None:
        parts.run.update(fingerprint.describe_run(parts.model, s.loss_fn, *data))
    history = None if folder is None else checkpoint.restore(folder, parts, epochs, s.device)
    if history is not None and s.progress:
        left = f"epochs {history.epochs_done + 1}-{epochs} to go" if history.epochs_done < epochs else "nothing left"
        left = f"it diverged in epoch {history.diverged_at}, nothing left" if history.diverged else left
        tqdm.write(f"resuming from epoch {history.epochs_done} of {epochs} (checkpoint_dir {folder}): {left}")
    return history


def _agree(world: _ddp.Distributed, batches: int, history: History, checkpoint_dir: Path | None) -> None:
    """Check that every process found the same number of batches and the same epoch to resume from."""
    world.check_same("the number of training batches per epoch", batches)
    if checkpoint_dir is not None:
        hint = f"; checkpoint_dir {checkpoint_dir} must be a folder every process sees (a shared filesystem)"
        world.check_same("the epoch to resume from", history.epochs_done, hint)


def _prepared(model: nn.Module, data: Any, name: str, batch_size: int, train: bool, seed: int, s: Settings) -> Any:
    """`data` as this process's loader, checked against the model (which sets `s.num_classes`)."""
    loader = inputs.as_loader(data, name=name, batch_size=batch_size, shuffle=train, device=s.device, seed=seed)
    loader = _ddp.shard(loader, s.world, name=name, train=train, seed=seed)
    s.num_classes = inputs.preflight(model, loader, name, s.device)
    return inputs.without_last_one(model, loader, s.device, warn=s.world.is_main) if train else loader


def _step_and_eval_models(model: nn.Module, world: _ddp.Distributed, compile: bool) -> tuple[nn.Module, nn.Module]:
    """The module training steps go through (DDP-wrapped, compiled) and the one evaluation uses.

    Evaluation bypasses DistributedDataParallel: no collective per batch there.
    """
    wrapped = _ddp.wrap(model, world)
    if not compile:
        return wrapped, model
    step_model = torch.compile(wrapped)
    return step_model, step_model if wrapped is model else torch.compile(model)


def _train_epoch(model: nn.Module, loader: Any, opt: torch.optim.Optimizer, s: Settings, desc: str) -> dict[str, Any]:
    """One pass over `loader`. Checks the loss for non-finite values every `check_every` steps.

    The processes of the world agree at every check (a non-finite loss on one stops all of
    them at the same step) and the returned metrics are those of all processes.
    """
    model.train()
    check_every = 1 if s.device.type == "cpu" else 25  # on GPUs, avoid a host sync every step
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.int64)
    finite = torch.ones((), device=s.device, dtype=torch.bool)
    n, check = 0, not inputs.checked_up_front(loader)  # tensor data was checked whole before training
    bar = tqdm(total=len(loader), desc=desc, leave=False, disable=not s.progress, unit="batch")
    try:
        for step, (images, labels) in enumerate(loader, start=1):
            if check:  # before the forward pass: a refused batch never reaches BatchNorm's statistics
                problem = inputs.batch_problem(images, labels, s.num_classes)
                inputs.raise_together(s.world, problem, f"train data, batch {step} of {desc}")
            images, labels = inputs.to_device(images, labels, s.device, s.dtype)
            with autocast(s.device, s.precision):
                logits = model(images)
            loss = s.loss_fn(logits.float(), labels)
            _step(model, opt, loss, s)
            loss = loss.detach()
            finite &= torch.isfinite(loss)
            loss_sum += loss.double() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            n += len(labels)
            if step % check_every == 0 or step == len(loader):
                if not s.world.all_true(finite):
                    if s.progress:
                        tqdm.write(f"{desc}: loss became non-finite at step {step}; stopping")
                    return {"diverged_step": step, "loss": float("nan"), "acc": float("nan"), "n": n}
                if s.progress:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.2%}", refresh=False)
    finally:
        bar.close()
    loss_total, hits, n = s.world.sum(loss_sum, correct, n)
    return {"diverged_step": None, "loss": loss_total / n, "acc": hits / n, "n": int(n)}


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, s: Settings) -> None:
    """Backward pass, optional gradient clipping and the optimizer step (through the fp16 scaler if any)."""
    opt.zero_grad(set_to_none=True)
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(opt)
    else:
        loss.backward()
    if s.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
    if s.scaler is not None:
        s.scaler.step(opt)
        s.scaler.update()
    else:
        opt.step()


def _summary(record: EpochRecord, epochs: int) -> str:
    text = f"epoch {record.epoch}/{epochs}  loss {record.train_loss:.4f}  acc {record.train_acc:.2%}"
    if record.val_acc is not None:
        text += f"  val_loss {record.val_loss:.4f}  val_acc {record.val_acc:.2%}"
    return text + f"  {record.seconds:.1f} s  {record.images_per_sec:.0f} img/s"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


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


# ----------------------------------------------------------------------------- BatchNorm statistics


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: TrainData,
    num_batches: int | None = None,
    *,
    batch_size: int = 100,
    device: str | torch.device = "auto",
) -> nn.Module:
    """Recompute every BatchNorm's running statistics with the weights frozen ("precise BN").

    The running statistics are reset and replaced by the exact average of the per-batch
    statistics over `num_batches` batches (all of `data` if `None`), computed with the
    model's other layers (dropout, ...) in eval mode. Useful after fine-tuning, before
    `fold_batchnorm`, or when training ended with a large learning rate.

    Args:
        model: The model; modified in place and returned.
        data: Anything `fit` accepts as data (use the training distribution).
        num_batches: How many batches to average over.
        batch_size: Batch size for datasets and tensors.
        device: Where to run.

    Returns:
        `model`, in the mode it was in.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> model = recalibrate_bn(ViTBNFFN(depth=1), (torch.rand(50, 1, 28, 28), torch.zeros(50, dtype=torch.long)),
        ...                        device="cpu")
        >>> int(model.blocks[0].ffn.norm.bn.num_batches_tracked)
        1
    """
    if num_batches is not None:
        num_batches = _checks.positive_int("num_batches", num_batches)
    device = resolve_device(device)
    loader = inputs.as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=device, seed=0)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError("the model has no BatchNorm layer with running statistics to recalibrate")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.to(device).eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over batches
        m.train()
    try:
        for step, (images, _) in enumerate(loader, start=1):
            model(inputs.to_device(images, images, device, inputs.model_dtype(model))[0])
            if num_batches is not None and step >= num_batches:
                break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model
