"""Throughput of the article's augmentation: batched `augment_batch` vs torchvision image by image.

Measures images per second, in one process, of

* the torchvision pipeline the article uses: `MNISTDataset(transform=article_transform())[i]` for
  each image (uint8 tensor -> PIL -> RandomRotation -> RandomAffine -> RandomZoomOut -> Resize ->
  ToTensor), on one CPU thread (PIL is single-threaded anyway);
* `augment_batch` on batches of 100 and 5,000 uint8 images, on one CPU thread and on all of them;
* `DeviceLoader(augment=True)` iterating batches of 100 (what training sees), one thread.

Every configuration is warmed up, then timed in `--repeats` rounds; the rounds interleave the
configurations so that a change in machine load hits all of them alike, and the median of each
is reported. The ratios to torchvision's one-thread rate are the numbers to quote.

Usage:
    python benchmarks/augment_throughput.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from bnvit._util.device import CpuThreads
from bnvit.data import DeviceLoader, MNISTDataset, article_transform, augment_batch, load_mnist
from common import machine


def _rate(work: Callable[[], int], threads: int) -> float:
    """Images per second of one call of ``work`` (which returns how many images it processed)."""
    with CpuThreads(threads):
        start = time.perf_counter()
        images = work()
        return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="folder holding MNIST/raw (default: $BNVIT_DATA)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per configuration (median)")
    parser.add_argument("--torchvision-images", type=int, default=2000, help="images per torchvision round")
    parser.add_argument("--fast-images", type=int, default=20000, help="images per augment_batch round")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    images, labels = load_mnist(args.root, train=True)
    all_threads = torch.get_num_threads()
    dataset = MNISTDataset(args.root, train=True, transform=article_transform())
    generator = torch.Generator().manual_seed(0)

    def torchvision_pipeline() -> int:
        n = args.torchvision_images
        for i in range(n):
            dataset[i]
        return n

    def fast(batch: int) -> Callable[[], int]:
        batch_images = images[:batch]
        calls = max(1, args.fast_images // batch)

        def work() -> int:
            for _ in range(calls):
                augment_batch(batch_images, generator)
            return calls * batch

        return work

    loader = DeviceLoader(images[: args.fast_images], labels[: args.fast_images], batch_size=100, augment=True)

    def device_loader() -> int:
        return sum(len(y) for _, y in loader)

    configs = {  # name: (work, threads)
        "torchvision per image": (torchvision_pipeline, 1),
        "augment_batch, batch 100": (fast(100), 1),
        "augment_batch, batch 5000": (fast(5000), 1),
        "DeviceLoader(augment=True), batch 100": (device_loader, 1),
        f"augment_batch, batch 100, {all_threads} threads": (fast(100), all_threads),
        f"augment_batch, batch 5000, {all_threads} threads": (fast(5000), all_threads),
    }
    threads = {name: t for name, (_, t) in configs.items()}
    for work, t in configs.values():  # warm-up: tables, allocator, caches
        _rate(work, t)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (work, t) in configs.items():
            rates[name].append(_rate(work, t))
    median = {name: statistics.median(values) for name, values in rates.items()}
    reference = median["torchvision per image"]

    print(f"{'pipeline':46s}{'threads':>8s}{'images/s':>12s}{'vs torchvision':>16s}")
    for name, value in median.items():
        print(f"{name:46s}{threads[name]:8d}{value:12,.0f}{value / reference:15.1f}x")
    result = {
        "machine": {**machine(torch.device("cpu")), "pillow": Image.__version__},
        "repeats": args.repeats,
        "images_per_second": median,
        "threads": threads,
        "ratio_to_torchvision_one_thread": {name: value / reference for name, value in median.items()},
        "all_rounds": rates,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
