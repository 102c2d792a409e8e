"""What a sweep is: its cells, the settings they share, and the article's three experiments as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .claims import DEPTH_CLAIMS, LR_DROP_CLAIM, MLP_CLAIM, TIMM_MODELS, VIT_MODELS

__all__ = [
    "ARTICLE_FP32",
    "ARTICLE_MLP",
    "ARTICLE_VIT",
    "COMPARE_DEPTHS",
    "COMPARE_LR",
    "DNN_BATCHNORM",
    "EXPERIMENTS",
    "LR_WINDOW",
    "QUICK_VIT",
    "TRANSFER",
    "Cell",
    "Experiment",
    "Settings",
    "merge_grids",
]


@dataclass(frozen=True, order=True)
class Cell:
    """One training run of a sweep: the model's label (`Experiment.models`), depth, learning rate and seed."""

    model: str
    depth: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        """The cell's name in `results.jsonl` and under `checkpoints/`."""
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
    log_every: int | None = None  # training loss and accuracy every this many steps (`fit(log_every=...)`)

    def comparable(self, other: Mapping[str, Any]) -> list[str]:
        """Differences with settings stored earlier; a folder never mixes runs of different settings."""
        mine = dataclasses.asdict(self)
        return [
            f"{key}: {other.get(key)!r} in the folder, {value!r} now"
            for key, value in mine.items()
            if other.get(key) != value
        ]


Grid = Mapping[float, tuple[int, ...]]


@dataclass(frozen=True)
class Experiment:
    """A declared sweep: which models, at which learning rates and depths, what to plot.

    Attributes:
        name: Default output folder name (`runs/<name>`) and the identity a folder records.
        models: The models' labels (a timm name, or `claims.BUILT_AS`); baseline first, BatchNorm model second.
        grid: Learning rate -> depths to run at that rate.
        settings: Shared training settings (the article's by default).
        quick_grid: The `--quick` grid (fewer depths).
        quick_settings: The `--quick` settings (a data subset, fewer epochs).
        plots: Which figures to draw: `"depths"`, `"lr"`, `"mlp"`.
        claims: Which of the article's claims (`CLAIMS`) the report checks.
        description: One line for `--help` and the report's title.
        figure_grids: Per figure, the part of the grid it shows; empty: all cells.
        seeds: Seeds per cell when `--seeds` is not given.
        quick_seeds: The same for `--quick` (default: `seeds`).
        sections: More report sections: `"transfer"` (`bnvit.experiments.transfer`).
    """

    name: str
    models: tuple[str, str]
    grid: Grid
    settings: Settings = field(default_factory=Settings)
    quick_grid: Grid | None = None
    quick_settings: Settings | None = None
    plots: tuple[str, ...] = ()
    claims: tuple[int, ...] = ()
    description: str = ""
    figure_grids: Mapping[str, Grid] = field(default_factory=dict)
    seeds: int = 1
    quick_seeds: int | None = None
    sections: tuple[str, ...] = ()

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

    def is_reduced(self, settings: Settings | Mapping[str, Any]) -> bool:
        """Whether `settings` is smaller than the experiment's full setting (a quick run)."""
        values = dataclasses.asdict(settings) if isinstance(settings, Settings) else settings
        full = self.settings

        def smaller(subset: int | None, full_subset: int | None) -> bool:  # None: the whole split
            return subset is not None and (full_subset is None or subset < full_subset)

        return (
            smaller(values.get("train_subset"), full.train_subset)
            or smaller(values.get("test_subset"), full.test_subset)
            or values.get("epochs", 0) < full.epochs
        )


def merge_grids(*grids: Grid) -> dict[float, tuple[int, ...]]:
    """The union of grids: every learning rate, with the sorted union of its depths."""
    merged: dict[float, set[int]] = {}
    for grid in grids:
        for lr, depths in grid.items():
            merged.setdefault(lr, set()).update(depths)
    return {lr: tuple(sorted(depths)) for lr, depths in sorted(merged.items())}


QUICK_VIT = Settings(epochs=3, train_subset=6000, test_subset=2000)

_DEPTHS_GRID = {claim.lr: tuple(claim.expect) for claim in DEPTH_CLAIMS.values()}
_LR_GRID = dict.fromkeys(LR_DROP_CLAIM.lrs, LR_DROP_CLAIM.depths)

COMPARE_DEPTHS = Experiment(
    name="compare_depths",
    description="ViT vs ViTBNFFN at several depths (the article's depth figures)",
    models=VIT_MODELS,
    grid=_DEPTHS_GRID,
    quick_grid={0.003: (6,), 0.005: (3,)},
    quick_settings=QUICK_VIT,
    plots=("depths",),
    claims=tuple(DEPTH_CLAIMS),
)

COMPARE_LR = Experiment(
    name="compare_lr",
    description="ViT vs ViTBNFFN at two learning rates (the article's learning-rate figure)",
    models=VIT_MODELS,
    grid=_LR_GRID,
    quick_grid=dict.fromkeys(LR_DROP_CLAIM.lrs, (LR_DROP_CLAIM.depth,)),
    quick_settings=QUICK_VIT,
    plots=("lr",),
    claims=(LR_DROP_CLAIM.number,),
)

DNN_BATCHNORM = Experiment(
    name="dnn_batchnorm",
    description="A 3-layer sigmoid MLP with and without BatchNorm (the article's first section)",
    models=MLP_CLAIM.models,
    grid=dict.fromkeys(MLP_CLAIM.lrs, (MLP_CLAIM.depth,)),
    settings=Settings(epochs=15, augment="none", test="clean"),
    quick_settings=Settings(epochs=5, augment="none", test="clean", train_subset=10000, test_subset=2000),
    plots=("mlp",),
    claims=(MLP_CLAIM.number,),
)

# The seed study's parts (see `bnvit.experiments.study`): the ViT cells of both ViT experiments in one folder
# (the cells they share trained once), the MLPs, and an fp32 check of one ViT cell.
ARTICLE_VIT = Experiment(
    name="article",
    description="ViT vs ViTBNFFN: depths and learning rates (the article's claims 1 to 3)",
    models=VIT_MODELS,
    grid=merge_grids(COMPARE_DEPTHS.grid, COMPARE_LR.grid),
    quick_grid=merge_grids(COMPARE_DEPTHS.quick_grid, COMPARE_LR.quick_grid),
    quick_settings=QUICK_VIT,
    plots=("depths", "lr"),
    claims=COMPARE_DEPTHS.claims + COMPARE_LR.claims,
    figure_grids={"depths": COMPARE_DEPTHS.grid, "lr": COMPARE_LR.grid},
    seeds=10,  # the protocol (docs/reproducing.md): ten paired seeds per cell, fixed before the runs
    quick_seeds=2,
)
# Claim 4 is about speed within training, so the study's MLPs record every 20 steps (the protocol).
ARTICLE_MLP = dataclasses.replace(
    DNN_BATCHNORM,
    name="article-mlp",
    settings=dataclasses.replace(DNN_BATCHNORM.settings, log_every=20),
    quick_settings=dataclasses.replace(DNN_BATCHNORM.quick_settings, log_every=20),
    seeds=10,
    quick_seeds=2,
)
ARTICLE_FP32 = Experiment(
    name="article-fp32",
    description="ViT vs ViTBNFFN in fp32: does bf16 autocast change a gap? (depth 4, lr 0.005)",
    models=VIT_MODELS,
    grid={0.005: (4,)},
    settings=Settings(precision="fp32"),
    quick_grid={0.005: (3,)},  # a cell the quick ViT grid holds, so the quick report has something to compare
    quick_settings=dataclasses.replace(QUICK_VIT, precision="fp32"),
    plots=("depths",),
    seeds=3,  # a check of one cell's precision, not a claim
    quick_seeds=2,
)
# Beyond the article: the range of learning rates each model tolerates (see `bnvit.experiments.window`).
LR_WINDOW_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)  # 1-2-5 steps: about 0.3 decades apart
LR_WINDOW = Experiment(
    name="lr_window",
    description="ViT vs ViTBNFFN over a log grid of learning rates: the window of rates each tolerates",
    models=VIT_MODELS,
    grid=dict.fromkeys(LR_WINDOW_LRS, (3, 6)),
    settings=Settings(epochs=4, train_subset=10000, test_subset=5000),
    quick_grid=dict.fromkeys((1e-4, 1e-3, 5e-3, 2e-2, 5e-2), (3,)),
    quick_settings=Settings(epochs=1, train_subset=4000, test_subset=500),
    plots=("window",),
    seeds=3,
    quick_seeds=2,
)
# Beyond the article: does its effect hold in timm's standard ViT layout (head width dim / heads)?
# timm's VisionTransformer at the article's scale, timm's LayerNorm Block against bnvit's BNFFNBlock
# (`bnvit.timm.vision_transformer_bnffn`), at two of the article's depths and both of its learning rates. In fp32: under
# CPU bf16 autocast timm's attention (the fused kernel, 17 tokens) made a training step 3x slower.
TRANSFER = Experiment(
    name="transfer",
    description="timm's ViT at the article's scale: LayerNorm blocks vs BNFFNBlock (does the effect transfer?)",
    models=TIMM_MODELS,
    grid=dict.fromkeys(LR_DROP_CLAIM.lrs, (4, 6)),
    settings=Settings(precision="fp32"),
    quick_grid=dict.fromkeys(LR_DROP_CLAIM.lrs, (4,)),
    quick_settings=dataclasses.replace(QUICK_VIT, precision="fp32"),
    plots=("depths", "lr"),
    seeds=10,  # the transfer protocol (docs/timm-blocks.md): ten paired seeds, fixed before seeds 3-9 ran
    quick_seeds=2,
    sections=("transfer",),
)
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (COMPARE_DEPTHS, COMPARE_LR, DNN_BATCHNORM, ARTICLE_VIT, ARTICLE_MLP, ARTICLE_FP32, LR_WINDOW, TRANSFER)
}
"""Every experiment by name: what a folder's `sweep.json` may record as its owner."""
