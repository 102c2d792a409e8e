"""The world a run trains in: one process, or several started by torchrun. `fit` never asks which.

`setup` returns this process's `World`; in a world of one every collective is the identity.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._util.device import resolve_device
from ..models.batchnorm import synced_batchnorm
from .sharding import shard_for

__all__ = ["MODES", "World", "alone", "is_main_process", "local_device", "setup"]

MODES = (True, False, "auto")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_destroy_registered = False


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train together, and the collectives `fit` needs.

    Every method is a collective: all processes call it, in the same order.

    Attributes:
        rank: This process's rank in `[0, world_size)`.
        world_size: Number of processes.
        local_rank: Rank among the processes on this machine (picks the GPU).
        device: This process's training device.
        backend: The process group's backend (`"gloo"`, `"nccl"`, ...).

    Examples:
        >>> world = setup("auto", "cpu")  # torchrun's processes, or this one alone
        >>> loss_sum, n = world.sum(torch.tensor(2.5), 10)
        >>> world.world_size, loss_sum / n
        (1, 0.25)
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

    @contextlib.contextmanager
    def fail_together(self) -> Iterator[None]:
        """Run a block without collectives; if it raises on any process, raise on all (others get a `RuntimeError`)."""
        error: Exception | None = None
        try:
            yield
        except Exception as err:
            error = err
        failed = [rank for rank, flag in enumerate(self.gather(error is not None)) if flag]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"process(es) of rank {failed} failed while setting up training; see their error")

    def shard(self, loader: Any, *, name: str, train: bool, seed: int) -> Any:
        """This process's share of `loader`: see `bnvit.training.sharding.shard_for` for the rules."""
        return shard_for(
            loader, rank=self.rank, world_size=self.world_size, device=self.device, name=name, train=train, seed=seed
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in `DistributedDataParallel` for this process's device."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def synced_batchnorm(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[nn.Module]:
        """A block in which `model`'s BatchNorms compute statistics over every process (if `enabled`)."""
        return synced_batchnorm(model, enabled, self.device)


class _Alone(World):
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

    @contextlib.contextmanager
    def fail_together(self) -> Iterator[None]:
        yield

    def shard(self, loader: Any, *, name: str, train: bool, seed: int) -> Any:
        return loader

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def synced_batchnorm(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(model)


def alone(device: str | torch.device = "auto") -> World:
    """The world of a process that trains alone: rank 0 of 1 on `device`, no process group.

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
    """The device `fit` trains on in this process (`cuda:LOCAL_RANK` under torchrun); build loaders there.

    Examples:
        >>> local_device("cpu")
        device(type='cpu')
    """
    env = _torchrun_env()
    return _local_device(device, env[2] if env is not None else 0)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(distributed: bool | str, device: str | torch.device) -> World:
    """The world this process trains in: decide whether several processes train, and prepare this one.

    Args:
        distributed: `"auto"` (on under torchrun with `WORLD_SIZE > 1`, or in an initialized
            group of several), `True` or `False`.
        device: `fit`'s device argument; `"auto"` and `"cuda"` become `cuda:LOCAL_RANK` on GPUs.

    Returns:
        This process's `World` (`alone(device)` for one process). A process group initialized
        here (nccl for CUDA, gloo otherwise) stays up until the process exits.

    Examples:
        >>> world = setup(False, "cpu")
        >>> world.world_size, world.is_main, world.device
        (1, True, device(type='cpu'))
    """
    global _destroy_registered
    if not any(distributed is mode or (isinstance(mode, str) and distributed == mode) for mode in MODES):
        raise ValueError(f"distributed must be True, False or 'auto', got {distributed!r}")
    if distributed is False:
        return alone(device)
    available = dist.is_available()
    initialized = available and dist.is_initialized()
    env = _torchrun_env()
    if distributed == "auto":
        wanted = dist.get_world_size() > 1 if initialized else env is not None and env[1] > 1
        if not wanted:
            return alone(device)
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
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)
