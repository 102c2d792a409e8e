"""Whether a prepared picture holds one handwritten digit, so that an answer on anything else is marked a guess."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .digits import MNIST_SIZE

__all__ = ["ONE_DIGIT_LIMITS", "SECOND_MARK_SHARE", "InkMarks", "ink_marks", "one_digit_problem"]


@dataclass(frozen=True)
class InkMarks:
    """What the ink of a prepared digit looks like: the measures `one_digit_problem` judges.

    Attributes:
        marks: Separate marks (8-connected groups of pixels over 0.5).
        second_share: The second-largest mark's share of the ink (0 for one mark).
        side_by_side: Whether the two largest marks share at most a fifth of their columns.
        cover: The share of the 28x28 field that is ink.
        gaps: Enclosed background regions (an 8 has two, noise dozens).
        faint: The share of lit pixels (over 0.1) that are faint (under 0.6).
        edge: The ink's total variation per unit of ink: low for solid areas.
    """

    marks: int
    second_share: float
    side_by_side: bool
    cover: float
    gaps: int
    faint: float
    edge: float


# Fitted by examples/one_digit_check.py --fit on MNIST training images (never the test set), each
# as it is and enlarged to a picture of 40-200 pixels, dark on light: each upper limit is the 99.9th
# percentile of its measure over those digits, `edge`'s lower limit the 0.1th. docs/weights.md
# gives the share of clean test digits and of generated non-digits flagged.
ONE_DIGIT_LIMITS = {"cover": 0.28, "gaps": 3, "faint": 0.66, "edge": 0.48}
"""`one_digit_problem`'s limits: at most `cover`, `gaps` and `faint`, at least `edge` (`InkMarks`)."""
SECOND_MARK_SHARE = 0.12
"""A second mark side by side with the first and holding at least this share of the ink is a second digit."""


def ink_marks(x: torch.Tensor) -> InkMarks:
    """The `InkMarks` of a prepared digit (`prepare_digit`'s `(1, 28, 28)` output, or `(28, 28)`)."""
    x = x.reshape(MNIST_SIZE, MNIST_SIZE).float()
    ink = x > 0.5
    labels = _components(ink, diagonal=True)
    ids, sizes = labels[ink].unique(return_counts=True)
    order = sizes.argsort(descending=True)
    total = int(sizes.sum())
    second = float(sizes[order[1]]) / total if len(ids) > 1 else 0.0
    side_by_side = False
    if len(ids) > 1:
        first_cols = (labels == ids[order[0]]).any(0).nonzero()[:, 0]
        second_cols = (labels == ids[order[1]]).any(0).nonzero()[:, 0]
        shared = min(int(first_cols.max()), int(second_cols.max())) - max(int(first_cols.min()), int(second_cols.min()))
        side_by_side = max(0, shared + 1) <= 0.2 * min(len(first_cols), len(second_cols))
    background = _components(~ink, diagonal=False)
    gaps = max(0, len(background[~ink].unique()) - 1)
    lit = x > 0.1
    faint = float((lit & (x < 0.6)).sum()) / max(1, int(lit.sum()))
    variation = float((x[1:] - x[:-1]).abs().sum() + (x[:, 1:] - x[:, :-1]).abs().sum())
    edge = variation / max(float(x.sum()), 1e-12)
    return InkMarks(len(ids), second, side_by_side, float(ink.float().mean()), gaps, faint, edge)


def one_digit_problem(x: torch.Tensor) -> str | None:
    """Why a prepared picture does not hold one handwritten digit (several marks, or ink unlike a digit's), or None.

    Args:
        x: `prepare_digit`'s output.

    Returns:
        A short reason, or None.

    Examples:
        >>> two = torch.zeros(28, 28); two[6:22, 5:8] = 1; two[6:22, 18:21] = 1  # "11"
        >>> one_digit_problem(two)
        '2 separate marks side by side, like a number'
        >>> one = torch.zeros(28, 28); one[4:24, 12:15] = 1
        >>> one_digit_problem(one) is None
        True
    """
    m = ink_marks(x)
    if m.marks > 1 and m.side_by_side and m.second_share >= SECOND_MARK_SHARE:
        return f"{m.marks} separate marks side by side, like a number"
    unlike = []
    if m.cover > ONE_DIGIT_LIMITS["cover"]:
        unlike.append(f"ink over {m.cover:.0%} of the field")
    if m.gaps > ONE_DIGIT_LIMITS["gaps"]:
        unlike.append(f"{m.gaps} enclosed gaps")
    if m.faint > ONE_DIGIT_LIMITS["faint"]:
        unlike.append(f"{m.faint:.0%} of it faint")
    if m.edge < ONE_DIGIT_LIMITS["edge"]:
        unlike.append("solid areas, not strokes")
    if unlike:
        return f"not like a handwritten digit ({', '.join(unlike)}): noise, a texture or something else"
    return None


def _components(mask: torch.Tensor, *, diagonal: bool) -> torch.Tensor:
    """Labels of the connected groups of `mask` (`(H, W)` bool; 8-connected if `diagonal`, else 4); 0 off the mask."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w), torch.zeros(()))
    while True:
        padded = F.pad(labels[None, None], (1, 1, 1, 1))[0, 0]
        if diagonal:
            grown = F.max_pool2d(padded[None, None], 3, stride=1)[0, 0]
        else:
            shifts = (padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
            grown = torch.stack(shifts).amax(0)
        grown = grown * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown
