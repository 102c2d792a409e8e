"""Multi-process training: what `fit(distributed=...)` builds on, importable from one place.

The world (`bnvit.training.world`), sharding (`bnvit.training.sharding`) and synchronized
BatchNorm (`bnvit.models.batchnorm`, `CPUSyncBatchNorm` on the CPU). `fit(batch_size=...)` is
the global batch, divisible by the world size. See docs/distributed.md.
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
    """`world.shard(loader, ...)`: this process's share of `loader` (see `shard_for`).

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
