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
import json
from pathlib import Path

import timm
import torch

import bnvit
from bnvit.data.mnist import load_mnist


def _images(split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = split
    return images.float().div(255).unsqueeze(1), labels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=10_000, help="training images for recalibrate_bn")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = _images(load_mnist(train=False))
    train_images, train_labels = _images(load_mnist(train=True))
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
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
