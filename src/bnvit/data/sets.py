"""The article's data in one call: a frozen augmented test set and the train/test loaders."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset

from .._util import checks as _checks
from .._util.io import atomic_torch_save
from .article import MNISTDataset, article_transform
from .augment import augment_batch
from .loader import DeviceLoader
from .mnist import cache_dir, load_mnist

__all__ = ["TEST_METHODS", "augmented_test_set", "mnist_loaders"]

TEST_METHODS = ("torchvision", "fast")
"""How `augmented_test_set` augments: the article's torchvision pipeline or `augment_batch`."""

_FORMAT = 1  # bump when the cached file's content or layout changes
_memory: dict[str, torch.Tensor] = {}


def _cache_key(images: torch.Tensor, labels: torch.Tensor, seed: int) -> str:
    """Identifies the frozen set: the source data, the seed and the versions that shape the transform."""
    digest = hashlib.sha256()
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    digest.update(f"{seed}|{torch.__version__}|{torchvision.__version__}|{PIL.__version__}|{_FORMAT}".encode())
    return digest.hexdigest()[:16]


def _torchvision_augment(images: torch.Tensor, seed: int) -> torch.Tensor:
    """`article_transform()` on every image under a seeded CPU generator (state restored); uint8 `(N, 1, 28, 28)`."""
    transform = article_transform()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        out = torch.stack([transform(Image.fromarray(image)) for image in images.numpy()])
    # ToTensor returns byte / 255, so the uint8 form is exact and a quarter of the size.
    return torch.round(out * 255).to(torch.uint8)


def _load_cached(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as error:  # truncated or foreign file: regenerate it
        warnings.warn(f"ignoring unreadable cache file {path} ({error}); regenerating it", RuntimeWarning, stacklevel=3)
        return None
    images = stored.get("images") if isinstance(stored, dict) else None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        warnings.warn(f"ignoring cache file {path}: unexpected content; regenerating it", RuntimeWarning, stacklevel=3)
        return None
    return images


def _save_cache(path: Path, images: torch.Tensor, meta: dict) -> None:
    """Cache the set in `path` atomically; a folder that cannot be written is warned about, not fatal."""
    try:
        atomic_torch_save({"images": images, **meta}, path)
    except OSError as error:  # only a cache: the set is recomputed next time
        warnings.warn(
            f"could not cache the augmented test set at {path} ({error}); it will be recomputed next time. "
            f"Set XDG_CACHE_HOME to a writable folder to cache it.",
            RuntimeWarning,
            stacklevel=3,
        )


def augmented_test_set(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    method: str = "torchvision",
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set augmented once with a fixed seed, so every model is scored on the same images.

    `"torchvision"` results are cached in the user cache folder; `"fast"` draws on the CPU, so the
    images do not depend on `device`.

    Args:
        root: Folder holding `MNIST/raw/` (see `find_mnist_root`).
        seed: The draw (an int >= 0).
        device: Where to return the tensors.
        method: `"torchvision"` (the reference) or `"fast"`.
        download: Fetch MNIST with torchvision if it is missing.

    Returns:
        `(images, labels)`: float32 `(10000, 1, 28, 28)` in [0, 1] and int64 `(10000,)`.

    Examples:
        >>> images, labels = augmented_test_set(seed=0)  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.float32)
    """
    seed = _checks.positive_int("seed", seed, minimum=0)
    _checks.choice("method", method, TEST_METHODS)
    device = torch.device(device)
    images, labels = load_mnist(root, train=False, download=download)
    if method == "fast":
        out = augment_batch(images, torch.Generator().manual_seed(seed))
        return out.to(device), labels.to(device)
    key = _cache_key(images, labels, seed)
    if key not in _memory:
        path = cache_dir() / "augmented" / f"mnist-test-torchvision-seed{seed}-{key}.pt"
        frozen = _load_cached(path, (len(images), 1, 28, 28))
        if frozen is None:
            frozen = _torchvision_augment(images, seed)
            _save_cache(path, frozen, {"seed": seed, "torchvision": torchvision.__version__})
        _memory[key] = frozen
    return (_memory[key].to(device) / 255), labels.to(device)


def _subset_size(name: str, value: int | None, total: int) -> int:
    if value is None:
        return total
    value = _checks.positive_int(name, value)
    if value > total:
        raise ValueError(f"{name}={value} is larger than the {total} images available")
    return value


def mnist_loaders(
    root: str | os.PathLike | None = None,
    *,
    batch_size: int = 100,
    eval_batch_size: int = 5000,
    device: torch.device | str = "cpu",
    augment: str | None = "fast",
    test: str = "augmented",
    seed: int = 0,
    test_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = False,
) -> tuple[DeviceLoader | DataLoader, DeviceLoader]:
    """The article's MNIST data in one call: an augmented training loader and a test loader.

    Args:
        root: Folder holding `MNIST/raw/` (see `find_mnist_root`).
        batch_size: Training batch size (the article: 100).
        eval_batch_size: Test batch size.
        device: Where data lives and batches are made (torchvision batches are on the CPU).
        augment: `"fast"` (`DeviceLoader`), `"torchvision"` (a `DataLoader`) or `None`.
        test: `"augmented"` (`augmented_test_set`, what the article scores) or `"clean"`.
        seed: Seed of the training order, augmentation and `train_subset`.
        test_seed: Seed of the frozen test set.
        train_subset: Train on a fixed random subset of this many images.
        test_subset: Score on the first this many test images.
        download: Fetch MNIST with torchvision if it is missing.

    Returns:
        `(train_loader, test_loader)`; the test loader neither shuffles nor augments.

    Examples:
        >>> train, test = mnist_loaders(batch_size=100, train_subset=1000)  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (10, 2)
    """
    if augment is not None and augment not in ("fast", "torchvision"):
        raise ValueError(f"unknown augment {augment!r}; valid choices: 'fast', 'torchvision', None")
    _checks.choice("test", test, ("augmented", "clean"))
    seed = _checks.positive_int("seed", seed, minimum=0)
    batch_size = _checks.positive_int("batch_size", batch_size)
    eval_batch_size = _checks.positive_int("eval_batch_size", eval_batch_size)
    device = torch.device(device)

    train_images, train_labels = load_mnist(root, train=True, download=download)
    n_train = _subset_size("train_subset", train_subset, len(train_labels))
    subset = None
    if n_train < len(train_labels):
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(train_labels), generator=generator)[:n_train].sort().values
    if augment == "torchvision":
        dataset = MNISTDataset(root, train=True, transform=article_transform())
        train = DataLoader(
            dataset if subset is None else Subset(dataset, subset.tolist()),
            batch_size=batch_size,
            shuffle=True,
            num_workers=0,
        )
    else:
        if subset is not None:
            train_images, train_labels = train_images[subset], train_labels[subset]
        train = DeviceLoader(
            train_images, train_labels, batch_size=batch_size, augment=augment == "fast", device=device, seed=seed
        )

    if test == "augmented":
        test_images, test_labels = augmented_test_set(root, seed=test_seed, download=download)
    else:
        test_images, test_labels = load_mnist(root, train=False, download=download)
    n_test = _subset_size("test_subset", test_subset, len(test_labels))
    test_loader = DeviceLoader(
        test_images[:n_test], test_labels[:n_test], batch_size=eval_batch_size, shuffle=False, device=device
    )
    return train, test_loader
