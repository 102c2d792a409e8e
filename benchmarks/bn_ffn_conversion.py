"""How much of the shipped LayerNorm ViT survives conversion to the BatchNorm FFN (`bnvit.to_bn_ffn`).

    python benchmarks/bn_ffn_conversion.py [--calibration 10000] [--out results/bn_ffn_conversion.json]

The shipped `vitln_mnist` weights are converted with the dropped LayerNorm's affine folded into
`fc1` (`fold_norm=True`) and without it (`fold_norm=False`), and evaluated on the 10,000 MNIST
test images: right after conversion (the new BatchNorms are the identity) and after
`bnvit.recalibrate_bn` on the first `--calibration` training images. One thread, as the numbers
are accuracies, not timings. docs/timm-blocks.md reports the result.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch

import bnvit
from common import mnist_float, report_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=10_000, help="training images for recalibrate_bn")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = mnist_float(train=False)
    train_images, train_labels = mnist_float(train=True)
    calibration = (train_images[: args.calibration], train_labels[: args.calibration])
    original = timm.create_model("vitln_mnist", pretrained=True).eval()
    out = {"original": bnvit.evaluate(original, test, device="cpu")["acc"], "calibration": args.calibration}
    for fold in (True, False):
        model = bnvit.to_bn_ffn(copy.deepcopy(original), fold_norm=fold).eval()
        after = bnvit.evaluate(model, test, device="cpu")["acc"]
        bnvit.recalibrate_bn(model, calibration, device="cpu")
        out[f"fold_norm={fold}"] = {
            "converted": after,
            "recalibrated": bnvit.evaluate(model, test, device="cpu")["acc"],
        }
    report_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
