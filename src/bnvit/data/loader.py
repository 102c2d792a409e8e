"""Batches straight from tensors on the training device: shuffling, sharding and augmentation there too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .._util import checks as _checks
from .augment import MAX_SIDE, augment_batch

__all__ = ["DeviceLoader"]

# Augmentation runs on blocks of up to this many images (whole batches), not batch by batch:
# per-call overhead is amortized and, on CPU, a block still fits in cache (measured best there).
_AUGMENT_BLOCK = {"cpu": 512}
_AUGMENT_BLOCK_OTHER = 8192


def _stream_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from `entropy` (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """`(B, 1, H, W)` float32: uint8 divided by 255, float passed through."""
    images = images if images.dim() == 4 else images.unsqueeze(1)
    return images / 255 if images.dtype == torch.uint8 else images.float()


class DeviceLoader:
    """Iterate `(images, labels)` batches of tensors that live on the training device (docs/data.md).

    An epoch's order and augmentation are a function of `(seed, epoch)`: `set_epoch` chooses it,
    each `iter()` advances it. Rank `r` takes positions `r, r + world_size, ...` of each permutation.

    Args:
        images: `(N, H, W)` or `(N, 1, H, W)`; uint8 or float in [0, 1].
        labels: `(N,)` integer class labels.
        shuffle: Shuffle every epoch; otherwise the stored order.
        augment: `True` for `augment_batch`, or a callable `(images, generator) -> (B, 1, H, W)`.
        device: Where the data is held and batches are made.
        seed: Seed of the shuffling and augmentation (an int >= 0).
        drop_last: Drop the last incomplete batch.
        rank: This process's rank in `[0, world_size)`.
        world_size: Processes sharing the data.

    Examples:
        >>> images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
        >>> loader = DeviceLoader(images, torch.arange(10) % 3, batch_size=4, augment=True)
        >>> len(loader), [tuple(x.shape) for x, _ in loader]
        (3, [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)])
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = True,
        augment: bool | Callable[[torch.Tensor, torch.Generator], torch.Tensor] = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
        labels = torch.as_tensor(labels) if isinstance(labels, np.ndarray) else labels
        for name, value in (("images", images), ("labels", labels)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 (0-255) or floating point (0-1), got dtype {images.dtype}")
        if not (images.dim() == 3 or (images.dim() == 4 and images.shape[1] == 1)):
            raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"labels must be a 1-d tensor of integer class labels, got shape {tuple(labels.shape)} "
                f"and dtype {labels.dtype}"
            )
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} images, {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("images is empty; a DeviceLoader needs at least one sample")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not (isinstance(augment, bool) or callable(augment)):
            raise TypeError(f"augment must be a bool or a callable (images, generator) -> images, got {augment!r}")
        if augment and max(images.shape[-2:]) > MAX_SIDE:
            raise ValueError(f"augment=True supports image sides up to {MAX_SIDE}, got {tuple(images.shape[-2:])}")
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.rank = _checks.positive_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seed = _checks.positive_int("seed", seed, minimum=0)
        if len(images) < world_size:
            raise ValueError(f"{len(images)} samples cannot be shared by world_size={world_size} ranks")
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"drop_last=True with batch_size={batch_size} leaves no batch: each rank has {self.num_samples} samples"
            )

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (after sharding, before `drop_last`)."""
        return len(self.labels) // self.world_size

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration produces (its order and augmentation)."""
        self.epoch = _checks.positive_int("epoch", epoch, minimum=0)

    def state_dict(self) -> dict[str, int]:
        """The loader's state for a checkpoint: the next epoch and the seed."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`; the seed must match, or the data would differ silently."""
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint was made with seed={state.get('seed')}, this loader has seed={self.seed}")
        self.set_epoch(state["epoch"])

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`."""
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator(device=self.device).manual_seed(_stream_seed(self.seed, epoch, 0))
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        share = self.num_samples
        order = order[: share * self.world_size].view(share, self.world_size)[:, self.rank]
        used = len(self) * self.batch_size if self.drop_last else share
        return order[:used].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(epoch)
        generator = None
        if self.augment:
            seed = _stream_seed(self.seed, epoch, 1, self.rank)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        augment = augment_batch if self.augment is True else self.augment
        block_images = _AUGMENT_BLOCK.get(self.device.type, _AUGMENT_BLOCK_OTHER)
        block = max(1, block_images // self.batch_size) * self.batch_size
        for start in range(0, len(order), block):
            index = order[start : start + block]
            images = self.images.index_select(0, index)  # a row copy; several times faster than images[index]
            images = augment(images, generator) if self.augment else _to_float(images)
            labels = self.labels.index_select(0, index)
            for b in range(0, len(index), self.batch_size):
                yield images[b : b + self.batch_size], labels[b : b + self.batch_size]

    def __repr__(self) -> str:
        shard = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (
            f"{type(self).__name__}(samples={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={str(self.device)!r}, seed={self.seed}, "
            f"epoch={self.epoch}{shard}, drop_last={self.drop_last})"
        )
