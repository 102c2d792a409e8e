"""Resumable sweeps over (model, depth, learning rate, seed), with a report and plots.

An `Experiment` declares a grid; `run_sweep` trains every cell with `fit()` and appends each
finished cell's `History` to `results.jsonl` in the output folder (atomically: every line is
always complete JSON). Rerunning the same command skips finished cells and resumes an
unfinished one from its per-epoch checkpoint, so an interrupted sweep (Ctrl-C, SIGKILL, a
reboot) loses at most the epoch in progress. A diverged cell is a result like any other.

`write_report` turns the results into `report.md`: a table of every cell and the article's
claims side by side with a verdict computed from the data. `plot_*` draw the figures.

The examples in `examples/` are thin declarations of the article's three experiments over
`run_cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import _checks
from ._io import append_line_atomic, atomic_write_text, check_writable
from .training.history import History, finite_or_none

__all__ = [
    "Cell",
    "Experiment",
    "Settings",
    "load_results",
    "run_cli",
    "run_sweep",
    "summarize",
    "verdicts",
    "write_report",
]

RESULTS = "results.jsonl"
_TEST_SETS = {
    "augmented": "the augmented test set (augmented once with a fixed seed: identical images for every model)",
    "clean": "the clean test set",
}
SETTINGS = "sweep.json"
CHANCE = 0.1  # accuracy credited to a diverged run after it diverged (10 balanced classes)

# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True, order=True)
class Cell:
    """One training run of a sweep."""

    model: str
    depth: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}-d{self.depth}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class Settings:
    """What every cell of a sweep shares; a sweep's folder holds results of one `Settings` only."""

    epochs: int = 10
    batch_size: int = 100
    eval_batch_size: int = 5000
    augment: str = "fast"
    test: str = "augmented"
    train_subset: int | None = None
    test_subset: int | None = None
    precision: str = "auto"

    def comparable(self, other: Mapping[str, Any]) -> list[str]:
        """Differences with settings stored earlier; a folder never mixes runs of different settings."""
        mine = dataclasses.asdict(self)
        return [
            f"{key}: {other.get(key)!r} in the folder, {value!r} now"
            for key, value in mine.items()
            if other.get(key) != value
        ]


@dataclass(frozen=True)
class Experiment:
    """A declared sweep: which models, at which learning rates and depths, what to plot.

    Attributes:
        name: Default output folder name (`runs/<name>`).
        models: timm model names; the first is the baseline, the second the BatchNorm model.
        grid: Learning rate -> depths to run at that rate.
        settings: Shared training settings (the article's by default).
        quick_grid: The `--quick` grid (fewer depths).
        quick_settings: The `--quick` settings (a data subset, fewer epochs).
        plots: Which figures to draw: `"depths"`, `"lr"`, `"mlp"`.
        claims: Which of the article's claims (see `CLAIMS`) the report checks.
        description: One line for `--help`.
    """

    name: str
    models: tuple[str, str]
    grid: Mapping[float, tuple[int, ...]]
    settings: Settings = field(default_factory=Settings)
    quick_grid: Mapping[float, tuple[int, ...]] | None = None
    quick_settings: Settings | None = None
    plots: tuple[str, ...] = ()
    claims: tuple[int, ...] = ()
    description: str = ""

    def cells(
        self, grid: Mapping[float, Sequence[int]] | None = None, seeds: int = 1, models: Sequence[str] | None = None
    ) -> list[Cell]:
        """Every cell of the grid, for seeds `0 .. seeds-1`, baseline and BatchNorm model side by side."""
        grid = self.grid if grid is None else grid
        return [
            Cell(model, depth, lr, seed)
            for lr, depths in grid.items()
            for depth in depths
            for seed in range(seeds)
            for model in (models or self.models)
        ]


# ----------------------------------------------------------------------------- running


def _build_model(cell: Cell) -> torch.nn.Module:
    import timm

    torch.manual_seed(cell.seed)
    return timm.create_model(cell.model, depth=cell.depth)


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The finished cells recorded in `out/results.jsonl` (an empty list if none)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    results = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}, is not valid JSON: {err}") from err
    return results


def _prepare_folder(out: Path, settings: Settings) -> None:
    check_writable(out, "output folder")
    stored = out / SETTINGS
    if stored.exists():
        previous = json.loads(stored.read_text())
        differences = settings.comparable(previous)
        if differences:
            raise ValueError(
                f"{out} holds a sweep with other settings; use another --out or the same settings:\n  "
                + "\n  ".join(differences)
            )
    atomic_write_text(stored, json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def run_sweep(
    cells: Sequence[Cell],
    settings: Settings,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    download: bool = True,
    log: Callable[[str], object] = print,
) -> list[dict[str, Any]]:
    """Train every cell not yet in `out/results.jsonl` and record it there.

    Args:
        cells: The cells to run (see `Experiment.cells`).
        settings: Training settings shared by all cells.
        out: Output folder: `results.jsonl`, `sweep.json` and `checkpoints/<cell>/`.
        data_dir: Where MNIST is (else `BNVIT_DATA`, else the cache folder).
        device: `"auto"`, `"cpu"`, `"cuda"`...
        progress: Show progress bars.
        download: Download MNIST with torchvision if it is not found.
        log: Where to print one line per cell.

    Returns:
        All results in the folder, old and new.
    """
    from .data import DeviceLoader, load_mnist, mnist_loaders
    from .training import evaluate, fit, resolve_device

    out = Path(out)
    device = resolve_device(device)
    _prepare_folder(out, settings)
    done = {r["key"] for r in load_results(out)}
    todo = [c for c in cells if c.key not in done]
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already in {out / RESULTS}; skipping them")
    clean_images, clean_labels = load_mnist(data_dir, train=False, download=download)
    n_clean = settings.test_subset or len(clean_labels)  # the same first images as the augmented test subset
    clean = DeviceLoader(
        clean_images[:n_clean],
        clean_labels[:n_clean],
        batch_size=settings.eval_batch_size,
        shuffle=False,
        device=device,
    )
    for index, cell in enumerate(todo, start=1):
        train, val = mnist_loaders(
            data_dir,
            batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size,
            device=device,
            augment=None if settings.augment == "none" else settings.augment,
            test=settings.test,
            seed=cell.seed,
            train_subset=settings.train_subset,
            test_subset=settings.test_subset,
            download=download,
        )
        log(f"[{index}/{len(todo)}] {cell.key}")
        began = time.perf_counter()
        model = _build_model(cell)
        history = fit(
            model,
            train,
            val,
            epochs=settings.epochs,
            lr=cell.lr,
            batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size,
            device=device,
            precision=settings.precision,
            seed=cell.seed,
            progress=progress,
            checkpoint_dir=out / "checkpoints" / cell.key,
            meta=dataclasses.asdict(cell),
        )
        clean_acc = None if history.diverged else evaluate(model, clean, device=device)["acc"]
        record = dict(
            key=cell.key,
            cell=dataclasses.asdict(cell),
            settings=dataclasses.asdict(settings),
            history=history.to_dict(),
            test_acc=history.val_acc[-1] if history.records else None,
            clean_test_acc=clean_acc,
            device=str(device),
            seconds=time.perf_counter() - began,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        line = json.dumps(finite_or_none(record), allow_nan=False)
        append_line_atomic(out / RESULTS, line, keep=lambda entry, key=cell.key: json.loads(entry)["key"] != key)
        state = "diverged" if history.diverged else f"val_acc {history.val_acc[-1]:.2%}, clean {clean_acc:.2%}"
        log(f"    done in {record['seconds']:.0f} s: {state}")
    return load_results(out)


def estimate_seconds(
    cells: Sequence[Cell], settings: Settings, device: str | torch.device = "auto", steps: int = 4
) -> float:
    """Time a few training steps of each (model, depth) and extrapolate to the whole sweep."""
    from .training import resolve_device, resolve_precision

    device = resolve_device(device)
    precision = resolve_precision(settings.precision, device)
    n_train = settings.train_subset or 60_000
    n_test = settings.test_subset or 10_000
    batches = math.ceil(n_train / settings.batch_size)
    per_step: dict[tuple[str, int], float] = {}
    for model_name, depth in sorted({(c.model, c.depth) for c in cells}):
        model = _build_model(Cell(model_name, depth, 1e-3, 0)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        images = torch.rand(settings.batch_size, 1, 28, 28, device=device)
        labels = torch.randint(0, 10, (settings.batch_size,), device=device)
        timings = []
        for _ in range(steps + 2):
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - began)
        per_step[(model_name, depth)] = statistics.median(timings[2:])
    # evaluation costs roughly a third of a training step per image
    total = 0.0
    for cell in cells:
        step = per_step[(cell.model, cell.depth)]
        epoch = batches * step * (1 + n_test / n_train / 3)
        total += settings.epochs * epoch
    return total


# ----------------------------------------------------------------------------- aggregation


def _curve(result: Mapping[str, Any], epochs: int, column: str = "val_acc") -> list[float]:
    """A cell's per-epoch values, chance level after a divergence, NaN where never measured."""
    history = History.from_dict(result["history"])
    values = [math.nan if v is None else v for v in history.column(column)]
    if history.diverged:
        fill = CHANCE if column.endswith("acc") else math.nan
        values += [fill] * (epochs - len(values))
    return values[:epochs] + [math.nan] * (epochs - len(values))


def summarize(results: Iterable[Mapping[str, Any]], column: str = "val_acc") -> dict[tuple[str, int, float], dict]:
    """Group results by (model, depth, lr): per-epoch curves of `column` for every seed."""
    groups: dict[tuple[str, int, float], dict] = defaultdict(lambda: {"curves": [], "results": []})
    results = list(results)
    epochs = max((r["settings"]["epochs"] for r in results), default=0)
    for result in results:
        c = result["cell"]
        group = groups[(c["model"], c["depth"], c["lr"])]
        group["curves"].append(_curve(result, epochs, column))
        group["results"].append(result)
    return dict(groups)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


# ----------------------------------------------------------------------------- the article's claims


@dataclass
class Verdict:
    claim: int
    article: str
    measured: str
    verdict: str


CLAIMS = {
    1: "lr 0.003: ViT and ViTBNFFN comparable at depths 4-5; ViTBNFFN clearly ahead at depths 6 and 7.",
    2: "lr 0.005: comparable at depths 1-2; ViTBNFFN slightly ahead at depth 3; clearly ahead at depth 4.",
    3: "depth 3, lr 0.003 -> 0.005 at epoch 10: ViT falls from about 91% to about 78%, "
    "ViTBNFFN only from about 92% to about 90%.",
    4: "MLP: with BatchNorm it converges faster at lr 0.01, and stays stable at lr 0.1 "
    "where the plain MLP breaks down.",
}

# Thresholds, in accuracy points, applied to the mean over epochs of the validation-accuracy gap
# (ViTBNFFN minus ViT), i.e. the gap between the two curves the article's figures show.
COMPARABLE = 1.5
SLIGHTLY = 0.5
CLEARLY = 2.0
# Claim 3: how many points more ViT must lose than ViTBNFFN when the learning rate goes up.
LR_DROP = 5.0


def _paired_gaps(groups, base: str, bn: str, depth: int, lr: float, metric) -> list[float] | None:
    """Per-seed gaps `metric(bn) - metric(base)` in accuracy points, paired by seed."""
    a, b = groups.get((base, depth, lr)), groups.get((bn, depth, lr))
    if not a or not b:
        return None
    by_seed_a = {r["cell"]["seed"]: c for r, c in zip(a["results"], a["curves"], strict=True)}
    by_seed_b = {r["cell"]["seed"]: c for r, c in zip(b["results"], b["curves"], strict=True)}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    return [100 * (metric(by_seed_b[s]) - metric(by_seed_a[s])) for s in seeds] or None


def _mean_over_epochs(curve: Sequence[float]) -> float:
    return statistics.fmean(v for v in curve if not math.isnan(v))


# What each expectation asks of a gap, as the interval [low, high) of gaps that satisfy it
# ("comparable" is the open interval (-COMPARABLE, COMPARABLE)).
EXPECTATIONS = {
    "comparable": (-COMPARABLE, COMPARABLE),
    "slightly": (SLIGHTLY, math.inf),
    "clearly": (CLEARLY, math.inf),
    "lr_drop": (LR_DROP, math.inf),
}


def _satisfies(gap: float, expect: str) -> bool:
    low, high = EXPECTATIONS[expect]
    return abs(gap) < COMPARABLE if expect == "comparable" else low <= gap < high


def _judge(gaps: Sequence[float], expect: str) -> tuple[str, str]:
    """Verdict on per-seed gaps: do they show what the article says (`expect`)?

    With one seed the mean decides. With several, the verdict is `reproduced` only when the
    whole range mean ± standard deviation satisfies the expectation, `not reproduced` when none
    of it does, and `inconclusive` when the range straddles the threshold: the seeds' spread
    covers the difference between the measured gap and the one the claim needs.
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


def verdicts(results: Sequence[Mapping[str, Any]], claims: Iterable[int] = (1, 2, 3, 4)) -> list[Verdict]:
    """The article's claims, each with what the results show and a verdict computed from them.

    A verdict is `reproduced`, `not reproduced`, or `inconclusive` (data missing, or the
    range mean ± std over seeds straddles the threshold the claim needs). Claims about curves
    use the mean over epochs of the validation-accuracy gap, paired by seed; thresholds are
    `COMPARABLE`, `SLIGHTLY` and `CLEARLY` points, and `LR_DROP` for claim 3.
    """
    groups = summarize(results)
    out = []
    for claim in claims:
        if claim in (1, 2):
            lr, expectations = (
                (0.003, {4: "comparable", 5: "comparable", 6: "clearly", 7: "clearly"})
                if claim == 1
                else (0.005, {1: "comparable", 2: "comparable", 3: "slightly", 4: "clearly"})
            )
            parts, texts = [], []
            for depth, expect in expectations.items():
                gaps = _paired_gaps(groups, "vit_mnist", "vitbnffn_mnist", depth, lr, _mean_over_epochs)
                if gaps is None:
                    texts.append(f"depth {depth}: not run")
                    parts.append("inconclusive")
                    continue
                verdict, text = _judge(gaps, expect)
                parts.append(verdict)
                texts.append(f"depth {depth}: {text} ({expect} expected: {verdict})")
            out.append(Verdict(claim, CLAIMS[claim], "; ".join(texts), _combine(parts)))
        elif claim == 3:
            out.append(_claim_lr_drop(groups))
        elif claim == 4:
            out.append(_claim_mlp(groups))
    return out


def _final(curve: Sequence[float]) -> float:
    finite = [v for v in curve if not math.isnan(v)]
    return finite[-1] if finite else math.nan


def _claim_lr_drop(groups) -> Verdict:
    drops = {}
    texts = []
    for model, label in (("vit_mnist", "ViT"), ("vitbnffn_mnist", "ViTBNFFN")):
        low, high = groups.get((model, 3, 0.003)), groups.get((model, 3, 0.005))
        if not low or not high:
            return Verdict(3, CLAIMS[3], "depth 3 at lr 0.003 and 0.005 not both run", "inconclusive")
        low_final = [_final(c) for c in low["curves"]]
        high_final = [_final(c) for c in high["curves"]]
        drops[model] = [100 * (a - b) for a, b in zip(low_final, high_final, strict=False)]
        texts.append(f"{label} {_fmt(low_final)}% -> {_fmt(high_final)}%")
    extra = [v - b for v, b in zip(drops["vit_mnist"], drops["vitbnffn_mnist"], strict=False)]
    verdict, text = _judge(extra, "lr_drop")
    texts.append(f"ViT loses {text} more")
    return Verdict(3, CLAIMS[3], "; ".join(texts), verdict)


def _claim_mlp(groups) -> Verdict:
    base, bn = "dnn_mnist", "dnnbn_mnist"
    texts, parts = [], []
    early = _paired_gaps(groups, base, bn, 3, 0.01, lambda c: _mean_over_epochs(c[: max(1, len(c) // 3)]))
    if early is None:
        texts.append("lr 0.01 not run")
        parts.append("inconclusive")
    else:
        verdict, text = _judge(early, "clearly")
        texts.append(f"lr 0.01, first third of training: BN {text} ({verdict})")
        parts.append(verdict)
    low, high = groups.get((base, 3, 0.1)), groups.get((bn, 3, 0.1))
    if not low or not high:
        texts.append("lr 0.1 not run")
        parts.append("inconclusive")
    else:
        plain = [_final(c) for c in low["curves"]]
        with_bn = [_final(c) for c in high["curves"]]
        stable = statistics.fmean(with_bn) >= 0.9
        broke = statistics.fmean(plain) <= statistics.fmean(with_bn) - 0.10 or any(
            r["history"]["diverged_at"] for r in low["results"]
        )
        verdict = "reproduced" if stable and broke else "not reproduced"
        texts.append(f"lr 0.1, final: DNN {_fmt(plain)}%, DNNBN {_fmt(with_bn)}% ({verdict})")
        parts.append(verdict)
    return Verdict(4, CLAIMS[4], "; ".join(texts), _combine(parts))


# ----------------------------------------------------------------------------- report


def write_report(
    results: Sequence[Mapping[str, Any]], out: str | Path, claims: Iterable[int] = (), title: str = "Results"
) -> Path:
    """Write `out/report.md`: every cell's accuracies and the article's claims with verdicts."""
    out = Path(out)
    groups = summarize(results)
    epochs = max((r["settings"]["epochs"] for r in results), default=0)
    marks = [e for e in (1, 5, 10) if e <= epochs] or [epochs]
    if epochs not in marks:
        marks.append(epochs)
    seeds = max((len(g["curves"]) for g in groups.values()), default=0)
    settings = results[0]["settings"] if results else {}
    lines = [f"# {title}", ""]
    lines += [
        f"{len(results)} runs; "
        + (f"{seeds} seeds per cell (mean ± std over seeds); " if seeds > 1 else "1 seed per cell; ")
        + f"{epochs} epochs; augmentation {settings.get('augment')}; "
        f"train subset {settings.get('train_subset') or 'all 60,000'}; "
        f"test subset {settings.get('test_subset') or 'all 10,000'}; "
        f"device {results[0]['device'] if results else '?'}.",
        "",
        f"Validation accuracy (%) per epoch on {_TEST_SETS.get(settings.get('test'), 'the test set')}, "
        "and the clean test accuracy at the end.",
        "",
    ]
    header = ["model", "depth", "lr", *[f"epoch {e}" for e in marks], "clean test", "diverged"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, depth, lr), group in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        per_epoch = [_fmt([c[e - 1] for c in group["curves"]]) for e in marks]
        clean = [math.nan if r["clean_test_acc"] is None else r["clean_test_acc"] for r in group["results"]]
        diverged = sum(1 for r in group["results"] if r["history"]["diverged_at"])
        row = [model, str(depth), f"{lr:g}", *per_epoch, _fmt(clean), f"{diverged}/{len(group['results'])}"]
        lines.append("| " + " | ".join(row) + " |")
    claims = list(claims)
    if claims:
        lines += ["", "## The article's claims", ""]
        if epochs < 10 or settings.get("train_subset"):
            lines += [
                "> This is a reduced run (fewer epochs or a data subset): the verdicts below are computed "
                "the same way, but the article's numbers refer to the full setting.",
                "",
            ]
        lines += ["| # | article | measured | verdict |", "|---|---|---|---|"]
        for v in verdicts(results, claims):
            lines.append(f"| {v.claim} | {v.article} | {v.measured} | **{v.verdict}** |")
        lines += [
            "",
            f"Gaps are ViTBNFFN minus ViT (DNNBN minus DNN), in accuracy points, averaged over epochs and paired "
            f"by seed. 'comparable': |gap| < {COMPARABLE}; 'slightly ahead': gap >= {SLIGHTLY}; "
            f"'clearly ahead': gap >= {CLEARLY}. With several seeds a verdict needs the whole range "
            "mean ± std to agree, and is 'inconclusive' when that range straddles the threshold. "
            "A diverged run counts as chance accuracy after it diverged.",
        ]
    figures = sorted(p.name for p in out.glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plots need matplotlib: pip install "bnvit[plots]"') from err
    return plt


_LABELS = {"vit_mnist": "ViT", "vitbnffn_mnist": "ViTBNFFN", "dnn_mnist": "DNN_d3", "dnnbn_mnist": "DNNBN_d3"}


def _band(ax, curves: Sequence[Sequence[float]], label: str, scale: float = 100.0) -> None:
    """Mean over seeds as a line, min-max over seeds as a band (NaNs ignored)."""
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(curves[0]) + 1)
    columns = [[v for v in col if not math.isnan(v)] for col in zip(*curves, strict=True)]
    mean = [scale * statistics.fmean(col) if col else math.nan for col in columns]
    line = ax.plot(epochs, mean, marker="o", markersize=3, label=label)[0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(curves) > 1:
        low = [scale * min(col) if col else math.nan for col in columns]
        high = [scale * max(col) if col else math.nan for col in columns]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_depths(results: Sequence[Mapping[str, Any]], out: str | Path) -> list[Path]:
    """One figure per learning rate, one panel per depth: validation accuracy per epoch, both models."""
    plt = _pyplot()
    groups = summarize(results)
    paths = []
    for lr in sorted({k[2] for k in groups}):
        depths = sorted({k[1] for k in groups if k[2] == lr})
        fig, axes = plt.subplots(
            1, len(depths), figsize=(3.6 * len(depths), 3.2), squeeze=False, layout="constrained", sharey=True
        )
        for ax, depth in zip(axes[0], depths, strict=True):
            for model in sorted({k[0] for k in groups if k[1:] == (depth, lr)}, key=lambda m: "bn" in m):
                _band(ax, groups[(model, depth, lr)]["curves"], _LABELS.get(model, model))
            ax.set_title(f"depth {depth}, lr {lr:g}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation accuracy (%)")
        axes[0][0].legend()
        paths.append(_save(fig, Path(out) / f"depths_lr{lr:g}.png"))
        plt.close(fig)
    return paths


def plot_lr(results: Sequence[Mapping[str, Any]], out: str | Path) -> list[Path]:
    """One panel per (model, depth): validation accuracy per epoch at each learning rate."""
    plt = _pyplot()
    groups = summarize(results)
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
            ax.set_title(f"{_LABELS.get(model, model)}, depth {depth}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[row][0].set_ylabel("validation accuracy (%)")
    path = _save(fig, Path(out) / "lr_comparison.png")
    plt.close(fig)
    return [path]


def plot_mlp(results: Sequence[Mapping[str, Any]], out: str | Path) -> list[Path]:
    """Accuracy and training-loss curves of the MLPs at each learning rate."""
    plt = _pyplot()
    accuracy = summarize(results, "val_acc")
    loss = summarize(results, "train_loss")
    lrs = sorted({k[2] for k in accuracy})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.0), squeeze=False, layout="constrained")
    for col, lr in enumerate(lrs):
        for key in sorted((k for k in accuracy if k[2] == lr), key=lambda k: "bn" in k[0]):
            label = _LABELS.get(key[0], key[0])
            _band(axes[0][col], accuracy[key]["curves"], label)
            _band(axes[1][col], loss[key]["curves"], label, scale=1.0)
        axes[0][col].set_title(f"lr {lr:g}")
        axes[0][col].set_ylabel("validation accuracy (%)")
        axes[1][col].set_ylabel("training loss")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
    path = _save(fig, Path(out) / "mlp.png")
    plt.close(fig)
    return [path]


PLOTS = {"depths": plot_depths, "lr": plot_lr, "mlp": plot_mlp}


# ----------------------------------------------------------------------------- command line


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return values


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    """The command-line interface shared by the examples."""
    parser = argparse.ArgumentParser(description=experiment.description or experiment.name)
    parser.add_argument("--data-dir", help="folder with MNIST/raw/ (default: $BNVIT_DATA, else the cache folder)")
    parser.add_argument(
        "--out", help=f"output folder (default: runs/{experiment.name}, or runs/{experiment.name}-quick)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {experiment.settings.epochs})")
    parser.add_argument("--depths", type=_parse_ints, help="comma-separated depths, used at every learning rate")
    parser.add_argument("--lrs", type=_parse_floats, help="comma-separated learning rates")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1, as in the article)")
    parser.add_argument("--augment", choices=("fast", "torchvision", "none"), help="training augmentation")
    parser.add_argument("--train-subset", type=int, help="train on this many images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on this many test images only")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="training precision")
    parser.add_argument("--quick", action="store_true", help="a CPU-sized run: data subset, fewer epochs and depths")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-download", action="store_true", help="never download MNIST; fail if it is missing")
    parser.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    return parser


def _grid_from_args(experiment: Experiment, args: argparse.Namespace) -> dict[float, tuple[int, ...]]:
    base = dict(experiment.quick_grid or experiment.grid) if args.quick else dict(experiment.grid)
    lrs = args.lrs or tuple(base)
    all_depths = tuple(sorted({d for depths in experiment.grid.values() for d in depths}))
    grid = {}
    for lr in lrs:
        grid[lr] = args.depths or base.get(lr) or experiment.grid.get(lr) or all_depths
    return grid


def _settings_from_args(experiment: Experiment, args: argparse.Namespace) -> Settings:
    settings = (experiment.quick_settings or experiment.settings) if args.quick else experiment.settings
    changes = {
        "epochs": args.epochs,
        "augment": args.augment,
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "precision": args.precision,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    _checks.positive_int("--epochs", settings.epochs)
    for name in ("train_subset", "test_subset"):
        value = getattr(settings, name)
        if value is not None:
            _checks.positive_int(f"--{name.replace('_', '-')}", value)
    return settings


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def run_cli(experiment: Experiment, argv: Sequence[str] | None = None) -> int:
    """Run an `Experiment` from the command line: sweep, figures, report. Returns an exit code."""
    parser = build_parser(experiment)
    args = parser.parse_args(argv)
    try:
        settings = _settings_from_args(experiment, args)
        seeds = _checks.positive_int("--seeds", args.seeds)
        grid = _grid_from_args(experiment, args)
        from .training import resolve_device

        device = resolve_device(args.device)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    out = Path(args.out or f"runs/{experiment.name}{'-quick' if args.quick else ''}")
    cells = experiment.cells(grid, seeds)
    done = {r["key"] for r in load_results(out)} if (out / RESULTS).exists() else set()
    todo = [c for c in cells if c.key not in done]
    print(f"{experiment.name}: {len(cells)} runs ({len(todo)} to do) on {device}, output in {out}")
    if todo:
        seconds = estimate_seconds(todo, settings, device)
        print(f"estimated time: {_duration(seconds)} (measured from a few training steps of each model on {device})")
    if args.estimate:
        return 0
    try:
        results = run_sweep(
            cells,
            settings,
            out,
            data_dir=args.data_dir,
            device=device,
            progress=not args.no_progress,
            download=not args.no_download,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    keys = {c.key for c in cells}
    results = [r for r in results if r["key"] in keys]
    for name in experiment.plots:
        for path in PLOTS[name](results, out):
            print(f"figure: {path}")
    report = write_report(results, out, experiment.claims, title=experiment.description or experiment.name)
    print(f"report: {report}")
    for v in verdicts(results, experiment.claims):
        print(f"claim {v.claim}: {v.verdict} — {v.measured}")
    return 0
