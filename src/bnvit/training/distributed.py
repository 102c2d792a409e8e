"""Multi-process training: the DistributedDataParallel plumbing behind `fit(distributed=...)`.

`fit()` runs one loop for any number of processes: a run of one process is a `Distributed`
world of one (`alone`), whose collectives return their input and whose barrier returns at
once, so the loop has no single-process branches. For several processes:

1. `setup` decides whether the run is distributed (torchrun's `RANK`, `WORLD_SIZE` and
   `LOCAL_RANK` with `WORLD_SIZE > 1`, or a process group that is already initialized),
   picks this process's device (`cuda:LOCAL_RANK` on GPUs) and initializes the process
   group (nccl on CUDA, gloo on the CPU) if nobody has yet.
2. `synced_batchnorm` swaps every BatchNorm of the user's model for a synchronized one
   sharing its parameters and statistics, and swaps the originals back when training ends,
   so the trained weights are in the model the user passed, as plain BatchNorms.
3. `shard` gives this process its share of the data (see its docstring for the rules).
4. `fail_together` makes an error raised while setting up on one process raise on all of
   them, instead of leaving the others waiting forever in the first collective.
5. `wrap` puts the model in `DistributedDataParallel`; the `Distributed` object reduces the
   metrics, agrees on divergence, and tells `fit` which process is rank 0 (the only one
   that writes checkpoints, logs and runs callbacks).

**Batch size.** `fit(batch_size=...)` is the *global* batch: with 4 processes and
`batch_size=100`, each process takes 25 images per step and the gradient is that of the 100,
so a run means the same training at any world size (with `sync_bn=True` the BatchNorm
statistics are those of the 100 images too). It must be divisible by the world size.

**BatchNorm on the CPU.** `torch.nn.SyncBatchNorm` only synchronizes CUDA (and a few other
accelerator) tensors, and `DistributedDataParallel` refuses it in a CPU model. On CUDA the
BatchNorms become torch's `SyncBatchNorm`; on the CPU they become `CPUSyncBatchNorm`, the
same computation built on `all_reduce` (gloo), so multi-process training, and its tests, run
on any machine.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from ..data import DeviceLoader
from ..device import resolve_device

__all__ = [
    "CPUSyncBatchNorm",
    "Distributed",
    "alone",
    "convert_batchnorm",
    "fail_together",
    "is_main_process",
    "local_device",
    "restore_batchnorm",
    "setup",
    "shard",
    "synced_batchnorm",
    "wrap",
]

MODES = (True, False, "auto")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu")  # where torch's own SyncBatchNorm synchronizes
_destroy_registered = False


# ----------------------------------------------------------------------------- the process group


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run, and the few collectives `fit` needs.

    Every method is a collective: all processes must call it, in the same order.

    Attributes:
        rank: This process's rank in `[0, world_size)`.
        world_size: Number of processes.
        local_rank: Rank among the processes on this machine (picks the GPU).
        device: This process's training device.
        backend: The process group's backend (`"gloo"`, `"nccl"`, ...).

    Examples:
        >>> ddp = setup("auto", "auto")  # doctest: +SKIP
        >>> if ddp is not None:  # doctest: +SKIP
        ...     loss, n = ddp.sum(local_loss_sum, local_count)
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and logs and runs callbacks."""
        return self.rank == 0

    def _tensor(self, values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def sum(self, *values: torch.Tensor | float) -> tuple[float, ...]:
        """Sums over all processes of scalar `values` (exact for counts below 2**53)."""
        buffer = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return tuple(buffer.tolist())

    def max(self, *values: float) -> tuple[float, ...]:
        """Maxima over all processes of scalar `values`."""
        buffer = self._tensor([float(v) for v in values])
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return tuple(buffer.tolist())

    def all_true(self, flag: torch.Tensor | bool) -> bool:
        """True if `flag` is true on every process (used to agree on divergence)."""
        buffer = torch.as_tensor(flag, device=self.device).reshape(1).to(torch.int32)
        dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
        return bool(buffer.item())

    def gather(self, value: int) -> list[int]:
        """`value` of every process, indexed by rank."""
        buffer = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        buffer[self.rank] = int(value)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return [int(v) for v in buffer.tolist()]

    def from_main(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every process (e.g. a callback's request to stop)."""
        buffer = self._tensor([float(flag)], dtype=torch.int32)
        dist.broadcast(buffer, src=0)
        return bool(buffer.item())

    def check_same(self, what: str, value: int, hint: str = "") -> None:
        """Raise `ValueError` on every process unless `value` is the same on all of them."""
        values = self.gather(value)
        if len(set(values)) > 1:
            raise ValueError(f"the processes disagree on {what}: {values} (by rank){hint}")

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics, ...)."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.backend == "nccl" and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def describe(self, sync_bn: bool) -> dict[str, Any]:
        """Where the run trains, for `History.meta`: the same on every process."""
        return {"device": self.device.type, "world_size": self.world_size, "sync_bn": sync_bn}


class _Alone(Distributed):
    """A world of one process: every collective returns its input, the barrier returns at once."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(rank=0, world_size=1, local_rank=0, device=device, backend="none")

    def sum(self, *values: torch.Tensor | float) -> tuple[float, ...]:
        return tuple(float(v) for v in values)

    def max(self, *values: float) -> tuple[float, ...]:
        return tuple(float(v) for v in values)

    def all_true(self, flag: torch.Tensor | bool) -> bool:
        return bool(flag)

    def gather(self, value: int) -> list[int]:
        return [int(value)]

    def from_main(self, flag: bool) -> bool:
        return bool(flag)

    def check_same(self, what: str, value: int, hint: str = "") -> None:
        pass

    def sync_buffers(self, model: nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass

    def describe(self, sync_bn: bool) -> dict[str, Any]:
        return {"device": str(self.device)}


def alone(device: str | torch.device = "auto") -> Distributed:
    """The world of a process that trains alone: rank 0 of 1 on `device`, with no process group.

    Examples:
        >>> world = alone("cpu")
        >>> world.is_main, world.world_size, world.sum(torch.tensor(2.0), 3)
        (True, 1, (2.0, 3.0))
    """
    return _Alone(resolve_device(device))


def is_main_process() -> bool:
    """False only in a process of an initialized process group whose rank is not 0.

    Examples:
        >>> is_main_process()
        True
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _torchrun_env() -> tuple[int, int, int] | None:
    """`(rank, world_size, local_rank)` from torchrun's environment, or None if it is not set."""
    if not all(name in os.environ for name in _TORCHRUN_ENV):
        return None
    values = []
    for name in _TORCHRUN_ENV:
        try:
            values.append(int(os.environ[name]))
        except ValueError as err:
            raise ValueError(f"environment variable {name}={os.environ[name]!r} must be an integer") from err
    rank, world_size, local_rank = values
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}"
        )
    return rank, world_size, local_rank


def _local_device(device: str | torch.device, local_rank: int) -> torch.device:
    """This process's device: `"auto"` and `"cuda"` mean the GPU `cuda:local_rank`."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"this process has LOCAL_RANK={local_rank}, but only {count} CUDA device(s) are visible; "
                f"start at most {count} processes per machine or use device='cpu'"
            )
        device = torch.device("cuda", local_rank)
    return device


def local_device(device: str | torch.device = "auto") -> torch.device:
    """The device `fit` trains on in this process: `cuda:LOCAL_RANK` on GPUs under torchrun.

    Build data loaders there so that `fit` does not have to move them.

    Examples:
        >>> local_device("cpu")
        device(type='cpu')
    """
    env = _torchrun_env()
    return _local_device(device, env[2] if env is not None else 0)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(distributed: bool | str, device: str | torch.device) -> Distributed | None:
    """Decide whether to train with several processes, and prepare this one.

    Args:
        distributed: `"auto"`: on when torchrun's `RANK`, `WORLD_SIZE` and `LOCAL_RANK` are
            set with `WORLD_SIZE > 1`, or when a process group of more than one process is
            already initialized. `True`: on (needs one of the two). `False`: off.
        device: `fit`'s device argument; `"auto"` and `"cuda"` become `cuda:LOCAL_RANK` on GPUs.

    Returns:
        `None` for a single-process run, else this process's `Distributed`. A process group
        initialized here (nccl for CUDA, gloo otherwise) stays up for later `fit` calls and
        is destroyed when the process exits.

    Examples:
        >>> setup(False, "cpu") is None
        True
    """
    global _destroy_registered
    if not any(distributed is mode or (isinstance(mode, str) and distributed == mode) for mode in MODES):
        raise ValueError(f"distributed must be True, False or 'auto', got {distributed!r}")
    if distributed is False:
        return None
    available = dist.is_available()
    initialized = available and dist.is_initialized()
    env = _torchrun_env()
    if distributed == "auto":
        wanted = dist.get_world_size() > 1 if initialized else env is not None and env[1] > 1
        if not wanted:
            return None
    elif not initialized and env is None:
        raise ValueError(
            "distributed=True needs several processes: start them with torchrun (which sets RANK, WORLD_SIZE, "
            "LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or call torch.distributed.init_process_group first"
        )
    if not available:
        raise ValueError("this PyTorch build has no torch.distributed; use distributed=False")

    if initialized:
        local_rank = env[2] if env is not None else dist.get_rank() % max(1, torch.cuda.device_count())
    else:
        local_rank = env[2]  # type: ignore[index]
    device = _local_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if initialized:
        backend = str(dist.get_backend())
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group uses nccl, which needs CUDA tensors, but the device is {device}")
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {}
        if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = device  # binds the GPU at once (torch >= 2.3)
        dist.init_process_group(backend=backend, **options)
        if not _destroy_registered:
            atexit.register(_destroy_process_group)
            _destroy_registered = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


@contextlib.contextmanager
def fail_together(ddp: Distributed | None) -> Iterator[None]:
    """Run a block that must not contain collectives; if it raises on any process, raise on all.

    The process that failed re-raises its own error; the others raise a `RuntimeError` naming
    the failed ranks. With `ddp=None` or a world of one, the block runs as it is.

    Examples:
        >>> with fail_together(None):
        ...     pass
    """
    if ddp is None or ddp.world_size == 1:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    failed = [rank for rank, flag in enumerate(ddp.gather(error is not None)) if flag]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"process(es) of rank {failed} failed while setting up training; see their error")


def wrap(model: nn.Module, ddp: Distributed) -> nn.Module:
    """`model` in `DistributedDataParallel` for this process's device; `model` itself in a world of one.

    Examples:
        >>> wrap(nn.Linear(2, 2), alone("cpu"))
        Linear(in_features=2, out_features=2, bias=True)
    """
    if ddp.world_size == 1:
        return model
    device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# ----------------------------------------------------------------------------- data


def _per_process_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        low = batch_size - batch_size % world_size
        options = f"{low} or {low + world_size}" if low else str(world_size)
        raise ValueError(
            f"batch size {batch_size} is the global batch (all {world_size} processes together) and must be "
            f"divisible by the world size {world_size}; use e.g. {options}"
        )
    return batch_size // world_size


def shard(loader: Any, ddp: Distributed, *, name: str, train: bool, seed: int) -> Any:
    """This process's share of `loader` (a `DeviceLoader` or a `DataLoader`).

    Rules:

    - In a world of one, the loader is used as it is.
    - A loader that is already sharded for this process (a `DeviceLoader` with this `rank`
      and `world_size`, a `DataLoader` with a `DistributedSampler` for this rank) is used as
      it is; its batch size is then per process.
    - Any other loader is re-created sharded, keeping its settings. For training its batch
      size is the global batch, so each process takes `batch_size / world_size` (which must
      divide), and the union of the processes' k-th batches is the k-th batch a single process
      would take from a `DeviceLoader` (a `DataLoader` gets a `DistributedSampler` seeded with
      `seed`). A `DeviceLoader` is re-created on this process's device.
    - For validation, each process takes every `world_size`-th sample (no padding, no
      dropped sample), so the reduced metrics are those of the whole set.

    Raises:
        ValueError: For a loader sharded for another rank or world size, a batch size not
            divisible by the world size, fewer validation samples than processes, or a
            `DataLoader` whose sampler cannot be re-created (custom samplers, iterable
            datasets): give a `DataLoader` with a `DistributedSampler` then.

    Examples:
        >>> from bnvit.data import DeviceLoader
        >>> loader = DeviceLoader(torch.rand(10, 28, 28), torch.arange(10), batch_size=4)
        >>> ddp = Distributed(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
        >>> mine = shard(loader, ddp, name="train", train=True, seed=0)
        >>> mine.batch_size, mine.num_samples, mine.rank
        (2, 5, 1)
    """
    if ddp.world_size == 1:
        return loader
    if isinstance(loader, DeviceLoader):
        return _shard_device_loader(loader, ddp, name, train)
    if isinstance(loader, DataLoader):
        return _shard_data_loader(loader, ddp, name, train, seed)
    raise TypeError(f"cannot shard a {type(loader).__name__}; give a DataLoader or a bnvit.data.DeviceLoader")


def _shard_device_loader(loader: Any, ddp: Distributed, name: str, train: bool) -> Any:
    if loader.world_size > 1:
        if (loader.rank, loader.world_size) != (ddp.rank, ddp.world_size):
            raise ValueError(
                f"the {name} DeviceLoader is sharded for rank {loader.rank} of {loader.world_size}, but this "
                f"process is rank {ddp.rank} of {ddp.world_size}; pass an unsharded loader and fit shards it"
            )
        return loader
    settings = dict(augment=loader.augment, device=ddp.device, seed=loader.seed, drop_last=loader.drop_last)
    if train:
        return DeviceLoader(
            loader.images,
            loader.labels,
            batch_size=_per_process_batch(loader.batch_size, ddp.world_size),
            shuffle=loader.shuffle,
            rank=ddp.rank,
            world_size=ddp.world_size,
            **settings,
        )
    _check_enough(len(loader.labels), ddp, name)
    images, labels = loader.images[ddp.rank :: ddp.world_size], loader.labels[ddp.rank :: ddp.world_size]
    return DeviceLoader(images, labels, batch_size=loader.batch_size, shuffle=loader.shuffle, **settings)


def _check_enough(n: int, ddp: Distributed, name: str) -> None:
    if n < ddp.world_size:
        raise ValueError(f"{name} data has {n} samples, fewer than the {ddp.world_size} processes")


def _shard_data_loader(loader: Any, ddp: Distributed, name: str, train: bool, seed: int) -> Any:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        if (sampler.rank, sampler.num_replicas) != (ddp.rank, ddp.world_size):
            raise ValueError(
                f"the {name} DataLoader's DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, "
                f"but this process is rank {ddp.rank} of {ddp.world_size}"
            )
        return loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"fit cannot shard the {name} DataLoader over an IterableDataset across processes; use a map-style "
            "Dataset (fit then adds a DistributedSampler)"
        )
    plain = isinstance(sampler, (RandomSampler, SequentialSampler)) and type(loader.batch_sampler) is BatchSampler
    if not plain or loader.batch_size is None:
        raise ValueError(
            f"the {name} DataLoader uses a custom sampler ({type(sampler).__name__}, batch sampler "
            f"{type(loader.batch_sampler).__name__}) that fit cannot split across processes; give it a "
            "DistributedSampler for this rank"
        )
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    if train:
        shuffle = isinstance(sampler, RandomSampler)
        sampler = DistributedSampler(dataset, ddp.world_size, ddp.rank, shuffle=shuffle, seed=seed)
        batch_size = _per_process_batch(loader.batch_size, ddp.world_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
    _check_enough(len(dataset), ddp, name)
    share = Subset(dataset, range(ddp.rank, len(dataset), ddp.world_size))
    return DataLoader(share, batch_size=loader.batch_size, shuffle=False, **kwargs)


# ----------------------------------------------------------------------------- BatchNorm across processes


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the samples of every process, with `all_reduce` (any backend).

    The statistics are summed in float64: the mean first, then the squared deviations from it
    (two passes, no cancellation). The backward pass reduces the two per-channel sums the input
    gradient needs; the weight and bias gradients stay local, as `DistributedDataParallel`
    averages them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # type: ignore[override]
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x.to(compute)
        stats = torch.cat(
            [xc.sum(dims, dtype=torch.float64), xc.new_tensor([x.numel() // channels], dtype=torch.float64)]
        )
        dist.all_reduce(stats, group=group)
        count = stats[-1]
        if count.item() < 2:
            raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got {int(count)}")
        mean = stats[:-1] / count
        centered = xc - mean.to(compute).view(shape)
        m2 = centered.square().sum(dims, dtype=torch.float64)
        dist.all_reduce(m2, group=group)
        var = m2 / count
        invstd = torch.rsqrt(var + eps).to(compute)
        out = centered * invstd.view(shape)
        if weight is not None:
            out = out * weight.to(compute).view(shape) + bias.to(compute).view(shape)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean.to(compute), invstd)
        ctx.count, ctx.group = count, group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        compute = invstd.dtype
        dy = grad_out.to(compute)
        xhat = (x.to(compute) - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy = (sums[:channels] / ctx.count).to(compute).view(shape)
            mean_dy_xhat = (sums[channels:] / ctx.count).to(compute).view(shape)
            scale = invstd if weight is None else invstd * weight.to(compute)
            grad_x = ((dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the samples of all processes, on any device.

    `torch.nn.SyncBatchNorm` synchronizes only CUDA (and a few accelerator) tensors, and
    `DistributedDataParallel` refuses it in a CPU model. This is the same computation built on
    `all_reduce`, so it runs with gloo on the CPU: in training mode, inside a process group of
    more than one process, each channel is normalized with the mean and (biased) variance of
    the inputs of every process together, and the running statistics are updated with them
    (unbiased over the global count), exactly as one process holding the whole batch would.
    Otherwise it is a plain BatchNorm. `convert_batchnorm` uses it for CPU models and torch's
    `SyncBatchNorm` on accelerators. Inputs are `(N, C)` or `(N, C, *)`.

    Examples:
        >>> bn = CPUSyncBatchNorm(8)
        >>> bn(torch.randn(4, 8)).shape  # no process group: a plain BatchNorm
        torch.Size([4, 8])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        group = self.process_group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if bn_training and self.training and group is not None and dist.get_world_size(group) > 1:
            return _SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group
            )
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    original: _BatchNorm
    synced: _BatchNorm


def convert_batchnorm(model: nn.Module, device: torch.device | str = "cpu") -> list[_Swap]:
    """Replace, in place, every BatchNorm inside `model` by a synchronized one sharing its state.

    On CUDA (and the other devices it supports) the replacement is `torch.nn.SyncBatchNorm`,
    elsewhere `CPUSyncBatchNorm`. Parameters and buffers are the same tensors, so training the
    converted model trains the original layers. `restore_batchnorm` puts the originals back.

    Args:
        model: The model, changed in place.
        device: The device the model trains on.

    Returns:
        What `restore_batchnorm` needs.

    Raises:
        ValueError: If `model` itself is a BatchNorm (it cannot be replaced in place).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> swaps = convert_batchnorm(model)
        >>> type(model[1]).__name__
        'CPUSyncBatchNorm'
        >>> restore_batchnorm(swaps)
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    torch_syncs = torch.device(device).type in (*_TORCH_SYNC_DEVICES, torch._C._get_privateuse1_backend_name())
    kind = nn.SyncBatchNorm if torch_syncs else CPUSyncBatchNorm
    swaps = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm) or isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm)):
            continue
        if not name:
            raise ValueError(f"the model itself is a {type(module).__name__}; use sync_bn=False")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        synced = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        synced._parameters.update(module._parameters)
        synced._buffers.update(module._buffers)
        synced.train(module.training)
        setattr(parent, attr, synced)
        swaps.append(_Swap(parent, attr, module, synced))
    return swaps


def restore_batchnorm(swaps: list[_Swap]) -> None:
    """Undo `convert_batchnorm`: the original layers, holding the current parameters and statistics.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> restore_batchnorm(convert_batchnorm(model))
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    for swap in reversed(swaps):
        swap.original._parameters.update(swap.synced._parameters)
        swap.original._buffers.update(swap.synced._buffers)
        swap.original.train(swap.synced.training)
        setattr(swap.parent, swap.name, swap.original)


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Inside the block, `model`'s BatchNorms are synchronized (if `enabled`); the originals again after.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> with synced_batchnorm(model, enabled=True, device="cpu"):
        ...     type(model[1]).__name__
        'CPUSyncBatchNorm'
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    swaps = convert_batchnorm(model, device) if enabled else []
    try:
        yield model
    finally:
        restore_batchnorm(swaps)
