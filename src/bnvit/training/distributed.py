"""Multi-process training: what `fit(distributed=...)` builds on, in one place.

`fit()` runs one loop for any number of processes: it asks `setup` for the world it trains in
and calls the world's methods, which a world of one answers at once. The parts live where
their job is, and are all importable from here:

- the world (`bnvit.training.world`): `setup` decides whether the run is distributed
  (torchrun's `RANK`, `WORLD_SIZE` and `LOCAL_RANK` with `WORLD_SIZE > 1`, or a process group
  that is already initialized), picks this process's device (`cuda:LOCAL_RANK` on GPUs) and
  initializes the process group (nccl on CUDA, gloo on the CPU) if nobody has yet; its `World`
  reduces the metrics, agrees on divergence, makes a set-up error on one process raise on all
  (`fail_together`), wraps the model in `DistributedDataParallel` (`wrap`), and tells `fit`
  which process is rank 0 (the only one that writes checkpoints, logs and runs callbacks);
- sharding (`bnvit.training.sharding`): each process's share of the data;
- synchronized BatchNorm (`bnvit.models.batchnorm`): every BatchNorm of the user's model is swapped for
  a synchronized one sharing its parameters and statistics, and swapped back when training
  ends, so the trained weights are in the model the user passed, as plain BatchNorms.

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

import contextlib
from typing import Any

from torch import nn

from ..models.batchnorm import CPUSyncBatchNorm, convert_batchnorm, restore_batchnorm, synced_batchnorm
from .world import World, alone, is_main_process, local_device, setup

__all__ = [
    "CPUSyncBatchNorm",
    "Distributed",
    "World",
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

Distributed = World
"""The name `World` had before it held the world of one process too."""


def fail_together(world: World) -> contextlib.AbstractContextManager[None]:
    """`world.fail_together()`: a block whose error on any process raises on all of them.

    Examples:
        >>> with fail_together(alone("cpu")):
        ...     pass
    """
    return world.fail_together()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """`world.wrap(model)`: `model` in `DistributedDataParallel`, or `model` itself in a world of one.

    Examples:
        >>> wrap(nn.Linear(2, 2), alone("cpu"))
        Linear(in_features=2, out_features=2, bias=True)
    """
    return world.wrap(model)


def shard(loader: Any, world: World, *, name: str, train: bool, seed: int) -> Any:
    """`world.shard(loader, ...)`: this process's share of `loader` (`bnvit.training.sharding.shard_for`).

    Examples:
        >>> import torch
        >>> from bnvit.data import DeviceLoader
        >>> loader = DeviceLoader(torch.rand(10, 28, 28), torch.arange(10), batch_size=4)
        >>> world = World(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
        >>> mine = shard(loader, world, name="train", train=True, seed=0)
        >>> mine.batch_size, mine.num_samples, mine.rank
        (2, 5, 1)
        >>> shard(loader, alone("cpu"), name="train", train=True, seed=0) is loader
        True
    """
    return world.shard(loader, name=name, train=train, seed=seed)
