"""Fine-tune the shipped LayerNorm ViT converted to the BatchNorm FFN back towards its 99.63%.

    python benchmarks/bn_ffn_finetune.py [--train 20000] [--epochs 1] [--lr 1e-4] [--out FILE]

`vitln_mnist` (shipped weights) -> `bnvit.to_bn_ffn` -> `bnvit.recalibrate_bn` on the first
10,000 training images -> `bnvit.fit` (AdamW) on the first `--train` training images -> accuracy
on the 10,000 MNIST test images. One thread. docs/timm-blocks.md reports the result.
"""

from __future__ import annotations

import argparse
import json
import time
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
    parser.add_argument("--train", type=int, default=20_000, help="training images to fine-tune on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    test = _images(load_mnist(train=False))
    images, labels = _images(load_mnist(train=True))
    model = bnvit.to_bn_ffn(timm.create_model("vitln_mnist", pretrained=True))
    bnvit.recalibrate_bn(model, (images[:10_000], labels[:10_000]), device="cpu")
    out = dict(vars(args), out=None, recalibrated=bnvit.evaluate(model, test, device="cpu")["acc"])
    start = time.perf_counter()
    train = (images[: args.train], labels[: args.train])
    bnvit.fit(model, train, epochs=args.epochs, lr=args.lr, optimizer="adamw", device="cpu", progress=False)
    out["fit_seconds"] = round(time.perf_counter() - start, 1)
    out["fine_tuned"] = bnvit.evaluate(model, test, device="cpu")["acc"]
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
