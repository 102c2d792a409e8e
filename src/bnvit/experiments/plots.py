"""The article's figures from results: depth panels, learning-rate panels, the MLP curves, the lr window.

Several seeds draw the mean with a ± one-std band. matplotlib (`bnvit[plots]`) is imported only when drawing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .claims import LABELS
from .stats import summarize
from .window import TOLERANCE, windows

__all__ = ["PLOTS", "plot_depths", "plot_lr", "plot_mlp", "plot_window"]

Grid = Mapping[float, Sequence[int]]


def _pyplot():
    try:  # deferred: matplotlib is an optional dependency, needed only to draw
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plots need matplotlib: pip install "bnvit[plots]"') from err
    return plt


def _band(ax, curves: Sequence[Sequence[float]], label: str, scale: float = 100.0, count: bool = True) -> None:
    """Mean over seeds as a line, ± one std as a band (NaNs ignored); `count=False`: no seed count in the label."""
    from matplotlib.ticker import MaxNLocator  # deferred with matplotlib itself (optional)

    epochs = range(1, len(curves[0]) + 1)
    columns = [[v for v in col if not math.isnan(v)] for col in zip(*curves, strict=True)]
    mean = [scale * statistics.fmean(col) if col else math.nan for col in columns]
    if len(curves) > 1:
        label = f"{label} (mean ± std" + (f", {len(curves)} seeds)" if count else ")")
    line = ax.plot(epochs, mean, marker="o", markersize=3, label=label)[0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(curves) > 1:
        std = [scale * statistics.stdev(col) if len(col) > 1 else 0.0 for col in columns]
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)


def _save(fig, path: Path, quick: str | None) -> Path:
    if quick:
        fig.suptitle(f"quick run ({quick}): not evidence for or against the article", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def _in_grid(groups: dict, grid: Grid | None) -> dict:
    if not grid:
        return groups
    return {k: v for k, v in groups.items() if k[1] in grid.get(k[2], ())}


def _seeds(groups: dict, models: Sequence[str], depth: int, lr: float) -> str:
    """A panel's seed count for its title: `", 10 seeds"`, `", 7 and 6 seeds"` (per model), `""` for one."""
    counts = [len(groups[(m, depth, lr)]["curves"]) for m in models]
    if max(counts) == 1:
        return ""
    return f", {counts[0]} seeds" if len(set(counts)) == 1 else f", {' and '.join(map(str, counts))} seeds"


def _title(text: str, quick: str | None) -> str:
    return f"quick: {text}" if quick else text


def plot_depths(
    results: Sequence[Mapping[str, Any]], out: str | Path, grid: Grid | None = None, quick: str | None = None
) -> list[Path]:
    """One figure per learning rate (`depths_lr<lr>.png` in `out`), one panel per depth: validation accuracy per epoch.

    `grid` restricts the cells (`None`: all); `quick` says in the titles what a quick run was.
    """
    plt = _pyplot()
    groups = _in_grid(summarize(results), grid)
    paths = []
    for lr in sorted({k[2] for k in groups}):
        depths = sorted({k[1] for k in groups if k[2] == lr})
        fig, axes = plt.subplots(
            1, len(depths), figsize=(3.6 * len(depths), 3.2), squeeze=False, layout="constrained", sharey=True
        )
        for ax, depth in zip(axes[0], depths, strict=True):
            models = sorted({k[0] for k in groups if k[1:] == (depth, lr)}, key=lambda m: "bn" in m)
            for model in models:
                _band(ax, groups[(model, depth, lr)]["curves"], LABELS.get(model, model), count=False)
            ax.set_title(_title(f"depth {depth}, lr {lr:g}{_seeds(groups, models, depth, lr)}", quick))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation accuracy (%)")
        axes[0][0].legend()
        paths.append(_save(fig, Path(out) / f"depths_lr{lr:g}.png", quick))
        plt.close(fig)
    return paths


def plot_lr(
    results: Sequence[Mapping[str, Any]], out: str | Path, grid: Grid | None = None, quick: str | None = None
) -> list[Path]:
    """One panel per (model, depth): validation accuracy per epoch at each learning rate (`lr_comparison.png`)."""
    plt = _pyplot()
    groups = _in_grid(summarize(results), grid)
    models = sorted({k[0] for k in groups}, key=lambda m: "bn" in m)
    depths = sorted({k[1] for k in groups})
    fig, axes = plt.subplots(
        len(models),
        len(depths),
        figsize=(3.6 * len(depths), 3.0 * len(models)),
        squeeze=False,
        layout="constrained",
        sharey=True,
    )
    for row, model in enumerate(models):
        for col, depth in enumerate(depths):
            ax = axes[row][col]
            for lr in sorted({k[2] for k in groups if k[:2] == (model, depth)}):
                _band(ax, groups[(model, depth, lr)]["curves"], f"lr {lr:g}")
            ax.set_title(_title(f"{LABELS.get(model, model)}, depth {depth}", quick))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[row][0].set_ylabel("validation accuracy (%)")
    path = _save(fig, Path(out) / "lr_comparison.png", quick)
    plt.close(fig)
    return [path]


def plot_mlp(
    results: Sequence[Mapping[str, Any]], out: str | Path, grid: Grid | None = None, quick: str | None = None
) -> list[Path]:
    """Accuracy and training-loss curves of the MLPs at each learning rate (`mlp.png`)."""
    plt = _pyplot()
    accuracy = _in_grid(summarize(results, "val_acc"), grid)
    loss = summarize(results, "train_loss")
    lrs = sorted({k[2] for k in accuracy})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.0), squeeze=False, layout="constrained")
    for col, lr in enumerate(lrs):
        for key in sorted((k for k in accuracy if k[2] == lr), key=lambda k: "bn" in k[0]):
            label = LABELS.get(key[0], key[0])
            _band(axes[0][col], accuracy[key]["curves"], label)
            _band(axes[1][col], loss[key]["curves"], label, scale=1.0)
        axes[0][col].set_title(_title(f"lr {lr:g}", quick))
        axes[0][col].set_ylabel("validation accuracy (%)")
        axes[1][col].set_ylabel("training loss")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
    path = _save(fig, Path(out) / "mlp.png", quick)
    plt.close(fig)
    return [path]


def plot_window(
    results: Sequence[Mapping[str, Any]], out: str | Path, grid: Grid | None = None, quick: str | None = None
) -> list[Path]:
    """Final accuracy against learning rate per depth, with each model's window under its curve (`lr_window.png`)."""
    plt = _pyplot()
    found = [w for w in windows(results) if not grid or w.depth in {d for ds in grid.values() for d in ds}]
    depths = sorted({w.depth for w in found})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.0 * len(depths), 3.8), squeeze=False, layout="constrained")
    for ax, depth in zip(axes[0], depths, strict=True):
        for w in (w for w in found if w.depth == depth):
            mean = [100 * statistics.fmean(f) for f in w.finals]
            seeds = len(w.finals[0])
            label = f"{LABELS.get(w.model, w.model)}: window {'≥ ' * w.at_edge}{w.width:.2f} decades"
            if seeds > 1:
                label += f" ({seeds} seeds, per seed {min(w.seed_widths):.2f}-{max(w.seed_widths):.2f})"
            line = ax.plot(w.lrs, mean, marker="o", markersize=4, label=label)[0]
            if seeds > 1:
                std = [100 * statistics.stdev(f) for f in w.finals]
                low = [m - d for m, d in zip(mean, std, strict=True)]
                high = [m + d for m, d in zip(mean, std, strict=True)]
                ax.fill_between(w.lrs, low, high, color=line.get_color(), alpha=0.2)
            level = max(mean) - 100 * TOLERANCE
            ax.plot(w.inside, [level] * len(w.inside), color=line.get_color(), linewidth=4, marker="s", alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(_title(f"depth {depth}", quick))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation accuracy (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower left")
    path = _save(fig, Path(out) / "lr_window.png", quick)
    plt.close(fig)
    return [path]


PLOTS = {"depths": plot_depths, "lr": plot_lr, "mlp": plot_mlp, "window": plot_window}
