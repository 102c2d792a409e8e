"""Timing helpers shared by the benchmark sections: one process, warm-up, interleaved rounds, medians.

Rounds interleave the configurations being compared (A, B, C, A, B, C, ...), so a change in
machine load during the run hits all of them alike; the median of each configuration's rounds
is reported, and ratios are taken between medians measured in the same process.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision

from bnvit._util.device import describe_machine


def mnist_float(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST (`BNVIT_DATA`) as `(images in [0, 1], shape (N, 1, 28, 28); labels)`."""
    from bnvit.data.mnist import load_mnist

    images, labels = load_mnist(train=train)
    return images.float().div(255).unsqueeze(1), labels


def report_json(out: dict, path: Path | None) -> None:
    """Print `out` as JSON, and write it to `path` too if one is given."""
    print(json.dumps(out, indent=2))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


def machine(device: torch.device) -> dict:
    """A description of where the numbers were measured: bnvit's, plus versions and the CPU's vector unit."""
    return {
        **describe_machine(device),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    configs: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of one call of each config, over `repeats` interleaved rounds after `warmup` calls."""
    for work in configs.values():
        for _ in range(warmup):
            work()
    synchronize(device)
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, work in configs.items():
            synchronize(device)
            began = time.perf_counter()
            work()
            synchronize(device)
            rounds[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in rounds.items()}


def interleaved_stats(
    configs: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median and minimum seconds of one call of each config, over `repeats` interleaved rounds.

    On a machine shared with other work, load only ever adds time: the minimum is the best estimate
    of what a configuration costs, the median of what it costs under the load of the moment.
    """
    for work in configs.values():
        for _ in range(warmup):
            work()
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, seconds in interleaved(configs, device, repeats=1, warmup=0).items():
            rounds[name].append(seconds)
    return {name: {"median": statistics.median(v), "min": min(v)} for name, v in rounds.items()}


def table(title: str, rows: list[tuple], header: tuple[str, ...]) -> str:
    """A plain-text table with a title line."""
    cells = [header, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells[1:]]
    return "\n".join(lines)
