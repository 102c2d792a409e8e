"""Calibrate the weights bnvit ships: fit each one's temperature and record it beside the weights.

The shipped weights were trained with label smoothing 0.1, so their softmax says about 91% for a
digit they are nearly always right about. Dividing the logits by a temperature T, fitted by
minimizing the negative log-likelihood (`bnvit.weights.calibration.calibrate`), makes the probabilities
mean what they say; the prediction and the accuracy do not change.

What T is fitted on. The test set never: it only measures the result. The weights were trained
on all 60,000 training images, so no training image is held out from them. The fit uses the
last 10,000 training images (50000-59999) under a fresh draw of the training augmentation
(`mild_augment` of examples/train_weights.py, seed 0): pictures the weights never saw in that
form, drawn from the distribution their training loss was computed on. The clean training
images themselves are known to the weights better than new digits are, and a temperature
fitted on them comes out sharper; the script reports that alternative too (docs/weights.md).

For each shipped weight it writes the temperature and the fit into `<name>.json` (the record
under `"calibration"`) and into the safetensors file's metadata (`"temperature"`; the tensors
and their sha256 are unchanged), measures the expected calibration error and the negative
log-likelihood on the clean MNIST test set before and after (reported, never fitted on), and
draws the reliability diagrams of docs/weights.md:

    python examples/calibrate_weights.py --figure docs/images/calibration.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bnvit
from bnvit._util.io import atomic_path, atomic_write_text
from bnvit.data import load_mnist
from bnvit.weights.calibration import ECE_BINS, expected_calibration_error, fit_temperature, model_logits, reliability
from bnvit.weights.loading import SHIPPED, WEIGHTS_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_weights import calibration_record  # the fit train_weights.py does after training


def _store(name: str, entry: dict[str, Any]) -> None:
    """Write the entry into `<name>.json` and the temperature into the safetensors metadata (tensors unchanged)."""
    record_path = WEIGHTS_DIR / f"{name}.json"
    record = json.loads(record_path.read_text())
    record["calibration"] = entry
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    metadata["temperature"] = str(entry["temperature"])
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def draw(models: dict[str, tuple[torch.Tensor, torch.Tensor, float]], path: Path) -> None:
    """Reliability diagrams on the test set: accuracy against confidence, before and after, one panel per model.

    The bins are those of the expected calibration error (`ECE_BINS` equal-width bins); a marker's
    area is its bin's share of the images, its bar one binomial standard error of the accuracy.
    """
    import matplotlib  # deferred: matplotlib is optional (bnvit[plots]) and only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.8), squeeze=False)
    for ax, (name, (logits, labels, t)) in zip(axes[0], models.items(), strict=True):
        for temperature, label, colour in ((1.0, "T = 1 (raw softmax)", "tab:red"), (t, f"T = {t:.3f}", "tab:blue")):
            probabilities = (logits.double() / temperature).softmax(1)
            table = reliability(probabilities, labels)
            ece = expected_calibration_error(probabilities, labels)
            x = [b["confidence"] for b in table]
            y = [b["accuracy"] for b in table]
            se = [(b["accuracy"] * (1 - b["accuracy"]) / b["count"]) ** 0.5 for b in table]
            ax.errorbar(x, y, yerr=se, fmt="none", ecolor=colour, alpha=0.5, linewidth=1)
            ax.scatter(x, y, s=[max(10.0, 500 * b["count"] / len(labels)) for b in table], color=colour, alpha=0.7)
            top = max(table, key=lambda b: b["count"])
            ax.plot(
                [],
                [],
                "o",
                color=colour,
                label=f"{label}: ECE {ece:.2%}; {top['count']:,} images at {x[table.index(top)]:.1%}",
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated: accuracy = confidence")
        ax.set(xlim=(0.3, 1.01), ylim=(0.0, 1.05), xlabel="confidence (top probability)", ylabel="accuracy")
        ax.set_title(f"{name}, MNIST test set ({len(labels):,} images)", fontsize=10)
        ax.legend(fontsize=7.5, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Reliability in {ECE_BINS} confidence bins (marker area: share of the images; bar: one standard error)",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with MNIST/raw/ (default: $BNVIT_DATA, else the cache folder)")
    parser.add_argument("--figure", type=Path, help="where to draw the reliability diagrams (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the calibration, write nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    test_images, test_labels = load_mnist(args.data_dir, train=False)
    panels = {}
    for name in SHIPPED:
        model = bnvit.for_inference(timm.create_model(name, pretrained=True))
        test_logits = model_logits(model, test_images)
        entry = calibration_record(model, args.data_dir, test_logits, test_labels)
        test = entry["test"]
        print(
            f"{name}: T {entry['temperature']:.4f}; MNIST test set: ECE {test['before']['ece']:.2%} -> "
            f"{test['after']['ece']:.2%}, NLL {test['before']['nll']:.4f} -> {test['after']['nll']:.4f}, mean "
            f"confidence {test['before']['mean_confidence']:.2%} -> {test['after']['mean_confidence']:.2%} "
            f"(accuracy {test['accuracy']:.2%}); fitted on clean images instead: {entry['alternative']['fitted_on']}, "
            f"test ECE {entry['alternative']['test']['ece']:.2%}",
            flush=True,
        )
        reference = fit_temperature(test_logits, test_labels)  # printed as a yardstick, never stored nor used
        print(f"  for reference only, the temperature that would fit the test set itself: {reference:.4f}")
        if not args.dry_run:
            _store(name, entry)
        panels[name] = (test_logits, test_labels, entry["temperature"])
    if args.figure is not None:
        draw(panels, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
