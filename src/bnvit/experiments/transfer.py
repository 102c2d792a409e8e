"""The ten-seed transfer study's verdicts: does the article's effect carry over to timm's ViT layout?

Implements the protocol written before seeds 3-9 ran (docs/timm-blocks.md, "The protocol of the
ten-seed transfer study"): per cell, the paired gap (BN-FFN minus LayerNorm, validation accuracy
averaged over the epochs), one-sided t-tests for "ahead" and "behind" at 5% with Holm's
correction over the four cells, the power each test had, and the study's verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .claims import final, mean_over_epochs, paired
from .protocol import ALPHA, CLEARLY, COMPARABLE, LEVEL, interval_text, p_text, points_text, signed
from .stats import holm, mean_std, power, seeds_needed, summarize, t_interval, t_test

__all__ = ["EXPECTED", "CellVerdict", "transfer_section", "transfer_table", "transfer_verdicts"]

EXPECTED: dict[tuple[float, int], str] = {
    (0.003, 6): "clearly ahead",
    (0.005, 4): "clearly ahead",
    (0.005, 6): "clearly ahead",
    (0.003, 4): "comparable",
}
"""The article's expectation per (learning rate, depth): "clearly ahead" cells must show the BN-FFN
ahead to carry over; the "comparable" cell carries over unless it shows it behind."""

POWER_GAPS = (5.0, 10.0)  # the true gaps, in points, at which each test's power is printed


@dataclass(frozen=True)
class CellVerdict:
    """One cell of the transfer study judged by its protocol.

    Attributes:
        lr, depth: The cell.
        expected: The article's expectation (`EXPECTED`).
        seeds, gaps: The paired seeds and their gaps over epochs, in points.
        last_gaps: The gaps at the last epoch (secondary: reported, not judged).
        p_ahead, p_behind: Raw one-sided p-values for gap > 0 and gap < 0.
        p_ahead_holm, p_behind_holm: The same after Holm's correction over the four cells.
        shown: `"ahead"`, `"behind"` or `"neither"`.
        carries: `"carries over"`, `"counts against"` or `"undecided"`.
        power: The power the "ahead" test had at each of `POWER_GAPS`, with the observed spread.
        needed: Seeds for 80% power at the observed mean and spread (`None`: the mean is not above 0).
    """

    lr: float
    depth: int
    expected: str
    seeds: list[int]
    gaps: list[float]
    last_gaps: list[float]
    p_ahead: float
    p_behind: float
    p_ahead_holm: float
    p_behind_holm: float
    shown: str
    carries: str
    power: tuple[float, ...]
    needed: int | None


def transfer_verdicts(
    results: Sequence[Mapping[str, Any]], models: Sequence[str]
) -> tuple[list[CellVerdict], str, list[str]]:
    """Every cell's verdict, the study's verdict, and the cells that decided nothing.

    Args:
        results: The transfer study's results lines.
        models: The LayerNorm model's name, then the BN-FFN model's.

    Returns:
        `(cells, verdict, undecided)`: `verdict` is `"carries over"`, `"does not carry over"` or
        `"inconclusive"`; `undecided` names the cells whose tests decided nothing.
    """
    groups = summarize(results)
    base, bn = models
    rows = []
    for lr, depth in sorted(EXPECTED, key=lambda k: (k[0], k[1])):
        seeds, gaps = paired(groups, (base, bn), depth, lr, mean_over_epochs)
        _, last = paired(groups, (base, bn), depth, lr, final)
        rows.append((lr, depth, seeds, gaps, last, t_test(gaps, 0.0, "greater"), t_test(gaps, 0.0, "less")))
    ahead_holm = holm([r[5] for r in rows])
    behind_holm = holm([r[6] for r in rows])
    cells = []
    for (lr, depth, seeds, gaps, last, p_ahead, p_behind), pa, pb in zip(rows, ahead_holm, behind_holm, strict=True):
        shown = "ahead" if pa < ALPHA else "behind" if pb < ALPHA else "neither"
        expected = EXPECTED[(lr, depth)]
        if shown == "behind":
            carries = "counts against"
        elif shown == "ahead" or expected == "comparable":
            carries = "carries over"
        else:
            carries = "undecided"
        mean, std = mean_std(gaps)
        spread = std if std is not None else math.nan
        powers = tuple(power(g, spread, len(gaps), ALPHA) if std else math.nan for g in POWER_GAPS)
        needed = seeds_needed(mean, spread, mean, ALPHA) if std and mean > 0 else None
        cells.append(
            CellVerdict(
                lr, depth, expected, seeds, gaps, last, p_ahead, p_behind, pa, pb, shown, carries, powers, needed
            )
        )
    undecided = [f"lr {c.lr:g} depth {c.depth}" for c in cells if c.carries == "undecided"]
    if any(c.carries == "counts against" for c in cells):
        verdict = "does not carry over"
    elif not undecided:
        verdict = "carries over"
    else:
        verdict = "inconclusive"
    return cells, verdict, undecided


def _by_machine(cell: CellVerdict) -> str:
    """The cell's gaps over seeds 0-2 and over seeds 3-9, as mean ± std (n)."""
    texts = []
    for name, group in (("0-2", range(3)), ("3-9", range(3, 10))):
        values = [g for s, g in zip(cell.seeds, cell.gaps, strict=True) if s in group]
        texts.append(f"seeds {name} {points_text(values, empty='none yet')} (n = {len(values)})")
    return ", ".join(texts)


def _secondary(cell: CellVerdict) -> str:
    """The 90% interval read against the article's bound: no verdict, a reading."""
    interval = t_interval(cell.gaps, level=LEVEL)
    if interval is None:
        return "–"
    if cell.expected == "comparable":
        inside = interval[0] > -COMPARABLE and interval[1] < COMPARABLE
        return f"inside ±{COMPARABLE}" if inside else f"not inside ±{COMPARABLE}"
    return f"above +{CLEARLY}" if interval[0] > CLEARLY else f"not above +{CLEARLY}"


def _study_line(cells: Sequence[CellVerdict], verdict: str, undecided: Sequence[str], planned: int | None) -> str:
    complete = planned is not None and all(len(c.seeds) >= planned for c in cells)
    status = "" if complete else " (provisional: not every cell has its ten seeds yet)"
    return f"**The study: {verdict}**{status}" + (f"; undecided: {', '.join(undecided)}" if undecided else "")


_COLUMNS: dict[str, Callable[[CellVerdict], str]] = {
    "cell": lambda c: f"lr {c.lr:g}, depth {c.depth}",
    "the article": lambda c: c.expected,
    "seeds": lambda c: str(len(c.seeds)),
    "mean ± std": lambda c: points_text(c.gaps),
    "90% t-interval": lambda c: interval_text(t_interval(c.gaps, level=LEVEL)),
    "p ahead / behind": lambda c: f"{p_text(c.p_ahead)} / {p_text(c.p_behind)}",
    "Holm": lambda c: f"{p_text(c.p_ahead_holm)} / {p_text(c.p_behind_holm)}",
    "p ahead (Holm)": lambda c: f"{p_text(c.p_ahead)} ({p_text(c.p_ahead_holm)})",
    "shown": lambda c: c.shown,
    "verdict": lambda c: f"**{c.carries}**",
    "the article's bound": _secondary,
    "power at +5 / +10": lambda c: " / ".join("–" if math.isnan(p) else f"{p:.0%}" for p in c.power),
    "seeds for 80% power": lambda c: (
        "–" if c.shown == "ahead" or c.expected == "comparable" else str(c.needed or "none would")
    ),
    "gap at the last epoch": lambda c: points_text(c.last_gaps),
}
"""Each column a verdicts' table can show: its header and how a cell's entry is written."""


def _table(cells: Sequence[CellVerdict], columns: Sequence[str], headers: Mapping[str, str] | None = None) -> list[str]:
    """A Markdown table of `cells` with these `_COLUMNS` (`headers` renames some)."""
    shown = [(headers or {}).get(name, name) for name in columns]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_COLUMNS[name](c) for name in columns) + " |" for c in cells]


def transfer_table(results: Sequence[Mapping[str, Any]], models: Sequence[str], planned: int | None) -> list[str]:
    """The study's verdict and a short table of its cells, for docs/timm-blocks.md (Markdown lines).

    The report's numbers (`transfer_section`), fewer of them; the tests compare the page with this,
    so that the prose around the table cannot drift from the data.
    """
    cells, verdict, undecided = transfer_verdicts(results, models)
    columns = ["cell", "the article", "seeds", "mean ± std", "90% t-interval", "p ahead (Holm)", "verdict"]
    headers = {"mean ± std": "gap over epochs", "gap at the last epoch": "gap at epoch 10"}
    table = _table(cells, [*columns, "gap at the last epoch"], headers)
    return [_study_line(cells, verdict, undecided, planned) + ".", "", *table]


def transfer_section(results: Sequence[Mapping[str, Any]], models: Sequence[str], planned: int | None) -> list[str]:
    """The report's section of verdicts under the transfer protocol (Markdown lines)."""
    cells, verdict, undecided = transfer_verdicts(results, models)
    lines = [
        "",
        "## The protocol's verdicts",
        "",
        _study_line(cells, verdict, undecided, planned)
        + ". Per cell, the BN-FFN model minus the LayerNorm one, validation accuracy averaged over the "
        "epochs, paired by seed; one-sided t-tests at 5% with Holm's correction over the four cells "
        "(docs/timm-blocks.md).",
        "",
        *_table(cells, [name for name in _COLUMNS if name != "p ahead (Holm)"]),
    ]
    lines += [
        "",
        "Per seed (gap over epochs): "
        + "; ".join(
            f"lr {c.lr:g} depth {c.depth}: "
            + ", ".join(f"s{s} {signed(g)}" for s, g in zip(c.seeds, c.gaps, strict=True))
            for c in cells
        )
        + ".",
        "",
        "'Shown' is the direction a Holm-adjusted p-value below 5% shows. A 'clearly ahead' cell carries "
        "over when ahead is shown; the 'comparable' cell carries over unless behind is shown; any cell "
        "showing behind counts against. 'The article's bound' reads the 90% interval against +2.0 "
        "(clearly) or ±1.5 (comparable), without a verdict. Power: the chance the 'ahead' test had to "
        "show a true gap of +5 or +10 points with the observed spread (noncentral t); seeds for 80% "
        "power: at the observed mean and spread.",
    ]
    if any(seed >= 3 for c in cells for seed in c.seeds):  # the ten-seed study's later seeds ran elsewhere
        lines += [
            "",
            "Seeds 0-2 ran on a CPU with AVX-512, seeds 3-9 on one with AVX2 (docs/timm-blocks.md); the gap over "
            "epochs of each group, described, not tested: "
            + "; ".join(f"lr {c.lr:g} depth {c.depth}: {_by_machine(c)}" for c in cells)
            + ".",
        ]
    return lines
