"""MNIST for the article's experiments: the faithful torchvision pipeline, a fast batched one, digit pictures.

Examples:
    >>> from bnvit.data import DeviceLoader, augment_batch
    >>> images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    >>> augment_batch(images).shape
    torch.Size([64, 1, 28, 28])
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the module example)

from .article import MNISTDataset, article_transform
from .augment import AugmentParams, apply_augment, augment_batch, augment_matrices, sample_augment_params
from .digits import load_image, prepare_digit
from .loader import DeviceLoader
from .marks import one_digit_problem
from .mnist import ENV_VAR, MNIST_FILES, cache_dir, find_mnist_root, load_mnist, mnist_files, read_idx
from .sets import TEST_METHODS, augmented_test_set, mnist_loaders

__all__ = [
    "ENV_VAR",
    "MNIST_FILES",
    "TEST_METHODS",
    "AugmentParams",
    "DeviceLoader",
    "MNISTDataset",
    "apply_augment",
    "article_transform",
    "augment_batch",
    "augment_matrices",
    "augmented_test_set",
    "cache_dir",
    "find_mnist_root",
    "load_image",
    "load_mnist",
    "mnist_files",
    "mnist_loaders",
    "one_digit_problem",
    "prepare_digit",
    "read_idx",
    "sample_augment_params",
]
