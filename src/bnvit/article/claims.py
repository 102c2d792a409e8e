"""The article's claims as data, and verdicts on them computed from results.

Each claim names its models, depths, learning rates and what it expects; the grids of
`bnvit.article.grid` are built from these declarations, so a depth or a rate is written once.

The gap of a cell is the BatchNorm model's validation accuracy minus the baseline's, averaged
over epochs (the distance between the two curves of the article's figures), paired by seed, in
accuracy points. A verdict per cell is `reproduced`, `not reproduced` or `inconclusive`; see
`judge` for the rule with several seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import fmt, summarize

__all__ = [
    "CLAIMS",
    "CLEARLY",
    "COMPARABLE",
    "DEPTH_CLAIMS",
    "LR_DROP",
    "LR_DROP_CLAIM",
    "MLP_CLAIM",
    "SLIGHTLY",
    "VIT_MODELS",
    "Part",
    "Verdict",
    "claim_cells",
    "judge",
    "verdicts",
]

VIT_MODELS = ("vit_mnist", "vitbnffn_mnist")
MLP_MODELS = ("dnn_mnist", "dnnbn_mnist")
LABELS = {"vit_mnist": "ViT", "vitbnffn_mnist": "ViTBNFFN", "dnn_mnist": "DNN_d3", "dnnbn_mnist": "DNNBN_d3"}

# Thresholds, in accuracy points, applied to the mean over epochs of the validation-accuracy gap.
COMPARABLE = 1.5
SLIGHTLY = 0.5
CLEARLY = 2.0
# Claim 3: how many points more ViT must lose than ViTBNFFN when the learning rate goes up.
LR_DROP = 5.0

# What each expectation asks of a gap, as the interval [low, high) of gaps that satisfy it
# ("comparable" is the open interval (-COMPARABLE, COMPARABLE)).
EXPECTATIONS = {
    "comparable": (-COMPARABLE, COMPARABLE),
    "slightly": (SLIGHTLY, math.inf),
    "clearly": (CLEARLY, math.inf),
    "lr_drop": (LR_DROP, math.inf),
}

EXPECTATION_TEXT = {
    "comparable": f"comparable (gap within ±{COMPARABLE})",
    "slightly": f"slightly ahead (gap >= {SLIGHTLY})",
    "clearly": f"clearly ahead (gap >= {CLEARLY})",
    "lr_drop": f"ViT loses >= {LR_DROP} pts more",
}


@dataclass(frozen=True)
class DepthClaim:
    """Claims 1 and 2: at one learning rate, what the gap should be at each depth."""

    number: int
    lr: float
    expect: Mapping[int, str]
    text: str
    models: tuple[str, str] = VIT_MODELS


@dataclass(frozen=True)
class LrDropClaim:
    """Claim 3: raising the learning rate costs the baseline at least `LR_DROP` points more."""

    number: int
    depth: int
    lrs: tuple[float, float]
    depths: tuple[int, ...]  # the learning-rate figure's depths
    text: str
    models: tuple[str, str] = VIT_MODELS


@dataclass(frozen=True)
class MlpClaim:
    """Claim 4: the MLP with BatchNorm converges faster at the low rate and survives the high one."""

    number: int
    depth: int
    lrs: tuple[float, float]
    text: str
    models: tuple[str, str] = MLP_MODELS
    early_divisor: int = 3  # "faster": the gap over the first third (1 / early_divisor) of training
    stable: float = 0.9  # final accuracy the BatchNorm MLP must reach at the high rate
    broken_margin: float = 0.10  # how far below it the plain MLP must end (or diverge)


DEPTH_CLAIMS = {
    1: DepthClaim(
        1,
        0.003,
        {4: "comparable", 5: "comparable", 6: "clearly", 7: "clearly"},
        "lr 0.003: ViT and ViTBNFFN comparable at depths 4-5; ViTBNFFN clearly ahead at depths 6 and 7.",
    ),
    2: DepthClaim(
        2,
        0.005,
        {1: "comparable", 2: "comparable", 3: "slightly", 4: "clearly"},
        "lr 0.005: comparable at depths 1-2; ViTBNFFN slightly ahead at depth 3; clearly ahead at depth 4.",
    ),
}
LR_DROP_CLAIM = LrDropClaim(
    3,
    3,
    (0.003, 0.005),
    (2, 3, 4),
    "depth 3, lr 0.003 -> 0.005 at epoch 10: ViT falls from about 91% to about 78%, "
    "ViTBNFFN only from about 92% to about 90%.",
)
MLP_CLAIM = MlpClaim(
    4,
    3,
    (0.01, 0.1),
    "MLP: with BatchNorm it converges faster at lr 0.01, and stays stable at lr 0.1 where the plain MLP breaks down.",
)
CLAIMS = {
    **{n: c.text for n, c in DEPTH_CLAIMS.items()},
    LR_DROP_CLAIM.number: LR_DROP_CLAIM.text,
    MLP_CLAIM.number: MLP_CLAIM.text,
}


def claim_cells(claims: Iterable[int]) -> set[tuple[float, int]]:
    """The `(lr, depth)` cells the given claims judge (claim 4's MLP cells included)."""
    cells: set[tuple[float, int]] = set()
    for number in claims:
        if number in DEPTH_CLAIMS:
            cells.update((DEPTH_CLAIMS[number].lr, depth) for depth in DEPTH_CLAIMS[number].expect)
        elif number == LR_DROP_CLAIM.number:
            cells.update((lr, LR_DROP_CLAIM.depth) for lr in LR_DROP_CLAIM.lrs)
        elif number == MLP_CLAIM.number:
            cells.update((lr, MLP_CLAIM.depth) for lr in MLP_CLAIM.lrs)
    return cells


@dataclass
class Part:
    """One judged piece of a claim (a depth, a learning-rate change, one half of claim 4).

    Attributes:
        label: Which cell(s): `"lr 0.003, depth 4"`.
        expect: The expectation (`"comparable"`, `"slightly"`, `"clearly"`, `"lr_drop"`, or a
            description for parts judged on means).
        values: Per-seed values judged, in accuracy points (gaps, or extra drops).
        seeds: The seeds of `values`.
        verdict: `reproduced`, `not reproduced` or `inconclusive`.
        cells: `(model, depth, lr)` of every cell the part needs (more seeds go there).
        straddles: The seeds' spread straddles the threshold (a close call: more seeds help).
    """

    label: str
    expect: str
    values: list[float]
    seeds: list[int]
    verdict: str
    cells: tuple[tuple[str, int, float], ...] = ()
    straddles: bool = False


@dataclass
class Verdict:
    """A claim with what the results show and the verdict computed from them."""

    claim: int
    article: str
    measured: str
    verdict: str
    parts: list[Part] = field(default_factory=list)


def _satisfies(gap: float, expect: str) -> bool:
    low, high = EXPECTATIONS[expect]
    return abs(gap) < COMPARABLE if expect == "comparable" else low <= gap < high


def judge(gaps: Sequence[float], expect: str) -> tuple[str, str]:
    """Verdict on per-seed gaps: do they show what the article says (`expect`)?

    With one seed the mean decides. With several, the verdict is `reproduced` only when the
    whole range mean ± standard deviation satisfies the expectation, `not reproduced` when none
    of it does, and `inconclusive` when the range straddles the threshold: the seeds' spread
    covers the difference between the measured gap and the one the claim needs.

    Returns:
        `(verdict, text)`, the text being `"+1.2 ± 0.3 pts"`.
    """
    mean = statistics.fmean(gaps)
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    text = f"{mean:+.1f}" + (f" ± {spread:.1f}" if len(gaps) > 1 else "") + " pts"
    ends = (mean - spread, mean + spread)
    if all(_satisfies(end, expect) for end in ends):
        return "reproduced", text
    low, high = EXPECTATIONS[expect]
    if ends[1] <= low or ends[0] >= high:
        return "not reproduced", text
    return "inconclusive", text


def _combine(parts: Sequence[str]) -> str:
    if not parts:
        return "inconclusive"
    if all(p == "reproduced" for p in parts):
        return "reproduced"
    if "not reproduced" in parts:
        return "not reproduced"
    return "inconclusive"


def _by_seed(group: Mapping[str, Any]) -> dict[int, list[float]]:
    return {r["cell"]["seed"]: c for r, c in zip(group["results"], group["curves"], strict=True)}


def paired(groups, models: tuple[str, str], depth: int, lr: float, metric: Callable) -> tuple[list[int], list[float]]:
    """Seeds and per-seed gaps `metric(bn) - metric(base)` in accuracy points, paired by seed."""
    a, b = groups.get((models[0], depth, lr)), groups.get((models[1], depth, lr))
    if not a or not b:
        return [], []
    by_seed_a, by_seed_b = _by_seed(a), _by_seed(b)
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    return seeds, [100 * (metric(by_seed_b[s]) - metric(by_seed_a[s])) for s in seeds]


def mean_over_epochs(curve: Sequence[float]) -> float:
    """The mean of a curve's measured epochs."""
    return statistics.fmean(v for v in curve if not math.isnan(v))


def final(curve: Sequence[float]) -> float:
    """A curve's last measured value."""
    finite = [v for v in curve if not math.isnan(v)]
    return finite[-1] if finite else math.nan


def _judged_part(label: str, expect: str, seeds, values, cells) -> tuple[Part, str]:
    if not values:
        return Part(label, expect, [], [], "inconclusive", cells), f"{label.split(', ')[-1]}: not run"
    verdict, text = judge(values, expect)
    straddles = verdict == "inconclusive"
    return Part(label, expect, values, seeds, verdict, cells, straddles), text


def _depth_claim(groups, claim: DepthClaim) -> Verdict:
    parts, texts = [], []
    for depth, expect in claim.expect.items():
        seeds, gaps = paired(groups, claim.models, depth, claim.lr, mean_over_epochs)
        cells = tuple((m, depth, claim.lr) for m in claim.models)
        part, text = _judged_part(f"lr {claim.lr:g}, depth {depth}", expect, seeds, gaps, cells)
        parts.append(part)
        texts.append(text if not gaps else f"depth {depth}: {text} ({expect} expected: {part.verdict})")
    return Verdict(claim.number, claim.text, "; ".join(texts), _combine([p.verdict for p in parts]), parts)


def _lr_drop_claim(groups, claim: LrDropClaim = LR_DROP_CLAIM) -> Verdict:
    low_lr, high_lr = claim.lrs
    cells = tuple((m, claim.depth, lr) for lr in claim.lrs for m in claim.models)
    label = f"depth {claim.depth}, lr {low_lr:g} -> {high_lr:g}"
    drops: dict[str, dict[int, float]] = {}
    texts = []
    for model in claim.models:
        low, high = groups.get((model, claim.depth, low_lr)), groups.get((model, claim.depth, high_lr))
        if not low or not high:
            measured = f"depth {claim.depth} at lr {low_lr:g} and {high_lr:g} not both run"
            return Verdict(
                claim.number,
                claim.text,
                measured,
                "inconclusive",
                [Part(label, "lr_drop", [], [], "inconclusive", cells)],
            )
        low_by, high_by = _by_seed(low), _by_seed(high)
        drops[model] = {s: 100 * (final(low_by[s]) - final(high_by[s])) for s in sorted(set(low_by) & set(high_by))}
        texts.append(
            f"{LABELS[model]} {fmt([final(c) for c in low['curves']])}% -> {fmt([final(c) for c in high['curves']])}%"
        )
    base, bn = (drops[m] for m in claim.models)
    seeds = sorted(set(base) & set(bn))
    extra = [base[s] - bn[s] for s in seeds]
    part, text = _judged_part(label, "lr_drop", seeds, extra, cells)
    texts.append(f"ViT loses {text} more")
    return Verdict(claim.number, claim.text, "; ".join(texts), part.verdict, [part])


def _mlp_claim(groups, claim: MlpClaim = MLP_CLAIM) -> Verdict:
    base, bn = claim.models
    low_lr, high_lr = claim.lrs
    texts, parts = [], []

    def early(c: Sequence[float]) -> float:
        return mean_over_epochs(c[: max(1, len(c) // claim.early_divisor)])

    seeds, gaps = paired(groups, claim.models, claim.depth, low_lr, early)
    label = f"lr {low_lr:g}, first third of training"
    part, text = _judged_part(label, "clearly", seeds, gaps, tuple((m, claim.depth, low_lr) for m in claim.models))
    texts.append(f"{label}: BN {text} ({part.verdict})" if gaps else f"lr {low_lr:g} not run")
    parts.append(part)
    low, high = groups.get((base, claim.depth, high_lr)), groups.get((bn, claim.depth, high_lr))
    label = f"lr {high_lr:g}, final"
    expect = f"BN ends >= {100 * claim.stable:.0f}%, plain {100 * claim.broken_margin:.0f} pts lower or diverged"
    if not low or not high:
        texts.append(f"lr {high_lr:g} not run")
        parts.append(Part(label, expect, [], [], "inconclusive"))
    else:
        plain = [final(c) for c in low["curves"]]
        with_bn = [final(c) for c in high["curves"]]
        stable = statistics.fmean(with_bn) >= claim.stable
        broke = statistics.fmean(plain) <= statistics.fmean(with_bn) - claim.broken_margin or any(
            r["history"]["diverged_at"] for r in low["results"]
        )
        verdict = "reproduced" if stable and broke else "not reproduced"
        texts.append(f"lr {high_lr:g}, final: DNN {fmt(plain)}%, DNNBN {fmt(with_bn)}% ({verdict})")
        seeds, finals = paired(groups, claim.models, claim.depth, high_lr, final)
        parts.append(Part(label, expect, finals, seeds, verdict))
    return Verdict(claim.number, claim.text, "; ".join(texts), _combine([p.verdict for p in parts]), parts)


def verdicts(results: Sequence[Mapping[str, Any]], claims: Iterable[int] = (1, 2, 3, 4)) -> list[Verdict]:
    """The article's claims, each with what the results show and a verdict computed from them.

    A verdict is `reproduced`, `not reproduced`, or `inconclusive` (data missing, or the
    range mean ± std over seeds straddles the threshold the claim needs). Claims about curves
    use the mean over epochs of the validation-accuracy gap, paired by seed; thresholds are
    `COMPARABLE`, `SLIGHTLY` and `CLEARLY` points, and `LR_DROP` for claim 3. A claim judged at
    several depths is reproduced when every depth is, not reproduced when any depth is not.
    """
    groups = summarize(results)
    out = []
    for claim in claims:
        if claim in DEPTH_CLAIMS:
            out.append(_depth_claim(groups, DEPTH_CLAIMS[claim]))
        elif claim == LR_DROP_CLAIM.number:
            out.append(_lr_drop_claim(groups))
        elif claim == MLP_CLAIM.number:
            out.append(_mlp_claim(groups))
        else:
            raise ValueError(f"unknown claim {claim!r}; the article's claims are {sorted(CLAIMS)}")
    return out


def close_calls(results: Sequence[Mapping[str, Any]], claims: Iterable[int]) -> set[tuple[str, int, float]]:
    """The `(model, depth, lr)` cells of every part whose seeds straddle its threshold."""
    return {cell for v in verdicts(results, claims) for part in v.parts if part.straddles for cell in part.cells}
