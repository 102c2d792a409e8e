"""timm's feature-extraction API for bnvit's models: which blocks to take features from, and taking them.

`feature_take_indices` resolves `forward_intermediates`' `indices` with a clear error;
`forward_blocks` is the loop of every model's `forward_intermediates`. Shared by the ViT, the MLP
and the builders (`features_only=True`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import _checks

__all__ = ["OUTPUT_FMTS", "feature_take_indices", "forward_blocks"]

OUTPUT_FMTS = ("NCHW", "NLC")
"""The valid values of `output_fmt` for `forward_intermediates`."""


def feature_take_indices(num_blocks: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """The blocks to take features from, as timm's `feature_take_indices`, with a clear error.

    Args:
        num_blocks: Number of blocks of the model.
        indices: `None` (all blocks), an int `n` (the last `n` blocks) or block indices
            (negative ones count from the end).

    Returns:
        The absolute indices, and the largest of them.

    Raises:
        ValueError: If an index is out of range; the message names the valid range.

    Examples:
        >>> feature_take_indices(6, 3)
        ([3, 4, 5], 5)
        >>> feature_take_indices(6, [0, -1])
        ([0, 5], 5)
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_blocks:
            raise ValueError(
                f"cannot take the last {indices} of the model's {num_blocks} blocks: an int must be in 1..{num_blocks}"
            )
        take = list(range(num_blocks - indices, num_blocks))
    else:
        indices = list(indices)
        wrong = [i for i in indices if not -num_blocks <= i < num_blocks]
        if wrong or not indices:
            raise ValueError(
                f"block indices {indices} out of range: the model has {num_blocks} blocks, "
                f"valid indices are 0..{num_blocks - 1} (or -{num_blocks}..-1 from the end)"
            )
        take = [i % num_blocks for i in indices]
    return take, max(take)


def forward_blocks(
    x: torch.Tensor,
    *,
    stem: Callable[[torch.Tensor], torch.Tensor],
    blocks: Sequence[nn.Module],
    indices: int | Sequence[int] | None,
    stop_early: bool,
    output_fmt: str,
    keep: Callable[[torch.Tensor], Any],
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[Any]]:
    """`stem(x)` through `blocks`, keeping `keep(output)` of those `indices` names: `forward_intermediates`' loop.

    `output_fmt` and `indices` are checked before anything runs. With `stop_early` the blocks
    after the last one taken are skipped. `run(block, x)` runs a block (default `block(x)`).

    Returns:
        The output of the last block run, and what `keep` made of the blocks taken, in order.

    Examples:
        >>> blocks = [nn.Linear(4, 4) for _ in range(3)]
        >>> x, kept = forward_blocks(torch.randn(2, 4), stem=torch.relu, blocks=blocks, indices=[0, 2],
        ...                          stop_early=False, output_fmt="NLC", keep=lambda y: y.shape)
        >>> kept
        [torch.Size([2, 4]), torch.Size([2, 4])]
    """
    _checks.choice("output_fmt", output_fmt, OUTPUT_FMTS)
    take, last = feature_take_indices(len(blocks), indices)
    x = stem(x)
    kept = []
    for i, block in enumerate(blocks[: last + 1] if stop_early else blocks):
        x = block(x) if run is None else run(block, x)
        if i in take:
            kept.append(keep(x))
    return x, kept
