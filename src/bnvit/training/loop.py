"""`fit()`: train a classifier and return its `History` (`evaluate()` and `recalibrate_bn()` import from here too).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._util.device import CpuThreads, autocast, resolve_precision
from . import checkpoint, fingerprint, inputs
from .callbacks import Callback, CallbackList, TrainState
from .evaluation import evaluate
from .evaluation import evaluate_loader as _evaluate
from .history import EpochRecord, History, StepRecord
from .inputs import TrainData
from .recalibrate import recalibrate_bn
from .run import OptimizerFactory, Run, SchedulerFactory, StepSettings, optimizer_and_scheduler
from .world import World, setup

__all__ = ["evaluate", "fit", "recalibrate_bn"]


# ----------------------------------------------------------------------------- data


def _set_epoch(loader: Any, epoch: int) -> None:
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            return


def _start_epoch(loader: Any, epoch: int, seed: int | None, rank: int) -> None:
    """Seed the epoch's randomness (with a seed) and tell the loader which epoch it is."""
    if seed is not None:
        _seed_everything(_epoch_seed(seed, epoch, rank))
    _set_epoch(loader, epoch)


def _seed_everything(seed: int) -> None:
    seed %= 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch; each process of a distributed run gets its own (dropout, augmentation)."""
    return (seed * 1_000_003 + epoch + rank * 0x9E3779B97F4A7C15) % 2**63


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
    threads: int | str | None = None,
    seed: int | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    max_grad_norm: float | None = None,
    meta: dict[str, Any] | None = None,
    distributed: bool | str = "auto",
    sync_bn: bool = True,
    log_every: int | None = None,
    precise_bn: int | None = None,
) -> History:
    """Train `model` on `train` for `epochs` epochs, evaluating on `val` after each.

    **Several processes.** Started by `torchrun` (or inside an initialized process group),
    `fit` trains with `DistributedDataParallel`: each process takes its share of every batch,
    gradients are averaged, and the metrics are reduced over all processes, so every process
    returns the same `History`. `batch_size` is the *global* batch (each of `W` processes
    takes `batch_size / W`), so `batch_size=100` means the same training at any world size.
    With `sync_bn=True` the model's BatchNorms compute their statistics over the global batch
    too (torch's `SyncBatchNorm` on CUDA, `bnvit.models.batchnorm.CPUSyncBatchNorm` on the CPU); they are swapped in
    the model you pass for the duration of `fit` and swapped back at the end, so the trained
    weights are in your model, as plain BatchNorms, and the checkpoints load into a plain
    model. Only rank 0 writes checkpoints, shows progress and runs the callbacks;
    `checkpoint_dir` must be a folder every process can read (a shared filesystem), as every
    process resumes from it. See `bnvit.training.sharding` for how loaders are sharded.

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
        threads: PyTorch's CPU threads while training on the CPU: None leaves them as they are;
            an int sets them for the run; `"auto"` follows the cores that other programs leave
            free, re-checked every second (`bnvit._util.device.CpuThreads`), at most as
            many as before: the choice on a machine that is also doing something else, where
            a core taken away makes spinning threads crawl (docs/training.md). With `"auto"`
            a seeded run repeats exactly only under the same load. The counts used are in
            `history.meta["cpu_threads"]`.
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
        log_every: Also record the training loss and accuracy every `log_every` steps, as means
            over those steps (windows restart at each epoch), in `History.steps`: how fast a model
            learns within an epoch.
        precise_bn: After every epoch, recompute the BatchNorm running statistics on this many
            training batches with the weights frozen (`recalibrate_bn`, "precise BN") before
            the model is evaluated and saved. The weights train exactly as without it; the
            statistics that validation and inference use are the current weights' own,
            instead of a running average that lags them. Costs that many forward passes per
            epoch (docs/training.md).

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
        FolderLockedError: If another `fit` (process or thread) trains with the same `checkpoint_dir`.
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
    _check_types(model=model, sync_bn=sync_bn, threads=threads)
    r = Run(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        scheduler=scheduler,
        seed=seed,
        max_grad_norm=max_grad_norm,
        log_every=log_every,
        precise_bn=precise_bn,
    )
    world = setup(distributed, device)  # one process or many: the loop below never asks which
    device, main = world.device, world.is_main  # main: the process that writes, reports and runs callbacks
    precision, hooks = resolve_precision(precision, device), CallbackList(callbacks if main else ())
    run = r.record(precision)
    history = History(meta={**run, "epochs": r.epochs, **world.describe(sync_bn), **(meta or {})})

    with (
        (claim := checkpoint.FolderClaim()),  # a lock on checkpoint_dir
        world.synced_batchnorm(model.to(device), sync_bn),
        (cpu_threads := CpuThreads(None if threads == "auto" and device.type != "cpu" else threads)),
    ):
        # -- data, model, optimizer, resume: anything that can fail, before any collective
        with world.fail_together():
            checkpoint_dir = claim.open(checkpoint_dir, main)
            train_loader, val_loader, s = _data_and_settings(
                model, train, val, r, world, precision=precision, loss_fn=loss_fn, progress=progress and main
            )
            opt, sched = optimizer_and_scheduler(model, r)
            parts = checkpoint.Resumable(model, opt, sched, s.scaler, run)
            history = _resume(checkpoint_dir, parts, r.epochs, s, (train, val)) or history

        _agree(world, len(train_loader), history, checkpoint_dir)
        step_model, eval_model = _step_and_eval_models(model, world, compile)

        state = TrainState(model, opt, history, r.epochs)
        hooks.on_fit_start(state)
        start = r.epochs + 1 if history.diverged else history.epochs_done + 1  # a diverged run is finished
        for epoch in range(start, r.epochs + 1):
            _start_epoch(train_loader, epoch, r.seed, world.rank)
            current_lr, began = opt.param_groups[0]["lr"], time.perf_counter()
            result = _train_epoch(step_model, train_loader, opt, s, epoch, r.epochs, cpu_threads.poll)
            train_seconds = time.perf_counter() - began
            history.steps += result["steps"]
            if result["diverged_step"] is None:
                result["diverged_step"] = _settle(step_model, train_loader, r, world, parts)
            if result["diverged_step"] is not None:
                _record_divergence(history, epoch, result["diverged_step"], checkpoint_dir, world)
                break
            val_metrics = {"loss": None, "acc": None} if val_loader is None else _evaluate(eval_model, val_loader, s)
            if sched is not None:
                sched.step()
            # the slowest process sets the pace; every History gets the same numbers
            train_seconds, seconds = world.max(train_seconds, time.perf_counter() - began)
            record = _epoch_record(epoch, result, val_metrics, current_lr, seconds, train_seconds)
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
    history.meta["cpu_threads"] = sorted(cpu_threads.used)
    return history


def _check_types(*, model: Any, sync_bn: Any, threads: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn must be a bool, got {sync_bn!r}")
    if not (threads is None or threads == "auto" or (type(threads) is int and threads >= 1)):
        raise ValueError(f"threads must be None, 'auto' or an int >= 1, got {threads!r}")


def _settle(step_model: nn.Module, loader: Any, r: Run, world: World, parts: checkpoint.Resumable) -> int | None:
    """After an epoch's steps: precise statistics if asked, rank 0's buffers everywhere, a check that all is finite.

    Returns None, or the epoch's last step if the last update left a non-finite weight or statistic.
    """
    if r.precise_bn is not None:  # the weights stay as trained; only the statistics change
        recalibrate_bn(step_model, loader, r.precise_bn, device=world.device)
    world.sync_buffers(parts.model)  # rank 0's BatchNorm statistics everywhere: what it evaluates and saves
    if not world.all_true(checkpoint.finite_state(parts)):  # the last update broke it, its loss finite
        return len(loader)
    return None


def _record_divergence(history: History, epoch: int, step: int, folder: Path | None, world: World) -> None:
    history.diverged_at, history.diverged_step = epoch, step
    if folder is not None:  # the last finite state stays: no checkpoint holds NaN
        checkpoint.save_divergence(folder, history, world)


def _resume(
    folder: Path | None, parts: checkpoint.Resumable, epochs: int, s: StepSettings, data: tuple[Any, Any]
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


def _agree(world: World, batches: int, history: History, checkpoint_dir: Path | None) -> None:
    """Check that every process found the same number of batches and the same epoch to resume from."""
    world.check_same("the number of training batches per epoch", batches)
    if checkpoint_dir is not None:
        hint = f"; checkpoint_dir {checkpoint_dir} must be a folder every process sees (a shared filesystem)"
        world.check_same("the epoch to resume from", history.epochs_done, hint)


def _data_and_settings(
    model: nn.Module,
    train: TrainData,
    val: TrainData | None,
    r: Run,
    world: World,
    *,
    precision: str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    progress: bool,
) -> tuple[Any, Any, StepSettings]:
    """This process's training and validation loaders, checked against the model, and the run's `StepSettings`."""
    train_loader, num_classes = _prepared(
        model, train, "train", r.batch_size, True, 0 if r.seed is None else r.seed, world
    )
    val_loader = None if val is None else _prepared(model, val, "val", r.eval_batch_size, False, 0, world)[0]
    settings = StepSettings(
        world=world,
        precision=precision,
        loss_fn=loss_fn or F.cross_entropy,
        max_grad_norm=r.max_grad_norm,
        progress=progress,
        dtype=inputs.model_dtype(model),
        num_classes=num_classes,
        log_every=r.log_every,
    )
    return train_loader, val_loader, settings


def _prepared(
    model: nn.Module, data: Any, name: str, batch_size: int, train: bool, seed: int, world: World
) -> tuple[Any, int]:
    """`data` as this process's loader, checked against the model, and the model's number of classes."""
    loader = inputs.as_loader(data, name=name, batch_size=batch_size, shuffle=train, device=world.device, seed=seed)
    loader = world.shard(loader, name=name, train=train, seed=seed)
    num_classes = inputs.preflight(model, loader, name, world.device)
    return (inputs.without_last_one(model, loader, world.device, warn=world.is_main) if train else loader), num_classes


def _step_and_eval_models(model: nn.Module, world: World, compile: bool) -> tuple[nn.Module, nn.Module]:
    """The module training steps go through (DDP-wrapped, compiled) and the one evaluation uses.

    Evaluation bypasses DistributedDataParallel: no collective per batch there.
    """
    wrapped = world.wrap(model)
    if not compile:
        return wrapped, model
    step_model = torch.compile(wrapped)
    return step_model, step_model if wrapped is model else torch.compile(model)


def _epoch_record(
    epoch: int, result: dict[str, Any], val: dict[str, Any], lr: float, seconds: float, train_seconds: float
) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        train_loss=result["loss"],
        train_acc=result["acc"],
        val_loss=val["loss"],
        val_acc=val["acc"],
        lr=lr,
        seconds=seconds,
        images_per_sec=result["n"] / train_seconds,
    )


def _train_epoch(
    model: nn.Module,
    loader: Any,
    opt: torch.optim.Optimizer,
    s: StepSettings,
    epoch: int,
    epochs: int,
    poll_threads: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Epoch `epoch` of `epochs`: one pass over `loader`, checking the loss every `check_every` steps.

    The processes of the world agree at every check (a non-finite loss on one stops all of
    them at the same step) and the returned metrics are those of all processes.
    """
    model.train()
    check_every = 1 if s.device.type == "cpu" else 25  # on GPUs, avoid a host sync every step
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.int64)
    finite = torch.ones((), device=s.device, dtype=torch.bool)
    n, check = 0, not inputs.checked_up_front(loader)  # tensor data was checked whole before training
    desc, first = f"epoch {epoch}/{epochs}", (epoch - 1) * len(loader)  # first: the steps before this epoch
    steps: list[StepRecord] = []  # every s.log_every steps: the means over those steps
    mark = (loss_sum.clone(), correct.clone(), 0)
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
            poll_threads()
            loss = loss.detach()
            finite &= torch.isfinite(loss)
            loss_sum += loss.double() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            n += len(labels)
            if s.log_every and step % s.log_every == 0:  # the means over the last log_every steps
                window = s.world.sum(loss_sum - mark[0], correct - mark[1], n - mark[2])
                steps.append(StepRecord(first + step, epoch, window[0] / window[2], window[1] / window[2]))
                mark = (loss_sum.clone(), correct.clone(), n)
            if step % check_every == 0 or step == len(loader):
                if not s.world.all_true(finite):
                    if s.progress:
                        tqdm.write(f"{desc}: loss became non-finite at step {step}; stopping")
                    return {"diverged_step": step, "loss": float("nan"), "acc": float("nan"), "n": n, "steps": steps}
                if s.progress:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.2%}", refresh=False)
    finally:
        bar.close()
    loss_total, hits, n = s.world.sum(loss_sum, correct, n)
    return {"diverged_step": None, "loss": loss_total / n, "acc": hits / n, "n": int(n), "steps": steps}


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, s: StepSettings) -> None:
    """Backward pass, optional gradient clipping and the optimizer step, through the scaler (a no-op but for fp16)."""
    opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(opt)
    if s.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
    s.scaler.step(opt)
    s.scaler.update()


def _summary(record: EpochRecord, epochs: int) -> str:
    text = f"epoch {record.epoch}/{epochs}  loss {record.train_loss:.4f}  acc {record.train_acc:.2%}"
    if record.val_acc is not None:
        text += f"  val_loss {record.val_loss:.4f}  val_acc {record.val_acc:.2%}"
    return text + f"  {record.seconds:.1f} s  {record.images_per_sec:.0f} img/s"
