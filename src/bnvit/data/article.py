"""The article's torchvision pipeline, image by image: the reference the fast path is checked against."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import v2

from .mnist import load_mnist

__all__ = ["MNISTDataset", "article_transform"]


def article_transform() -> transforms.Compose:
    """The article's training augmentation exactly as its code builds it: a PIL image in, `(1, 28, 28)` in [0, 1] out.

    Examples:
        >>> transform = article_transform()
        >>> transform(Image.new("L", (28, 28))).shape
        torch.Size([1, 28, 28])
    """
    return transforms.Compose(
        [
            transforms.RandomRotation(20),
            transforms.RandomAffine(degrees=0, translate=(0.2, 0.2)),
            v2.RandomZoomOut(fill=0, side_range=(2.0, 3.0), p=0.2),
            transforms.Resize(28),
            transforms.ToTensor(),
        ]
    )


class MNISTDataset(Dataset):
    """MNIST as a map-style dataset: `(transform(PIL image), label)`, or a float `(1, 28, 28)` image.

    Args:
        root: Folder holding `MNIST/raw/` (see `find_mnist_root`).
        train: The 60,000 training images, else the 10,000 test images.
        transform: Called on each PIL image, e.g. `article_transform()`.
        download: Fetch MNIST with torchvision if it is missing.

    Examples:
        >>> dataset = MNISTDataset(train=False, transform=article_transform())  # doctest: +SKIP
        >>> image, label = dataset[0]  # doctest: +SKIP
        >>> image.shape, label  # doctest: +SKIP
        (torch.Size([1, 28, 28]), 7)
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        train: bool,
        transform: Callable[[Image.Image], Any] | None = None,
        download: bool = False,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {transform!r}")
        self.images, self.labels = load_mnist(root, train=train, download=download)
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index], int(self.labels[index])
        if self.transform is None:
            return image.unsqueeze(0).float().div(255), label
        return self.transform(Image.fromarray(image.numpy())), label

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"{type(self).__name__}(split={split!r}, size={len(self)}, transform={self.transform!r})"
