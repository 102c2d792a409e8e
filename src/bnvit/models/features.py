"""timm's feature and input-size API for bnvit's models: feature indices, input checks, resized embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .._util import checks as _checks

__all__ = ["OUTPUT_FMTS", "check_images", "feature_take_indices", "forward_blocks", "input_cfg", "resample_pos_embed"]

OUTPUT_FMTS = ("NCHW", "NLC")
"""The valid values of `output_fmt` for `forward_intermediates`."""


def feature_take_indices(num_blocks: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """The blocks to take features from, as timm's `feature_take_indices`; returns `(indices, max index)`.

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
    """The loop of `forward_intermediates`: run `blocks`, keeping `keep(output)` of those in `indices`.

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


def check_images(
    x: torch.Tensor, in_chans: int, img_size: tuple[int, int], patch_size: int | None = None
) -> torch.Tensor:
    """Return `x` if it is a float `(B, in_chans, *img_size)` batch (any size `patch_size` divides); else raise.

    Examples:
        >>> check_images(torch.rand(2, 1, 28, 28), 1, (28, 28)).shape
        torch.Size([2, 1, 28, 28])
        >>> check_images(torch.rand(2, 1, 56, 42), 1, (28, 28), patch_size=7).shape
        torch.Size([2, 1, 56, 42])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
    if patch_size is None:
        expected = (in_chans, *img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
    elif x.ndim != 4 or x.shape[1] != in_chans or x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(
            f"expected images of shape (batch, {in_chans}, H, W) with H and W multiples of the patch size "
            f"{patch_size}, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images (uint8 ones divided by 255), got dtype {x.dtype}")
    return x


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """A `(1, 1 + h * w, dim)` positional embedding resampled to another grid, CLS kept (as timm's).

    Raises:
        ValueError: If `old_grid` is not given and the patch tokens do not form a square.

    Examples:
        >>> resample_pos_embed(torch.randn(1, 17, 64), (8, 8)).shape
        torch.Size([1, 65, 64])
    """
    if old_grid is None:
        side = round((pos_embed.shape[1] - 1) ** 0.5)
        if side * side != pos_embed.shape[1] - 1:
            raise ValueError(
                f"a positional embedding of {pos_embed.shape[1] - 1} patch tokens is not a square grid; give old_grid"
            )
        old_grid = (side, side)
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=1)


def input_cfg(cfg: dict[str, Any], in_chans: int, img_size: tuple[int, int]) -> dict[str, Any]:
    """A timm pretrained `cfg` made to describe `(in_chans, *img_size)` images.

    Examples:
        >>> cfg = input_cfg(dict(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,)), 3, (28, 28))
        >>> cfg["input_size"], cfg["mean"], cfg["std"]
        ((3, 28, 28), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    """
    out = dict(cfg, input_size=(in_chans, *img_size))
    for key in ("mean", "std"):
        values = tuple(cfg.get(key) or ())
        if values and len(values) != in_chans:
            out[key] = values * in_chans if len(values) == 1 else (sum(values) / len(values),) * in_chans
    if "test_input_size" in cfg:
        out["test_input_size"] = (in_chans, *tuple(cfg["test_input_size"])[1:])
    return out
