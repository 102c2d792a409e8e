"""MNIST for the article's experiments: the faithful torchvision pipeline and a fast batched one.

* Files: `find_mnist_root` (`root` argument > `$BNVIT_DATA` > user cache folder) and
  `load_mnist` (uint8 tensors from our own IDX reader, cached in memory; torchvision's
  download on request; clear errors for missing, truncated or corrupt files).
* The reference: `article_transform` (the article's torchvision augmentation) and
  `MNISTDataset`.
* The fast path: `augment_batch` augments a whole batch on its device with one
  `grid_sample`, equal in distribution (and, for the same parameters, nearly pixel for pixel)
  to the reference; `DeviceLoader` shuffles, shards and batches on the device.
* `augmented_test_set` freezes one augmented draw of the test set; `mnist_loaders`
  builds the article's train and test loaders in one call.
* `prepare_digit` turns a picture of a handwritten digit (a photo, a scan, dark on light)
  into an MNIST-style 28x28 image, the way MNIST digits were prepared.

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
