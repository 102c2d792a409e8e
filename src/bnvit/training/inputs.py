"""What `fit` does with the data before the model sees it.

- **Loaders** from what the user passed (`as_loader`), checked against the model before any
  step (`preflight`): the model's output shape, the labels' type, dtype and range (a label that
  is a `str`, a float or anything but an integer class index is one `ValueError` naming its type).
- **Nothing wrong passes silently.** NaN or inf in the images is a data problem, not a
  divergence: tensor data (an `(images, labels)` pair, a `DeviceLoader`) is checked whole, once,
  before training; batches of any other loader are checked one by one before the forward pass,
  so a refused batch never reaches BatchNorm's running statistics. Labels outside
  `[0, num_classes)` are refused the same way. Each error names the split, the batch and the
  image, and what is valid.
- **Dtype rule.** Floating-point images are cast to the dtype of the model's parameters
  (float64 or float16 images into a float32 model become float32; under bf16/fp16 autocast the
  model stays float32 and autocast picks the precision of each operation). Integer images are
  passed as they are.
- **A last batch of one image.** A model with a BatchNorm that would see a single value per
  channel (an MLP's `BatchNorm1d` on one image) cannot train on it; that batch is dropped
  every epoch, with one warning. When *every* batch holds one image (a one-image dataset, a
  batch size of 1) there is nothing left to train on: that is refused before training. A
  ViT's token BatchNorm normalizes over the image's tokens, so it trains on batches of one
  and keeps them.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from ..data import DeviceLoader
from .world import World

__all__ = [
    "TrainData",
    "as_loader",
    "batch_problem",
    "images_to",
    "model_dtype",
    "preflight",
    "raise_together",
    "to_device",
    "without_last_one",
]


TrainData = Dataset | DataLoader | Iterable | tuple[torch.Tensor, torch.Tensor]
"""What `fit`, `evaluate` and `recalibrate_bn` accept as data."""


def as_loader(data: Any, *, name: str, batch_size: int, shuffle: bool, device: torch.device, seed: int) -> Any:
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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype images are cast to: that of the model's first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def images_to(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Images on `device`, floating-point ones in the model's `dtype` (uint8 ones stay uint8)."""
    dtype = dtype if images.is_floating_point() else images.dtype
    return images.to(device, dtype, non_blocking=True)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple:
    """A batch on `device`, floating-point images in the model's `dtype`."""
    return images_to(images, device, dtype), labels.to(device, non_blocking=True)


def preflight(model: nn.Module, loader: Any, name: str, device: torch.device) -> int:
    """Check, before training, that the model's output and the labels fit together; the number of classes.

    Tensor data (a `DeviceLoader`) is checked whole here: its images must be finite, so its
    batches need no check later.
    """
    images, labels = _first_batch(loader, name)
    all_labels = _all_labels(loader)
    labels = all_labels if all_labels is not None else labels
    problem = _label_type_problem(labels)
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images_to(images[:2], device, model_dtype(model)))
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
    if checked_up_front(loader) and loader.images.is_floating_point():
        problem = _non_finite(loader.images)
        if problem is not None:
            split = "validation" if name == "val" else name
            raise ValueError(f"{split} data: {problem.replace(' of the batch', '')}; {_DATA_NOT_DIVERGENCE}")
    return num_classes


def _first_batch(loader: Any, name: str) -> tuple[Any, Any]:
    """The loader's first `(images, labels)` batch, or a `ValueError` naming what its items are instead."""
    try:
        batch = next(iter(loader))
    except TypeError as err:  # torch's collate cannot stack the items: find a label that is not a class index
        dataset = loader.dataset if isinstance(loader, DataLoader) else None
        for i in range(min(len(dataset), 10_000) if isinstance(dataset, Dataset) else 0):  # type: ignore[arg-type]
            item = dataset[i]
            if isinstance(item, (tuple, list)) and len(item) == 2 and not _class_index(item[1]):
                raise ValueError(f"{name} {_label_type_problem([item[1]])} (item {i})") from err
        raise
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"{name} data must yield (images, labels) pairs, got {got}")
    images, labels = batch
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} images must be tensors, got {type(images).__name__}")
    return images, labels


def _class_index(label: Any) -> bool:
    """Whether one item's label can be a class index: an integer (not a bool) or an integer tensor."""
    if isinstance(label, torch.Tensor):
        return _label_type_problem(label) is None
    return isinstance(label, numbers.Integral) and not isinstance(label, bool)


def _label_type_problem(labels: Any) -> str | None:
    """Why `labels` (a batch's, or all of them) are not integer class indices, or None if they are."""
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            return f"labels must be integer class indices, got dtype {labels.dtype}"
        return None
    first = labels[0] if isinstance(labels, (tuple, list)) and labels else labels  # a collated batch: a list
    got = f"{type(first).__name__} ({first!r})" if isinstance(first, (str, bytes, float)) else type(first).__name__
    return f"labels must be integer class indices (an int or an integer tensor per image), got {got}"


_DATA_NOT_DIVERGENCE = "NaN or inf in the images is a data problem, not a divergence: fix or filter the data"


def checked_up_front(loader: Any) -> bool:
    """Whether `preflight` checked all of the loader's data, so that its batches need no check."""
    return isinstance(getattr(loader, "inner", loader), DeviceLoader)


def _non_finite(images: torch.Tensor) -> str | None:
    """Where the first NaN or inf of `images` is, or None if they are all finite (one reduction)."""
    if bool(torch.isfinite(images).all()):
        return None
    bad = ~torch.isfinite(images.reshape(len(images), -1))
    index = int(bad.any(1).nonzero()[0, 0])
    value = images.reshape(len(images), -1)[index][bad[index]][0].item()
    return f"image {index} of the batch holds a non-finite value ({value})"


def batch_problem(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> str | None:
    """What is wrong with one batch (labels of the wrong type, non-finite images, labels outside
    `[0, num_classes)`), or None."""
    problem = _label_type_problem(labels)
    if problem is not None:
        return problem
    if not isinstance(images, torch.Tensor):
        return f"images must be tensors, got {type(images).__name__}"
    if images.is_floating_point():
        problem = _non_finite(images)
        if problem is not None:
            return f"{problem}; {_DATA_NOT_DIVERGENCE}"
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        index = int(outside.nonzero()[0, 0])
        return (
            f"label {int(labels[index])} (image {index} of the batch) is outside [0, {num_classes}), "
            f"the class indices of a model with {num_classes} outputs"
        )
    return None


def raise_together(world: World, problem: str | None, where: str) -> None:
    """Raise on every process if `problem` is set on any (a collective): `ValueError` where it was found."""
    failed = [rank for rank, flag in enumerate(world.gather(problem is not None)) if flag]
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    if failed:
        raise RuntimeError(f"process(es) of rank {failed} found bad data in {where}; see their error")


# ----------------------------------------------------------------------------- a last batch of one image


class _WithoutLastOne:
    """`inner` without its last batch (a batch of one image that the model cannot train on)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner) - 1

    def __iter__(self) -> Iterator[Any]:
        for _, batch in zip(range(len(self)), self.inner, strict=False):  # stops before drawing the last batch
            yield batch

    def set_epoch(self, epoch: int) -> None:
        for target in (self.inner, getattr(self.inner, "sampler", None), getattr(self.inner, "batch_sampler", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
                return


def _last_batch_size(loader: Any) -> int | None:
    """Images in the last batch of an epoch (0: all batches full), or None if the loader does not tell."""
    if isinstance(loader, DeviceLoader):
        return 0 if loader.drop_last else loader.num_samples % loader.batch_size
    if isinstance(loader, DataLoader) and loader.batch_size is not None and not loader.drop_last:
        try:
            return len(loader.sampler) % loader.batch_size  # type: ignore[arg-type]
        except TypeError:  # a sampler without a length
            return None
    return None


def _trains_on_one_image(model: nn.Module, images: torch.Tensor, device: torch.device) -> bool:
    """Whether every BatchNorm sees more than one value per channel for one image (probed in eval mode: no change)."""
    counts: list[int] = []
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    hooks = [
        m.register_forward_pre_hook(lambda m, args: counts.append(args[0].numel() // args[0].shape[1])) for m in norms
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images_to(images[:1], device, model_dtype(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return min(counts, default=2) > 1


def _only_single_images(loader: Any) -> bool:
    """Whether every batch of an unsharded loader holds one image (batch size 1, or one batch of one)."""
    sampler = getattr(loader, "sampler", None)
    if getattr(loader, "world_size", 1) > 1 or getattr(sampler, "num_replicas", 1) > 1:
        return False  # sharded: the BatchNorms may see the other processes' images too
    return getattr(loader, "batch_size", None) == 1 or (len(loader) == 1 and _last_batch_size(loader) == 1)


def without_last_one(model: nn.Module, loader: Any, device: torch.device, warn: bool) -> Any:
    """`loader`, without a last batch of one image if the model's BatchNorms cannot train on one (warned once).

    Raises:
        ValueError: If every batch holds one image and the model's BatchNorms cannot train on one.
    """
    only_single = _only_single_images(loader)
    if not only_single and (_last_batch_size(loader) != 1 or len(loader) < 2):
        return loader
    images, _ = next(iter(loader))
    if _trains_on_one_image(model, images, device):
        return loader
    if only_single:
        what = "the training data is a single image" if len(loader) == 1 else "the batch size is 1"
        raise ValueError(
            f"every training batch holds a single image ({what}), and the model has a BatchNorm that cannot "
            "train on one (it needs more than 1 value per channel): train on batches of at least 2 images"
        )
    if warn:
        warnings.warn(
            f"the last training batch of every epoch holds a single image, and the model has a BatchNorm that "
            f"cannot train on one (it needs more than 1 value per channel): that batch is dropped, {len(loader) - 1} "
            "batches per epoch remain. Choose a batch size that leaves no batch of one, or drop_last=True, to avoid it",
            RuntimeWarning,
            stacklevel=3,
        )
    return _WithoutLastOne(loader)
