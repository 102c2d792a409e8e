"""What `fit(precise_bn=N)` costs: the recalibration against one training epoch, one process.

The quick run's larger model (ViTBNFFN, depth 6) on synthetic 28x28 uint8 images through a
`DeviceLoader` with the article's augmentation, batch 100: one training epoch of `--images`
images (what `fit` does per epoch) and one `recalibrate_bn` over `--batches` batches (what
`precise_bn=--batches` adds to it), alternated `--repeats` times after a warm-up; medians.

    python benchmarks/precise_bn.py                      # 60,000 images, 100 batches, 3 repeats
    python benchmarks/precise_bn.py --images 6000 --repeats 5

Prints the seconds of each and their ratio: the fraction of an epoch that `precise_bn` adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bnvit
from bnvit.data import DeviceLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000, help="training images per epoch")
    parser.add_argument("--batches", type=int, default=100, help="precise_bn: batches of 100 to recalibrate on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    loader = DeviceLoader(x, y, batch_size=100, augment=True, device="cpu", seed=0)
    torch.manual_seed(0)
    model = bnvit.ViTBNFFN(depth=6)

    def epoch() -> float:
        began = time.perf_counter()
        bnvit.fit(model, loader, epochs=1, lr=3e-3, device="cpu", precision="fp32", progress=False, seed=0)
        return time.perf_counter() - began

    def recalibrate() -> float:
        began = time.perf_counter()
        bnvit.recalibrate_bn(model, loader, args.batches, device="cpu")
        return time.perf_counter() - began

    recalibrate()  # warm-up
    epochs, recalibrations = [], []
    for _ in range(args.repeats):
        epochs.append(epoch())
        recalibrations.append(recalibrate())
    e, r = statistics.median(epochs), statistics.median(recalibrations)
    result = {
        "images": args.images,
        "batches": args.batches,
        "threads": args.threads,
        "epoch_s": e,
        "recalibrate_s": r,
        "fraction_of_epoch": r / e,
    }
    print(f"one training epoch ({args.images} images): {e:.1f} s; recalibration on {args.batches} batches: {r:.1f} s")
    setup = f"{args.threads} threads, fp32, medians of {args.repeats}"
    print(f"precise_bn={args.batches} adds {r / e:.1%} of an epoch ({setup})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
