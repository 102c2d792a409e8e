"""The protocol's tests: thresholds, one-sided t-tests against an expectation's bounds, and how they print.

Fixed before the ten-seed runs (docs/reproducing.md, "The protocol"); `bnvit.experiments.claims`
applies `judge` to each part of each claim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .stats import mean_std, seeds_needed, t_interval, t_test

__all__ = [
    "ALPHA",
    "CLEARLY",
    "COMPARABLE",
    "EXPECTATIONS",
    "EXPECTATION_TEXT",
    "FASTER",
    "LEVEL",
    "LR_DROP",
    "SLIGHTLY",
    "TARGET_ACC",
    "Test",
    "both",
    "decide",
    "describe",
    "interval_text",
    "judge",
    "p_text",
    "points_text",
    "signed",
]

# Thresholds, in accuracy points, applied to the mean over epochs of the validation-accuracy gap.
COMPARABLE = 1.5  # the equivalence margin: "comparable" is a gap inside (-1.5, +1.5)
SLIGHTLY = 0.5  # "slightly ahead" is a gap in [+0.5, +2.0)
CLEARLY = 2.0  # "clearly ahead" is a gap of +2.0 or more
# Claim 3: how many points more ViT must lose than ViTBNFFN when the learning rate goes up.
LR_DROP = 5.0
# Claim 4 at the low rate: "faster" is at most this fraction of the plain MLP's steps to `TARGET_ACC`.
FASTER = 0.8
TARGET_ACC = 0.9
ALPHA = 0.05  # every one-sided test; the printed intervals are two-sided at 1 - 2 * ALPHA (90%)
LEVEL = 1 - 2 * ALPHA

# What each expectation needs of the mean of a part's per-seed values: each bound is
# (side, value): the mean must be shown "above" or "below" the value, all of them at once.
EXPECTATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "comparable": (("above", -COMPARABLE), ("below", COMPARABLE)),
    "slightly": (("above", SLIGHTLY), ("below", CLEARLY)),
    "clearly": (("above", CLEARLY),),
    "lr_drop": (("above", LR_DROP),),
    "faster": (("below", math.log(FASTER)),),
}

EXPECTATION_TEXT = {
    "comparable": f"comparable (gap within ±{COMPARABLE})",
    "slightly": f"slightly ahead (gap in [+{SLIGHTLY}, +{CLEARLY}))",
    "clearly": f"clearly ahead (gap >= +{CLEARLY})",
    "lr_drop": f"ViT loses >= {LR_DROP} pts more",
    "faster": f"DNNBN needs <= {FASTER:.0%} of DNN's steps to {TARGET_ACC:.0%} train accuracy",
}


@dataclass(frozen=True)
class Test:
    """A part's per-seed values judged by the protocol's one-sided t-tests (see `judge`).

    Attributes:
        n: Number of values (paired seeds).
        mean: Their mean.
        std: Their sample standard deviation (`None` for one value).
        interval: The 90% two-sided t-interval, whose ends are the one-sided 5% tests' bounds.
        p_hold: p-value for "the expectation holds" (the largest of the tests it needs).
        p_fail: p-value for "it does not" (the smallest of the tests that could show it).
        verdict: `reproduced`, `not reproduced` or `inconclusive`.
        needed: For an inconclusive part, the seeds for 80% power at 5%, were the observed mean
            and std true (`None`: decided, or no number would).
    """

    n: int
    mean: float
    std: float | None
    interval: tuple[float, float] | None
    p_hold: float
    p_fail: float
    verdict: str
    needed: int | None = None


def decide(p_hold: float, p_fail: float) -> str:
    """`reproduced` when the "holds" p-value is below `ALPHA`, `not reproduced` when the "fails" one is."""
    if p_hold < ALPHA:
        return "reproduced"
    if p_fail < ALPHA:
        return "not reproduced"
    return "inconclusive"


def judge(values: Sequence[float], bounds: Sequence[tuple[str, float]] | str) -> Test:
    """The protocol's verdict on per-seed values: is their mean shown on the expected side of every bound?

    Each bound `("above", b)` or `("below", b)` is a one-sided 5% t-test. `reproduced` when every
    test rejects (intersection-union; TOST for "comparable"), `not reproduced` when one rejects the
    other way, else (and always with one value) `inconclusive`.

    Args:
        values: The per-seed values.
        bounds: The bounds, or the name of an expectation in `EXPECTATIONS`.

    Examples:
        >>> judge([2.5, 3.0, 3.5, 3.0], "clearly").verdict  # mean 3.0, 90% interval [2.52, 3.48]
        'reproduced'
        >>> judge([0.5, -0.4, 2.0, 1.1], "comparable").verdict  # [-0.41, +2.01] reaches past +1.5
        'inconclusive'
    """
    bounds = EXPECTATIONS[bounds] if isinstance(bounds, str) else tuple(bounds)
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return Test(0, math.nan, None, None, 1.0, 1.0, "inconclusive")
    mean, std = mean_std(values)
    interval = t_interval(values, level=LEVEL)
    opposite = {"above": "less", "below": "greater"}
    p_hold = max(t_test(values, b, "greater" if side == "above" else "less") for side, b in bounds)
    p_fail = min(t_test(values, b, opposite[side]) for side, b in bounds)
    verdict = decide(p_hold, p_fail)
    needed = None
    if verdict == "inconclusive" and std is not None:
        # How far the mean lies from the bound that must be cleared: the nearest one if it is on the
        # expected side of all of them, else the farthest one it is on the wrong side of.
        signed = [(mean - b) if side == "above" else (b - mean) for side, b in bounds]
        distance = min(signed) if min(signed) > 0 else max(-d for d in signed)
        needed = seeds_needed(mean, std, distance, ALPHA)
    return Test(len(values), mean, std, interval, p_hold, p_fail, verdict, needed)


def both(first: Test, second: Test) -> Test:
    """Two tests that must both hold (on different samples): the first's numbers, the joint p-values."""
    p_hold, p_fail = max(first.p_hold, second.p_hold), min(first.p_fail, second.p_fail)
    verdict = decide(p_hold, p_fail)
    needed = max(t.needed or 0 for t in (first, second)) or None if verdict == "inconclusive" else None
    return dataclasses.replace(first, p_hold=p_hold, p_fail=p_fail, verdict=verdict, needed=needed)


def describe(test: Test | None, unit: str = " pts") -> str:
    """`"+1.37 ± 1.02 pts, 90% CI [+0.39, +2.35]"`: every number rounded once, from the exact value."""
    if test is None or test.n == 0:
        return "not run"
    text = f"{signed(test.mean)}" + (f" ± {test.std:.2f}" if test.std is not None else "") + unit
    if test.interval is None:
        return text + " (1 seed: nothing can be tested)"
    return text + f", 90% CI {interval_text(test.interval)}"


def interval_text(interval: tuple[float, float] | None) -> str:
    """`"[-0.41, +2.01]"` (two decimals, rounded once; never "-0.00")."""
    if interval is None:
        return "–"
    return f"[{signed(interval[0])}, {signed(interval[1])}]"


def signed(x: float) -> str:
    """`"+1.37"`: two decimals, rounded once, ties away from zero, never "-0.00".

    Rounded to 9 decimals first, so a decimal tie (`13.715`) prints the same whatever float noise.

    Examples:
        >>> signed(13.715), signed(-13.715), signed(0.004), signed(-0.004)
        ('+13.72', '-13.72', '+0.00', '+0.00')
    """
    rounded = Decimal(repr(round(x, 9))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{float(rounded) + 0.0:+.2f}"


def points_text(values: Sequence[float], empty: str = "–") -> str:
    """`"+1.37 ± 1.02"`: the mean ± std of per-seed values in points, rounded once (`empty` for none)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return empty
    return signed(mean) + ("" if std is None else f" ± {std:.2f}")


def p_text(p: float | None) -> str:
    """A p-value, rounded once: `"0.003"`, `"<0.001"` (`"–"` for none)."""
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
