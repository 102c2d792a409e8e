"""A tiny ViT and a toy task it learns in a few steps, shared by the training tests and the
multi-process worker (`ddp_worker.py`, which runs as a script and imports this module too)."""

from __future__ import annotations

import torch
from torch import nn

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


def tiny_model(norm: str = "bn_ffn", seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from bnvit import ViT

    torch.manual_seed(seed)
    return ViT(norm=norm, **TINY).to(dtype)


def toy_data(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightest quadrant tells the class (4 classes): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, 0, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] += 0.8
    return images, labels
