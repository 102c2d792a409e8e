"""The article's claims as data, and verdicts on them computed from results.

A cell's gap is the BatchNorm model's validation accuracy minus the baseline's, averaged over
epochs and paired by seed, in points; the grids of `bnvit.experiments.grid` are built from
these declarations.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .protocol import (
    ALPHA,
    CLEARLY,
    COMPARABLE,
    EXPECTATIONS,
    FASTER,
    LEVEL,
    LR_DROP,
    SLIGHTLY,
    TARGET_ACC,
    Test,
    both,
    describe,
    interval_text,
    judge,
)
from .stats import fmt, holm, summarize

__all__ = [
    "ALPHA",
    "BUILT_AS",
    "CLAIMS",
    "CLEARLY",
    "COMPARABLE",
    "DEPTH_CLAIMS",
    "EXPECTATIONS",
    "FASTER",
    "LEVEL",
    "LR_DROP",
    "LR_DROP_CLAIM",
    "MLP_CLAIM",
    "NOT_JUDGED",
    "SLIGHTLY",
    "TARGET_ACC",
    "TIMM_MODELS",
    "VIT_MODELS",
    "Part",
    "Test",
    "Verdict",
    "claim_cells",
    "describe",
    "interval_text",
    "judge",
    "steps_to",
    "verdicts",
]

VIT_MODELS = ("vit_mnist", "vitbnffn_mnist")
MLP_MODELS = ("dnn_mnist", "dnnbn_mnist")
TIMM_MODELS = ("timmvit_mnist", "timmvit_bnffn_mnist")  # the transfer study: timm's ViT, timm's Block vs BNFFNBlock
# Result keys are stable identifiers of published data. The harness labels its models by the names
# they had when the studies began: those labels are in every results line (`vit_mnist-d3-lr0.003-s0`),
# report and figure under docs/results/, and a resumed study finds its finished cells by them. A cell
# is built through the name timm registers its model under now (`bnvit.weights.names`); this is the only
# place the two differ.
BUILT_AS = {
    "vit_mnist": "vitln_mnist",
    "timmvit_mnist": "timmvitln_mnist",
    "timmvit_bnffn_mnist": "timmvitbnffn_mnist",
}
"""Harness label -> the registered model a cell of it builds (a label not here is itself a registered name)."""
LABELS = {
    "vit_mnist": "ViT",
    "vitbnffn_mnist": "ViTBNFFN",
    "dnn_mnist": "DNN_d3",
    "dnnbn_mnist": "DNNBN_d3",
    "timmvit_mnist": "timm ViT",
    "timmvit_bnffn_mnist": "timm ViT + BNFFNBlock",
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
    early_divisor: int = 3  # the epoch-level row shown for reference: the first third of training
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
        expect: The expectation (a key of `EXPECTATIONS`, or a description).
        values: Per-seed values judged (gaps in points, extra drops, log step ratios).
        seeds: The seeds of `values`.
        verdict: `reproduced`, `not reproduced`, `inconclusive`, or `not judged` (shown only).
        cells: `(model, depth, lr)` of every cell the part needs.
        test: The tests' numbers (`None` when nothing could be tested).
        note: What else the reader needs.
        p_hold_holm: `test.p_hold` after Holm's correction over the claim's judged parts.
        p_fail_holm: `test.p_fail` after Holm's correction over the claim's judged parts.
    """

    label: str
    expect: str
    values: list[float]
    seeds: list[int]
    verdict: str
    cells: tuple[tuple[str, int, float], ...] = ()
    test: Test | None = None
    note: str = ""
    p_hold_holm: float | None = None
    p_fail_holm: float | None = None

    @property
    def judged(self) -> bool:
        return self.verdict != NOT_JUDGED


NOT_JUDGED = "not judged"


@dataclass
class Verdict:
    """A claim with what the results show and the verdict computed from them."""

    claim: int
    article: str
    measured: str
    verdict: str
    parts: list[Part] = field(default_factory=list)


def _combine(parts: Sequence[Part]) -> str:
    """A claim's verdict from its judged parts, with Holm's correction over them (stored on the parts)."""
    judged = [p for p in parts if p.judged]
    if not judged:
        return "inconclusive"
    holds = holm([p.test.p_hold if p.test else 1.0 for p in judged])
    fails = holm([p.test.p_fail if p.test else 1.0 for p in judged])
    for part, p_hold, p_fail in zip(judged, holds, fails, strict=True):
        part.p_hold_holm, part.p_fail_holm = p_hold, p_fail
    if all(p < ALPHA for p in holds):
        return "reproduced"
    if any(p < ALPHA for p in fails):
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
    test = judge(values, expect) if values else None
    part = Part(label, expect, values, seeds, test.verdict if test else "inconclusive", cells, test)
    return part, describe(test)


def _depth_claim(groups, claim: DepthClaim) -> Verdict:
    parts, texts = [], []
    for depth, expect in claim.expect.items():
        seeds, gaps = paired(groups, claim.models, depth, claim.lr, mean_over_epochs)
        cells = tuple((m, depth, claim.lr) for m in claim.models)
        part, text = _judged_part(f"lr {claim.lr:g}, depth {depth}", expect, seeds, gaps, cells)
        parts.append(part)
        texts.append(f"depth {depth}: not run" if not gaps else f"depth {depth}: {text} ({expect}: {part.verdict})")
    return Verdict(claim.number, claim.text, "; ".join(texts), _combine(parts), parts)


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
            part = Part(label, "lr_drop", [], [], "inconclusive", cells)
            return Verdict(claim.number, claim.text, measured, _combine([part]), [part])
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
    return Verdict(claim.number, claim.text, "; ".join(texts), _combine([part]), [part])


def steps_to(result: Mapping[str, Any], target: float = TARGET_ACC) -> int | None:
    """The first recorded step (`fit(log_every=...)`) whose training accuracy reaches `target`, or None."""
    for record in result["history"].get("steps") or ():
        if record["train_acc"] is not None and record["train_acc"] >= target:
            return record["step"]
    return None


def _speed_part(groups, claim: MlpClaim, lr: float) -> tuple[Part, str]:
    """Claim 4 at the low rate: the paired log-ratio of the MLPs' steps to `TARGET_ACC` training accuracy."""
    base, bn = claim.models
    cells = tuple((m, claim.depth, lr) for m in claim.models)
    label = f"lr {lr:g}, steps to {TARGET_ACC:.0%} train accuracy"
    a, b = groups.get((base, claim.depth, lr)), groups.get((bn, claim.depth, lr))
    if not a or not b:
        return Part(label, "faster", [], [], "inconclusive", cells), f"lr {lr:g} not run"
    runs = {m: {r["cell"]["seed"]: r for r in g["results"]} for m, g in ((base, a), (bn, b))}
    seeds = sorted(set(runs[base]) & set(runs[bn]))
    if not all(runs[m][s]["history"].get("steps") for m in (base, bn) for s in seeds):
        note = "no per-step record in these runs (they predate `log_every`)"
        return Part(label, "faster", [], [], "inconclusive", cells, note=note), f"{label}: {note}"
    steps = {m: {s: steps_to(runs[m][s]) for s in seeds} for m in (base, bn)}
    missing = [f"{LABELS[m]} seed {s}" for m in (base, bn) for s in seeds if steps[m][s] is None]
    if missing:
        note = f"never reached {TARGET_ACC:.0%} in the recorded steps: {', '.join(missing)}"
        return Part(label, "faster", [], [], "inconclusive", cells, note=note), f"{label}: {note}"
    ratios = [math.log(steps[bn][s] / steps[base][s]) for s in seeds]
    test = judge(ratios, "faster")
    median = {m: statistics.median(steps[m].values()) for m in (base, bn)}
    ratio = f"{math.exp(test.mean):.2f}" + (
        f", 90% CI [{math.exp(test.interval[0]):.2f}, {math.exp(test.interval[1]):.2f}]" if test.interval else ""
    )
    note = (
        f"median steps {LABELS[base]} {median[base]:g}, {LABELS[bn]} {median[bn]:g}; "
        f"{LABELS[bn]} / {LABELS[base]} (geometric mean) {ratio}"
    )
    part = Part(label, "faster", ratios, seeds, test.verdict, cells, test, note=note)
    return part, f"{label}: {note} ({test.verdict})"


EARLY_STEPS = 200
"""The exploratory row of claim 4: the mean training accuracy over the first `EARLY_STEPS` steps."""


def _early_area_part(groups, claim: MlpClaim, lr: float) -> Part | None:
    """Claim 4, shown, not judged (chosen after the protocol's measure was seen): the early accuracy gap."""
    base, bn = claim.models
    a, b = groups.get((base, claim.depth, lr)), groups.get((bn, claim.depth, lr))
    if not a or not b:
        return None
    runs = {m: {r["cell"]["seed"]: r for r in g["results"]} for m, g in ((base, a), (bn, b))}
    seeds = sorted(set(runs[base]) & set(runs[bn]))

    def area(result: Mapping[str, Any]) -> float | None:
        accs = [r["train_acc"] for r in result["history"].get("steps") or () if r["step"] <= EARLY_STEPS]
        return statistics.fmean(accs) if accs and None not in accs else None

    values = {s: (area(runs[bn][s]), area(runs[base][s])) for s in seeds}
    seeds = [s for s in seeds if None not in values[s]]
    if not seeds:
        return None
    gaps = [100 * (values[s][0] - values[s][1]) for s in seeds]
    label = f"lr {lr:g}, mean train accuracy over the first {EARLY_STEPS} steps (exploratory, chosen after the data)"
    cells = tuple((m, claim.depth, lr) for m in claim.models)
    return Part(label, "gap, shown for reference", gaps, seeds, NOT_JUDGED, cells, judge(gaps, "clearly"))


def _mlp_claim(groups, claim: MlpClaim = MLP_CLAIM) -> Verdict:
    base, bn = claim.models
    low_lr, high_lr = claim.lrs
    texts, parts = [], []

    speed, text = _speed_part(groups, claim, low_lr)
    parts.append(speed)
    texts.append(text)

    def early(c: Sequence[float]) -> float:
        return mean_over_epochs(c[: max(1, len(c) // claim.early_divisor)])

    early_steps = _early_area_part(groups, claim, low_lr)
    if early_steps is not None:
        parts.append(early_steps)

    seeds, gaps = paired(groups, claim.models, claim.depth, low_lr, early)
    if gaps:  # the epoch-level measure, shown beside the per-step one: both MLPs pass 95% in epoch 1
        label = f"lr {low_lr:g}, validation accuracy over the first third of training"
        test = judge(gaps, "clearly")
        cells = tuple((m, claim.depth, low_lr) for m in claim.models)
        parts.append(Part(label, "gap, shown for reference", gaps, seeds, NOT_JUDGED, cells, test))

    label = f"lr {high_lr:g}, final"
    expect = f"DNNBN ends above {100 * claim.stable:.0f}%, and {100 * claim.broken_margin:.0f} pts above DNN"
    seeds, finals = paired(groups, claim.models, claim.depth, high_lr, final)
    if not finals:
        texts.append(f"lr {high_lr:g} not run")
        parts.append(Part(label, expect, [], [], "inconclusive"))
    else:
        by_seed = _by_seed(groups[(bn, claim.depth, high_lr)])
        with_bn = [100 * final(by_seed[s]) for s in seeds]
        stable = judge(with_bn, (("above", 100 * claim.stable),))
        broke = judge(finals, (("above", 100 * claim.broken_margin),))
        test = both(broke, stable)
        note = f"DNNBN final {describe(stable, '%')}"
        cells = tuple((m, claim.depth, high_lr) for m in claim.models)
        parts.append(Part(label, expect, finals, seeds, test.verdict, cells, test, note=note))
        plain = [final(c) for c in groups[(base, claim.depth, high_lr)]["curves"]]
        texts.append(
            f"lr {high_lr:g}, final: DNN {fmt(plain)}%, DNNBN {fmt([v / 100 for v in with_bn])}%; "
            f"gap {describe(broke)} ({test.verdict})"
        )
    return Verdict(claim.number, claim.text, "; ".join(texts), _combine(parts), parts)


def verdicts(results: Sequence[Mapping[str, Any]], claims: Iterable[int] = (1, 2, 3, 4)) -> list[Verdict]:
    """The article's claims, each with what the results show and the protocol's verdict.

    Each part is judged by `judge` on per-seed values paired by seed; a claim is reproduced when
    every part's "holds" p-value stays below 5% after Holm's correction, not reproduced when some
    part's "fails" p-value does, else inconclusive (docs/reproducing.md, "The protocol").
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
