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

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import _checks
from ..data import DeviceLoader
from .._io import check_writable
from ..device import PRECISIONS, autocast, resolve_device, resolve_precision
from . import distributed as _ddp
from .callbacks import Callback, TrainState
from .checkpoint import load_checkpoint, save_checkpoint
from .history import EpochRecord, History

__all__ = ["evaluate", "fit", "recalibrate_bn"]

TrainData = Dataset | DataLoader | Iterable | tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


# ----------------------------------------------------------------------------- data


def _as_loader(data: Any, *, name: str, batch_size: int, shuffle: bool, device: torch.device, seed: int) -> Any:
    """Turn what the user passed into something that yields `(images, labels)` batches."""
    if isinstance(data, (DeviceLoader, DataLoader)):
        loader = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        loader = DeviceLoader(data[0], data[1], batch_size=batch_size, shuffle=shuffle, device=device, seed=seed)
    elif isinstance(data, Dataset):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{name} dataset is empty")
        loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, pin_memory=device.type == "cuda")
    else:
        raise TypeError(
            f"{name} must be a Dataset, a DataLoader, a bnvit.data.DeviceLoader or an (images, labels) "
            f"pair of tensors, got {type(data).__name__}"
        )
    if len(loader) == 0:
        raise ValueError(f"{name} data yields no batches (empty dataset, or drop_last with fewer samples than a batch)")
    return loader


def _all_labels(loader: Any) -> torch.Tensor | None:
    """Every label of a loader when it is cheap to get them, else `None`."""
    labels = getattr(loader, "labels", None)
    if labels is None and isinstance(loader, DataLoader):
        labels = getattr(loader.dataset, "labels", getattr(loader.dataset, "targets", None))
    return labels if isinstance(labels, torch.Tensor) else None


def _preflight(model: nn.Module, loader: Any, name: str, device: torch.device) -> None:
    """Check, before training, that the model's output and the labels fit together."""
    images, labels = next(iter(loader))
    all_labels = _all_labels(loader)
    labels = all_labels if all_labels is not None else labels
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integer class indices, got dtype {labels.dtype}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images[:2].to(device))
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[0] != min(2, len(images)):
        raise ValueError(f"the model must return (batch, num_classes) logits, got shape {tuple(out.shape)}")
    num_classes = out.shape[1]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
            f"found labels from {low} to {high}"
        )


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
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    loader = _as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=device, seed=0)
    return _evaluate(model.to(device), loader, device, precision, loss_fn or F.cross_entropy)


def _evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    loss_fn: Callable,
    ddp: _ddp.Distributed | None = None,
) -> dict:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    try:
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = model(images)
                loss_sum += loss_fn(logits.float(), labels).double() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                n += len(labels)
    finally:
        model.train(was_training)
    if ddp is not None:  # every process evaluated its share
        loss, hits, n = ddp.sum(loss_sum, correct, n)
        return {"loss": loss / n, "acc": hits / n, "n": int(n)}
    return {"loss": float(loss_sum) / n, "acc": int(correct) / n, "n": n}


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
        weight_decay: Weight decay for named optimizers.
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
            from it if it already holds a checkpoint of this run.
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
        ValueError: For invalid arguments, empty data, labels outside `[0, num_classes)`, a
            model whose output does not fit the labels, a checkpoint of another run, or a
            global batch size not divisible by the number of processes; all checked before any
            training step (in a distributed run, on every process: if one fails, all raise).

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
    epochs = _checks.positive_int("epochs", epochs)
    lr = _checks.positive_float("lr", lr)
    batch_size = _checks.positive_int("batch_size", batch_size)
    eval_batch_size = _checks.positive_int("eval_batch_size", eval_batch_size)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_grad_norm is not None:
        max_grad_norm = _checks.positive_float("max_grad_norm", max_grad_norm)
    if seed is not None:
        seed = _checks.positive_int("seed", seed, minimum=0)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn must be a bool, got {sync_bn!r}")
    ddp = _ddp.setup(distributed, device)  # None: this process trains alone
    device = resolve_device(device) if ddp is None else ddp.device
    precision = resolve_precision(precision, device)
    main = ddp is None or ddp.is_main  # the process that writes and reports
    progress = progress and main
    loss_fn = loss_fn or F.cross_entropy

    model.to(device)
    with _ddp.synced_batchnorm(model, enabled=ddp is not None and sync_bn, device=device):
        # -- data, model, optimizer, resume: anything that can fail, before any collective
        with _ddp.fail_together(ddp):
            if checkpoint_dir is not None:
                checkpoint_dir = check_writable(checkpoint_dir, "checkpoint_dir") if main else Path(checkpoint_dir)
            data_seed = 0 if seed is None else seed
            train_loader = _as_loader(
                train, name="train", batch_size=batch_size, shuffle=True, device=device, seed=data_seed
            )
            val_loader = None
            if val is not None:
                val_loader = _as_loader(
                    val, name="val", batch_size=eval_batch_size, shuffle=False, device=device, seed=0
                )
            if ddp is not None:
                train_loader = _ddp.shard(train_loader, ddp, name="train", train=True, seed=data_seed)
                if val_loader is not None:
                    val_loader = _ddp.shard(val_loader, ddp, name="val", train=False, seed=0)
            _preflight(model, train_loader, "train", device)
            if val_loader is not None:
                _preflight(model, val_loader, "val", device)

            opt = _make_optimizer(model, optimizer, lr, weight_decay)
            sched = _make_scheduler(scheduler, opt, epochs)
            scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

            run = dict(
                lr=lr,
                batch_size=batch_size,
                optimizer=optimizer if isinstance(optimizer, str) else _qualname(optimizer),
                weight_decay=weight_decay,
                scheduler=scheduler if scheduler is None or isinstance(scheduler, str) else _qualname(scheduler),
                seed=seed,
                max_grad_norm=max_grad_norm,
                precision=precision,
            )
            where: dict[str, Any] = {"device": str(device)}
            if ddp is not None:  # the same on every process
                where = {"device": device.type, "world_size": ddp.world_size, "sync_bn": sync_bn}
            history = History(meta={**run, "epochs": epochs, **where, **(meta or {})})

            if checkpoint_dir is not None:
                saved = load_checkpoint(checkpoint_dir, map_location=device)
                if saved is not None:
                    history = _restore(saved, run, epochs, model, opt, sched, scaler, checkpoint_dir)
                    history.meta.update(epochs=epochs)

        eval_model = model
        step_model = model
        if ddp is not None:
            ddp.check_same("the number of training batches per epoch", len(train_loader))
            if checkpoint_dir is not None:
                hint = f"; checkpoint_dir {checkpoint_dir} must be a folder every process sees (a shared filesystem)"
                ddp.check_same("the epoch to resume from", history.epochs_done, hint)
            step_model = _ddp.wrap(model, ddp)  # evaluation bypasses it: no collective per batch there
        if compile:
            step_model = torch.compile(step_model)
            eval_model = step_model if ddp is None else torch.compile(model)

        state = TrainState(model, opt, history, epochs)
        if main:
            for callback in callbacks:
                callback.on_fit_start(state)

        start = history.epochs_done + 1
        if history.diverged:
            start = epochs + 1  # a diverged run is finished
        for epoch in range(start, epochs + 1):
            if seed is not None:
                _seed_everything(_epoch_seed(seed, epoch, 0 if ddp is None else ddp.rank))
            _set_epoch(train_loader, epoch)
            current_lr = opt.param_groups[0]["lr"]
            began = time.perf_counter()
            result = _train_epoch(
                step_model,
                train_loader,
                opt,
                scaler,
                loss_fn,
                device,
                precision,
                max_grad_norm,
                epoch,
                epochs,
                progress,
                ddp,
            )
            train_seconds = time.perf_counter() - began
            if result["diverged_step"] is not None:
                history.diverged_at, history.diverged_step = epoch, result["diverged_step"]
                if progress:
                    tqdm.write(
                        f"epoch {epoch}/{epochs}: loss became non-finite at step {result['diverged_step']}; stopping"
                    )
                if checkpoint_dir is not None:
                    _save_on_main(ddp, checkpoint_dir, epoch - 1, model, opt, sched, scaler, history, run)
                break
            if ddp is not None:
                ddp.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: what it evaluates and saves
            val_metrics = {"loss": None, "acc": None}
            if val_loader is not None:
                val_metrics = _evaluate(eval_model, val_loader, device, precision, loss_fn, ddp)
            if sched is not None:
                sched.step()
            seconds = time.perf_counter() - began
            if ddp is not None:  # the slowest process sets the pace; every History gets the same numbers
                train_seconds, seconds = ddp.max(train_seconds, seconds)
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
                _save_on_main(ddp, checkpoint_dir, epoch, model, opt, sched, scaler, history, run)
            if progress:
                tqdm.write(_summary(record, epochs))
            if main:
                for callback in callbacks:
                    callback.on_epoch_end(state, record)
            if ddp is not None:
                state.stop = ddp.from_main(state.stop)
            if state.stop:
                break

        if main:
            for callback in callbacks:
                callback.on_fit_end(state)
    return history


def _train_epoch(
    model: nn.Module,
    loader: Any,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss_fn: Callable,
    device: torch.device,
    precision: str,
    max_grad_norm: float | None,
    epoch: int,
    epochs: int,
    progress: bool,
    ddp: _ddp.Distributed | None = None,
) -> dict[str, Any]:
    """One pass over `loader`. Checks the loss for non-finite values every `check_every` steps.

    In a distributed run the processes agree at every check (a non-finite loss on one stops
    all of them at the same step) and the returned metrics are those of all processes.
    """
    model.train()
    check_every = 1 if device.type == "cpu" else 25  # on GPUs, avoid a host sync every step
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    finite = torch.ones((), device=device, dtype=torch.bool)
    n = 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress, unit="batch")
    try:
        for step, (images, labels) in enumerate(loader, start=1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            loss = loss_fn(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            loss = loss.detach()
            finite &= torch.isfinite(loss)
            loss_sum += loss.double() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            n += len(labels)
            if step % check_every == 0 or step == len(loader):
                all_finite = bool(finite) if ddp is None else ddp.all_true(finite)
                if not all_finite:
                    return {"diverged_step": step, "loss": float("nan"), "acc": float("nan"), "n": n}
                if progress:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.2%}", refresh=False)
    finally:
        bar.close()
    if ddp is not None:
        loss_total, hits, n = ddp.sum(loss_sum, correct, n)
        return {"diverged_step": None, "loss": loss_total / n, "acc": hits / n, "n": int(n)}
    return {"diverged_step": None, "loss": float(loss_sum) / n, "acc": int(correct) / n, "n": n}


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
    if callable(optimizer):
        opt = optimizer(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a name or a factory, got {optimizer!r}")
    from timm.optim import create_optimizer_v2, list_optimizers

    names = list_optimizers()
    if optimizer.lower() not in names:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'adam', 'adamw', 'sgd', ... ({len(names)} in timm)")
    return create_optimizer_v2(model, opt=optimizer, lr=lr, weight_decay=weight_decay)


def _make_scheduler(scheduler: str | SchedulerFactory | None, opt: torch.optim.Optimizer, epochs: int) -> Any:
    if scheduler is None:
        return None
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if isinstance(scheduler, str):
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: None, 'cosine', or a factory optimizer -> scheduler")
    return scheduler(opt)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        python=random.getstate(),
        numpy=[np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    )


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *others = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *others))


def _save_on_main(ddp: _ddp.Distributed | None, folder: Path, epoch: int, *state: Any) -> None:
    """Rank 0 saves; the others wait until the file is complete, so any of them may read it next."""
    if ddp is None or ddp.is_main:
        _save(folder, epoch, *state)
    if ddp is not None:
        ddp.barrier()


def _save(folder: Path, epoch: int, model, opt, sched, scaler, history: History, run: dict[str, Any]) -> None:
    save_checkpoint(
        folder,
        dict(
            epoch=epoch,
            model=model.state_dict(),
            config=getattr(model, "config", None),
            optimizer=opt.state_dict(),
            scheduler=None if sched is None else sched.state_dict(),
            scaler=None if scaler is None else scaler.state_dict(),
            rng=_rng_state(),
            history=history.to_dict(),
            run=run,
        ),
    )


def _restore(saved: dict, run: dict, epochs: int, model, opt, sched, scaler, folder: Path) -> History:
    differences = [
        f"{key}: checkpoint {saved['run'].get(key)!r}, this call {value!r}"
        for key, value in run.items()
        if saved["run"].get(key) != value
    ]
    if differences:
        raise ValueError(
            f"{folder} holds a checkpoint of a different run; use another checkpoint_dir or repeat its "
            "arguments:\n  " + "\n  ".join(differences)
        )
    if saved["epoch"] > epochs:
        raise ValueError(f"{folder} already holds {saved['epoch']} epochs, more than epochs={epochs}")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint in {folder} is for a different model: {err}") from err
    opt.load_state_dict(saved["optimizer"])
    if sched is not None and saved["scheduler"] is not None:
        sched.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    return History.from_dict(saved["history"])


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
    loader = _as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=device, seed=0)
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
            model(images.to(device))
            if num_batches is not None and step >= num_batches:
                break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model
