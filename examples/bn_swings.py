"""Why do BatchNorm's validation curves swing? An exploratory look at the transfer study's BN-FFN runs.

In the transfer study (docs/timm-blocks.md) the BNFFNBlock model at lr 0.005, depth 6 has runs
whose validation accuracy swings or collapses while the training loss falls normally. This
script retrains such a cell exactly as the study did (the same code path, seed and settings) and,
after every epoch, scores the same weights three ways on the frozen augmented test set:

- **running**: the BatchNorms' running statistics, as `fit()` evaluates (the study's numbers);
- **recalibrated**: statistics recomputed on training images with the weights frozen
  (`bnvit.recalibrate_bn`, 100 batches of 100 from an independent draw of the training data);
- **batch**: each test batch of 5,000 normalized by its own statistics.

It also measures, per BatchNorm layer, how far the running statistics lie from the recalibrated
ones: the mean over features of `|mu_run - mu_cal| / sigma_cal` and of `|log(var_run / var_cal)|`
(the train/eval gap of the statistics PowerNorm, Shen et al. 2020, points at). Exploratory and
chosen after seeing the data: it changes no measure of the protocol.

    python examples/bn_swings.py --seeds 0 2 --out docs/results/bn-swings --threads 1

Writes `swings.jsonl` (one line per seed and epoch), `swings.png` and `report.md` into `--out`.
The training does not consume any random draw the study's run would not: the extra evaluations
use their own loader and restore torch's RNG state, so the `running` column reproduces the study's
published curve when the machine and thread count match.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from bnvit import evaluate, fit, recalibrate_bn
from bnvit.data import mnist_loaders
from bnvit.experiments import TRANSFER, Cell
from bnvit.experiments.sweep import build_model
from bnvit.training import Callback

MODEL, DEPTH, LR = "timmvit_bnffn_mnist", 6, 0.005
CALIBRATION_BATCHES = 100


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def statistics_gap(running: nn.Module, calibrated: nn.Module) -> dict[str, tuple[float, float]]:
    """Per BatchNorm: mean |mu_run - mu_cal| / sigma_cal and mean |log(var_run / var_cal)| over features."""
    gaps = {}
    cal = batchnorms(calibrated)
    for name, bn in batchnorms(running).items():
        mu, var = bn.running_mean.double(), bn.running_var.double()
        mu_c, var_c = cal[name].running_mean.double(), cal[name].running_var.double()
        shift = ((mu - mu_c).abs() / (var_c + cal[name].eps).sqrt()).mean().item()
        scale = (var.clamp_min(1e-12) / var_c.clamp_min(1e-12)).log().abs().mean().item()
        gaps[name] = (shift, scale)
    return gaps


def batch_statistics_accuracy(model: nn.Module, val) -> float:
    """Accuracy with every BatchNorm normalizing each test batch by its own statistics."""
    scored = copy.deepcopy(model).eval()
    for bn in batchnorms(scored).values():
        bn.train()
        bn.momentum = 0.0  # normalize by the batch; leave the (copied) running statistics as they are
    correct = total = 0
    with torch.no_grad():
        for images, labels in val:
            correct += (scored(images).argmax(-1) == labels).sum().item()
            total += len(labels)
    return correct / total


class ThreeWays(Callback):
    """After each epoch: the validation accuracy by running, recalibrated and batch statistics."""

    def __init__(self, seed: int, val, calibration, out: Path) -> None:
        self.seed, self.val, self.calibration, self.out = seed, val, calibration, out

    def on_epoch_end(self, state, record) -> None:
        with torch.random.fork_rng():
            model = state.model
            calibrated = recalibrate_bn(copy.deepcopy(model), self.calibration, CALIBRATION_BATCHES, device="cpu")
            line = dict(
                seed=self.seed,
                epoch=record.epoch,
                train_loss=record.train_loss,
                running=record.val_acc,
                recalibrated=evaluate(calibrated, self.val, device="cpu")["acc"],
                batch=batch_statistics_accuracy(model, self.val),
                gaps=statistics_gap(model, calibrated),
            )
        with (self.out / "swings.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(
            f"seed {self.seed} epoch {record.epoch}: running {line['running']:.2%}, "
            f"recalibrated {line['recalibrated']:.2%}, batch {line['batch']:.2%}",
            flush=True,
        )


def train(seed: int, out: Path, data_dir: str | None) -> None:
    settings = TRANSFER.settings
    cell = Cell(MODEL, DEPTH, LR, seed)
    loaders = dict(batch_size=settings.batch_size, eval_batch_size=settings.eval_batch_size, device="cpu")
    train_data, val = mnist_loaders(data_dir, augment=settings.augment, test=settings.test, seed=seed, **loaders)
    calibration, _ = mnist_loaders(data_dir, augment=settings.augment, test=settings.test, seed=1000 + seed, **loaders)
    model = build_model(cell)
    fit(
        model,
        train_data,
        val,
        epochs=settings.epochs,
        lr=LR,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        device="cpu",
        precision=settings.precision,
        seed=seed,
        progress=False,
        callbacks=[ThreeWays(seed, val, calibration, out)],
    )


def report(out: Path) -> None:
    lines = [json.loads(line) for line in (out / "swings.jsonl").read_text().splitlines()]
    seeds = sorted({r["seed"] for r in lines})
    recorded = ", ".join(f"seed {s}: {sum(r['seed'] == s for r in lines)}" for s in seeds)
    text = [
        "# Why BatchNorm's validation curves swing (exploratory)",
        "",
        f"`timmvitbnffn_mnist`, depth {DEPTH}, lr {LR}, the transfer study's settings; validation accuracy on the",
        "frozen augmented test set after each epoch, scored with the running statistics (what `fit` reports),",
        f"with statistics recalibrated on {CALIBRATION_BATCHES * 100:,} training images, and with each test",
        "batch's own statistics; and the distance of the running statistics from the recalibrated ones,",
        "averaged over the model's BatchNorm layers (shift: |mu_run - mu_cal| / sigma_cal; scale: |log var ratio|).",
        "",
        "Each seed is a rerun of the study's cell on the machine this ran on; on another CPU (the study's seeds",
        f"0-2 ran on one with AVX-512) a seed need not reproduce the published curve bit for bit. Epochs "
        f"recorded: {recorded} of {TRANSFER.settings.epochs}.",
        "",
        "| seed | epoch | train loss | running | recalibrated | batch | shift (mean / max layer) "
        "| scale (mean / max layer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        shifts = [g[0] for g in r["gaps"].values()]
        scales = [g[1] for g in r["gaps"].values()]
        text.append(
            f"| {r['seed']} | {r['epoch']} | {r['train_loss']:.3f} | {100 * r['running']:.1f}% | "
            f"{100 * r['recalibrated']:.1f}% | {100 * r['batch']:.1f}% | {statistics.fmean(shifts):.3f} / "
            f"{max(shifts):.3f} | {statistics.fmean(scales):.3f} / {max(scales):.3f} |"
        )
    text += ["", *per_layer(lines)]
    (out / "report.md").write_text("\n".join(text) + "\n\n![swings.png](swings.png)\n")
    try:
        import matplotlib  # deferred: optional, only the figure needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    seeds = sorted({r["seed"] for r in lines})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 3.6), squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        rows = [r for r in lines if r["seed"] == seed]
        epochs = [r["epoch"] for r in rows]
        for key, style in (("running", "o-"), ("recalibrated", "s--"), ("batch", "^:")):
            ax.plot(epochs, [100 * r[key] for r in rows], style, label=key)
        ax.set(title=f"seed {seed} (1 run)", xlabel="epoch", ylabel="validation accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "swings.png", dpi=110)
    plt.close(fig)


def per_layer(lines: list[dict]) -> list[str]:
    """Which layer's gap goes with the accuracy the running statistics lose: a Pearson correlation per layer."""
    lost = [100 * (r["recalibrated"] - r["running"]) for r in lines]
    text = [
        "## Per layer: which gap goes with the accuracy the running statistics lose",
        "",
        f"Over the {len(lines)} epochs above, the Pearson correlation of the accuracy lost (recalibrated minus",
        "running, in points) with each BatchNorm's shift and scale gap, and the gap's mean (a description of",
        "these runs, not a test).",
        "",
        "| BatchNorm | shift: mean | shift: correlation | scale: mean | scale: correlation |",
        "|---|---|---|---|---|",
    ]
    rows = {f"`{name}`": [r["gaps"][name] for r in lines] for name in lines[0]["gaps"]}
    rows["the mean over layers"] = [[statistics.fmean(g[i] for g in r["gaps"].values()) for i in (0, 1)] for r in lines]
    for name, gaps in rows.items():
        shift, scale = ([g[i] for g in gaps] for i in (0, 1))
        text.append(
            f"| {name} | {statistics.fmean(shift):.3f} | {statistics.correlation(lost, shift):+.2f} | "
            f"{statistics.fmean(scale):.3f} | {statistics.correlation(lost, scale):+.2f} |"
        )
    return text


def _complete(out: Path, seed: int) -> bool:
    """Whether `seed` has all its epochs in `swings.jsonl`; an interrupted seed's lines are dropped (it reruns)."""
    path = out / "swings.jsonl"
    if not path.exists():
        return False
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in lines if r["seed"] == seed]
    if len(mine) == TRANSFER.settings.epochs:
        return True
    path.write_text("".join(json.dumps(r) + "\n" for r in lines if r["seed"] != seed))
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bn-swings"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            if not _complete(args.out, seed):
                train(seed, args.out, args.data_dir)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
