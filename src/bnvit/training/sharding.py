"""How `fit` splits the data among the processes of a world: each takes its share of every batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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

__all__ = ["shard_for"]


@dataclass(frozen=True)
class _Share:
    """Whose share: this process's rank, the number of processes, and where its data lives."""

    rank: int
    world_size: int
    device: torch.device


def _per_process_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        low = batch_size - batch_size % world_size
        options = f"{low} or {low + world_size}" if low else str(world_size)
        raise ValueError(
            f"batch size {batch_size} is the global batch (all {world_size} processes together) and must be "
            f"divisible by the world size {world_size}; use e.g. {options}"
        )
    return batch_size // world_size


def shard_for(
    loader: Any, *, rank: int, world_size: int, device: torch.device, name: str, train: bool, seed: int
) -> Any:
    """Process `rank`'s share of `loader` (a `DeviceLoader` or a `DataLoader`) among `world_size` processes.

    A loader already sharded for this process is used as it is (its batch size per process).
    Any other is re-created sharded: for training its batch size is the global batch, each process
    taking `batch_size / world_size` (the union of the k-th batches is a single process's k-th
    batch); for validation each process takes every `world_size`-th sample, nothing dropped.

    Raises:
        ValueError: For a loader sharded for another rank or world size, a batch size not
            divisible by the world size, fewer validation samples than processes, or a
            `DataLoader` whose sampler cannot be re-created (give one with a `DistributedSampler`).

    Examples:
        >>> from bnvit.data import DeviceLoader
        >>> loader = DeviceLoader(torch.rand(10, 28, 28), torch.arange(10), batch_size=4)
        >>> mine = shard_for(loader, rank=1, world_size=2, device=torch.device("cpu"), name="train", train=True, seed=0)
        >>> mine.batch_size, mine.num_samples, mine.rank
        (2, 5, 1)
    """
    share = _Share(rank, world_size, device)
    if isinstance(loader, DeviceLoader):
        return _shard_device_loader(loader, share, name, train)
    if isinstance(loader, DataLoader):
        return _shard_data_loader(loader, share, name, train, seed)
    raise TypeError(f"cannot shard a {type(loader).__name__}; give a DataLoader or a bnvit.data.DeviceLoader")


def _shard_device_loader(loader: Any, share: _Share, name: str, train: bool) -> Any:
    if loader.world_size > 1:
        if (loader.rank, loader.world_size) != (share.rank, share.world_size):
            raise ValueError(
                f"the {name} DeviceLoader is sharded for rank {loader.rank} of {loader.world_size}, but this "
                f"process is rank {share.rank} of {share.world_size}; pass an unsharded loader and fit shards it"
            )
        return loader
    settings = dict(augment=loader.augment, device=share.device, seed=loader.seed, drop_last=loader.drop_last)
    if train:
        return DeviceLoader(
            loader.images,
            loader.labels,
            batch_size=_per_process_batch(loader.batch_size, share.world_size),
            shuffle=loader.shuffle,
            rank=share.rank,
            world_size=share.world_size,
            **settings,
        )
    _check_enough(len(loader.labels), share, name)
    images, labels = loader.images[share.rank :: share.world_size], loader.labels[share.rank :: share.world_size]
    return DeviceLoader(images, labels, batch_size=loader.batch_size, shuffle=loader.shuffle, **settings)


def _check_enough(n: int, share: _Share, name: str) -> None:
    if n < share.world_size:
        raise ValueError(f"{name} data has {n} samples, fewer than the {share.world_size} processes")


def _shard_data_loader(loader: Any, share: _Share, name: str, train: bool, seed: int) -> Any:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        if (sampler.rank, sampler.num_replicas) != (share.rank, share.world_size):
            raise ValueError(
                f"the {name} DataLoader's DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, "
                f"but this process is rank {share.rank} of {share.world_size}"
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
        sampler = DistributedSampler(dataset, share.world_size, share.rank, shuffle=shuffle, seed=seed)
        batch_size = _per_process_batch(loader.batch_size, share.world_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
    _check_enough(len(dataset), share, name)
    share = Subset(dataset, range(share.rank, len(dataset), share.world_size))
    return DataLoader(share, batch_size=loader.batch_size, shuffle=False, **kwargs)
