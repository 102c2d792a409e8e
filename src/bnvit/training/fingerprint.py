"""What makes a training run what it is, as plain values a checkpoint stores and a resume compares.

The model's whole configuration, the loss and its settings, and the data (kind, size, loader
settings, a SHA-256 over `SAMPLE` stored examples), so that resuming a different run is
refused (docs/checkpoints.md lists what is covered).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import DeviceLoader

__all__ = ["SAMPLE", "describe_data", "describe_loss", "describe_model", "describe_run"]

SAMPLE = 32
"""How many examples of a dataset the data fingerprint hashes."""

_PLAIN = (bool, int, float, str, type(None))


def describe_run(model: nn.Module, loss_fn: Callable | None, train: Any, val: Any) -> dict[str, Any]:
    """The model, loss and data parts of a run's fingerprint (`fit` adds its arguments).

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> data = (torch.rand(8, 1, 28, 28), torch.arange(8) % 10)
        >>> run = describe_run(ViTBNFFN(depth=1, drop_rate=0.1), None, data, None)
        >>> run["model"]["drop_rate"], run["loss_fn"], run["train_data"]["size"], run["val_data"]
        (0.1, 'torch.nn.functional.cross_entropy', 8, None)
    """
    return dict(
        model=describe_model(model),
        loss_fn=describe_loss(loss_fn),
        train_data=describe_data(train),
        val_data=None if val is None else describe_data(val),
    )


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The model's whole configuration: its `config`, else its class and a hash of its submodules' `extra_repr`."""
    config = getattr(model, "config", None)
    described: dict[str, Any] = {"class": _qualname(type(model))}
    if isinstance(config, dict) and all(isinstance(k, str) for k in config):
        return {**described, **{key: _plain(value) for key, value in config.items()}}
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}|{module.extra_repr()}\n".encode())
    return {**described, "modules_sha256": digest.hexdigest()}


def describe_loss(loss_fn: Callable | None) -> str:
    """The loss as a string: its qualified name, with the settings of a `functools.partial` or loss module.

    Examples:
        >>> describe_loss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
        "torch.nn.modules.loss.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1, reduction='mean')"
    """
    if loss_fn is None:
        loss_fn = torch.nn.functional.cross_entropy
    if isinstance(loss_fn, functools.partial):
        args = [_value_text(a) for a in loss_fn.args] + [f"{k}={_value_text(v)}" for k, v in loss_fn.keywords.items()]
        return f"{describe_loss(loss_fn.func)}({', '.join(args)})"
    if isinstance(loss_fn, nn.Module):
        settings = {k: v for k, v in vars(loss_fn).items() if not k.startswith("_") and k != "training"}
        settings.update({name: buffer for name, buffer in loss_fn.named_buffers() if buffer is not None})
        args = [f"{k}={_value_text(v)}" for k, v in sorted(settings.items())]
        return f"{_qualname(type(loss_fn))}({', '.join(args)})"
    if hasattr(loss_fn, "__qualname__"):
        return _qualname(loss_fn)
    return _qualname(type(loss_fn))  # a callable object: its class


def describe_data(data: Any) -> dict[str, Any]:
    """Kind, size, loader settings and a sample hash of what `fit` was given as data.

    Examples:
        >>> images, labels = torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long)
        >>> described = describe_data((images, labels))
        >>> described["kind"], described["size"], len(described["sample_sha256"])
        ('tensors', 10, 64)
    """
    if isinstance(data, DeviceLoader):
        return dict(
            kind="DeviceLoader",
            size=len(data.labels),
            batch_size=data.batch_size,
            shuffle=data.shuffle,
            augment=data.augment if isinstance(data.augment, bool) else describe_loss(data.augment),
            drop_last=data.drop_last,
            seed=data.seed,
            sample_sha256=_tensors_sample(data.images, data.labels),
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return dict(kind="tensors", size=len(data[0]), sample_sha256=_tensors_sample(*data))
    if isinstance(data, DataLoader):
        described = describe_data(data.dataset)
        return {**described, "kind": f"DataLoader of {described['kind']}", "batch_size": data.batch_size}
    if isinstance(data, Dataset):
        size = _length(data)
        return dict(kind=_qualname(type(data)), size=size, sample_sha256=None if size is None else _items_sample(data))
    return dict(kind=_qualname(type(data)), size=_length(data), sample_sha256=None)


# ----------------------------------------------------------------------------- helpers


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _plain(value: Any) -> Any:
    """`value` with containers made of plain values only (what a weights-only checkpoint can hold)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value) if not callable(value) else _qualname(value)


def _value_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(sha256={_sha256_of([value])[:16]})"
    if callable(value) and not isinstance(value, _PLAIN):
        return describe_loss(value)
    return repr(_plain(value))


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _sample_indices(n: int) -> list[int]:
    if n <= 0:
        return []
    return sorted({round(i * (n - 1) / max(SAMPLE - 1, 1)) for i in range(min(n, SAMPLE))})


def _tensors_sample(images: torch.Tensor, labels: torch.Tensor) -> str:
    index = torch.tensor(_sample_indices(len(images)), dtype=torch.long)
    return _sha256_of(
        [images.index_select(0, index.to(images.device)), labels.index_select(0, index.to(labels.device))]
    )


def _sha256_of(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Every random generator a dataset's transform may draw from, seeded with 0 and restored afterwards."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # the CPU's only: torch.manual_seed would reset CUDA's too
        random.seed(0)
        np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _items_sample(dataset: Dataset) -> str | None:
    """A SHA-256 over a sample of the dataset's items, or None if they have no stable bytes."""
    if isinstance(dataset, IterableDataset):
        return None  # no item can be read without consuming it
    indices = _sample_indices(_length(dataset) or 0)
    hashes = []
    for _ in range(2):  # twice: an item that changes between reads has no fingerprint
        digest = hashlib.sha256()
        with _seeded():
            for i in indices:
                try:
                    item = dataset[i]
                except (IndexError, KeyError, TypeError, NotImplementedError):  # not indexed by 0 .. len - 1
                    return None
                if not _feed(digest, item):
                    return None
        hashes.append(digest.hexdigest())
    return hashes[0] if hashes[0] == hashes[1] else None


def _feed(digest: Any, value: Any) -> bool:
    """Add `value`'s bytes to `digest`; False if it holds something without stable bytes."""
    if isinstance(value, torch.Tensor):
        digest.update(_sha256_of([value]).encode())
    elif isinstance(value, np.ndarray):
        digest.update(_sha256_of([torch.from_numpy(np.ascontiguousarray(value))]).encode())
    elif isinstance(value, _PLAIN):
        digest.update(repr(value).encode())
    elif isinstance(value, np.generic):  # a numpy scalar (a label, say)
        digest.update(repr(value.item()).encode())
    elif isinstance(value, (tuple, list)):
        digest.update(b"(")
        return all(_feed(digest, v) for v in value)
    elif isinstance(value, dict):
        digest.update(b"{")
        return all(_feed(digest, k) and _feed(digest, v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        digest.update(f"{value.mode}|{value.size}|".encode() + value.tobytes())
    else:
        return False
    return True
