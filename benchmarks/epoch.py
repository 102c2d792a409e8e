"""One epoch of the article's setting end to end: 60,000 augmented images, depth 6, batch 100, Adam.

* **bnvit**: `fit()` with its defaults over a `DeviceLoader` (the batched on-device augmentation),
  validating on the frozen augmented test set.
* **straightforward**: the reference-style model, a `DataLoader` over the torchvision pipeline
  (`num_workers=0`, the images augmented one by one in Python), a plain training loop, and the
  test set augmented on the fly the same way, as the article's code does.

Both include evaluation on the 10,000 test images. Each is run once: an epoch is long enough that
its wall time is stable, and repeating it would take minutes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bnvit import ViTBNFFN, fit
from bnvit.data import DeviceLoader, MNISTDataset, article_transform, augmented_test_set, load_mnist
from common import synchronize
from reference_vit import ReferenceViT


def bnvit_epoch(device: torch.device, images: int, root=None) -> float:
    train_images, train_labels = load_mnist(root, train=True)
    test_images, test_labels = augmented_test_set(root)
    train = DeviceLoader(train_images[:images], train_labels[:images], batch_size=100, augment=True, device=device)
    val = DeviceLoader(test_images, test_labels, batch_size=5000, shuffle=False, device=device)
    torch.manual_seed(0)
    model = ViTBNFFN(depth=6)
    began = time.perf_counter()
    fit(model, train, val, epochs=1, lr=3e-3, device=device, progress=False, seed=0)
    synchronize(device)
    return time.perf_counter() - began


def straightforward_epoch(device: torch.device, images: int, root=None) -> float:
    train_set = MNISTDataset(root, train=True, transform=article_transform())
    test_set = MNISTDataset(root, train=False, transform=article_transform())
    train = DataLoader(Subset(train_set, range(images)), batch_size=100, shuffle=True)
    test = DataLoader(test_set, batch_size=5000)
    torch.manual_seed(0)
    model = ReferenceViT(bn_ffn=True, depth=6).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    began = time.perf_counter()
    model.train()
    for x, y in train:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    synchronize(device)
    return time.perf_counter() - began


def run(device: torch.device, images: int = 60_000, root=None) -> dict:
    fast = bnvit_epoch(device, images, root)
    slow = straightforward_epoch(device, images, root)
    return {"images": images, "bnvit_s": fast, "straightforward_s": slow, "speedup": slow / fast}
