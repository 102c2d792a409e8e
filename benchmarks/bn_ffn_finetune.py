"""Fine-tune the shipped LayerNorm ViT converted to the BatchNorm FFN back towards its 99.63%.

    python benchmarks/bn_ffn_finetune.py [--train 20000] [--epochs 1] [--lr 1e-4] [--out FILE] [--save FILE]

`vitln_mnist` (shipped weights) -> `bnvit.to_bn_ffn` -> `bnvit.recalibrate_bn` on the first
10,000 training images -> `bnvit.fit` (AdamW) on the first `--train` training images -> accuracy
on the 10,000 MNIST test images. One thread. docs/timm-blocks.md reports the result.

`--epochs 0 --save FILE` stops after the recalibration and writes the model's weights (a
`vitbnffn_mnist` state dict, safetensors): the starting point of the same fine-tune through
timm's `train.py --model vitbnffn_mnist --initial-checkpoint FILE`, as docs/timm-blocks.md shows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import bnvit
from bnvit._util.io import atomic_path
from common import mnist_float, report_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20_000, help="training images to fine-tune on")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of fine-tuning; 0: recalibrate only")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("--save", type=Path, default=None, help="write the final weights here (.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0 (0: recalibrate only), got {args.epochs}")
    if args.save is not None and args.save.suffix != ".safetensors":
        parser.error(f"--save writes safetensors: give a .safetensors path, got {args.save}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    test = mnist_float(train=False)
    images, labels = mnist_float(train=True)
    model = bnvit.to_bn_ffn(timm.create_model("vitln_mnist", pretrained=True))
    bnvit.recalibrate_bn(model, (images[:10_000], labels[:10_000]), device="cpu")
    out = dict(vars(args), out=None, save=None, recalibrated=bnvit.evaluate(model, test, device="cpu")["acc"])
    if args.epochs > 0:
        start = time.perf_counter()
        train = (images[: args.train], labels[: args.train])
        bnvit.fit(model, train, epochs=args.epochs, lr=args.lr, optimizer="adamw", device="cpu", progress=False)
        out["fit_seconds"] = round(time.perf_counter() - start, 1)
        out["fine_tuned"] = bnvit.evaluate(model, test, device="cpu")["acc"]
    if args.save:
        with atomic_path(args.save) as tmp:  # never a half-written file under the name asked for
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        out["save"] = str(args.save)
    report_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
