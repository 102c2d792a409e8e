"""timm's feature-extraction API for bnvit's models: which blocks to take features from.

`feature_take_indices` resolves `forward_intermediates`' `indices` with a clear error. Shared by
the ViT, the MLP and the builders (`features_only=True`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["feature_take_indices"]


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
