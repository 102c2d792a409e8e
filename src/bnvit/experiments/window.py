"""The learning-rate window: the range of learning rates a model tolerates, in decades (beyond the article).

A model's window is the grid rates whose final accuracy is within `TOLERANCE` of its best; its
width is log10(highest / lowest). Computed on the seed mean and per seed; a diverged run counts
as chance (docs/lr-window.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .claims import LABELS
from .stats import summarize

__all__ = ["TOLERANCE", "Window", "window_section", "windows"]

TOLERANCE = 0.02
"""Rates within this much accuracy (2 points) of the best are inside the window."""


@dataclass(frozen=True)
class Window:
    """One model's window at one depth."""

    model: str
    depth: int
    lrs: tuple[float, ...]
    finals: tuple[tuple[float, ...], ...]  # per rate, the final accuracy of each seed
    best_lr: float
    inside: tuple[float, ...]  # the rates in the window (mean over seeds)
    width: float  # decades, from the mean over seeds
    seed_widths: tuple[float, ...]  # decades, each seed alone

    @property
    def at_edge(self) -> bool:
        """The window reaches the end of the grid: it may be wider than measured."""
        return self.inside[0] == self.lrs[0] or self.inside[-1] == self.lrs[-1]

    @property
    def contiguous(self) -> bool:
        """Every grid rate between the window's ends is in it."""
        lo, hi = self.lrs.index(self.inside[0]), self.lrs.index(self.inside[-1])
        return len(self.inside) == hi - lo + 1


def _final(curve: Sequence[float]) -> float:
    """The last accuracy a run measured (a run may have fewer epochs than the longest in the folder)."""
    return next((v for v in reversed(curve) if not math.isnan(v)), math.nan)


def _inside(lrs: Sequence[float], accs: Sequence[float], tolerance: float) -> tuple[float, ...]:
    best = max((a for a in accs if not math.isnan(a)), default=math.nan)
    return tuple(lr for lr, acc in zip(lrs, accs, strict=True) if acc >= best - tolerance)  # NaN: never inside


def _width(inside: Sequence[float]) -> float:
    return math.log10(max(inside) / min(inside)) if inside else math.nan


def windows(results: Sequence[Mapping[str, Any]], tolerance: float = TOLERANCE) -> list[Window]:
    """Every (model, depth)'s window over the learning rates it was run at (seeds paired by position)."""
    groups = summarize(results)
    out = []
    for model, depth in sorted({k[:2] for k in groups}, key=lambda k: (k[1], "bn" in k[0])):
        lrs = tuple(sorted(k[2] for k in groups if k[:2] == (model, depth)))
        finals = tuple(tuple(_final(c) for c in groups[(model, depth, lr)]["curves"]) for lr in lrs)
        means = [statistics.fmean(f) for f in finals]
        inside = _inside(lrs, means, tolerance)
        if not inside:
            continue  # nothing measured
        seeds = min(len(f) for f in finals)
        seed_widths = tuple(_width(_inside(lrs, [f[s] for f in finals], tolerance)) for s in range(seeds))
        best = lrs[means.index(max(means))]
        out.append(Window(model, depth, lrs, finals, best, inside, _width(inside), seed_widths))
    return out


def _pct(values: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def window_section(results: Sequence[Mapping[str, Any]], tolerance: float = TOLERANCE) -> list[str]:
    """The report's section: each model's window, its width in decades and the seeds' spread."""
    lines = [
        "",
        "## Learning-rate window",
        "",
        f"The window is the set of learning rates whose final validation accuracy (mean over seeds) is within "
        f"{100 * tolerance:g} points of the model's best; its width is log10(highest / lowest rate in it), in "
        "decades of learning rate. 'Per seed' is the width from each seed alone (min to max: the seeds' spread). "
        "A window that reaches the end of the grid may be wider than measured (marked ≥).",
        "",
    ]
    header = ["model", "depth", "best lr", "best accuracy (%)", "window", "width (decades)", "per seed", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for w in windows(results, tolerance):
        best = w.finals[w.lrs.index(w.best_lr)]
        span = f"{w.inside[0]:g} to {w.inside[-1]:g}" + ("" if w.contiguous else " (not contiguous)")
        per_seed = f"{min(w.seed_widths):.2f} to {max(w.seed_widths):.2f}" if len(w.seed_widths) > 1 else "–"
        row = [LABELS.get(w.model, w.model), str(w.depth), f"{w.best_lr:g}", _pct(best), span]
        row += [("≥ " if w.at_edge else "") + f"{w.width:.2f}", per_seed, str(len(best))]
        lines.append("| " + " | ".join(row) + " |")
    return lines
