"""Devices, precision and CPU threads: what `"auto"` means on this machine."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Any

import torch

from . import checks as _checks

__all__ = [
    "PRECISIONS",
    "CpuThreads",
    "autocast",
    "cpu_has_fast_bf16",
    "describe_machine",
    "resolve_device",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` -> CUDA if available, else CPU; anything else as `torch.device`.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r}: {err}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`"auto"` -> bf16 autocast where it is native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32.

    Examples:
        >>> resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
        True
        >>> resolve_precision("fp32", torch.device("cpu"))
        'fp32'
    """
    _checks.choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs CUDA, the device is {device}; use 'bf16' or 'fp32'")
    return precision


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), as oneDNN reports."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class CpuThreads:
    """PyTorch's CPU threads for a block, restored after it: pinned, left alone, or following the free cores.

    `threads` as an int pins that many; None leaves them as they are; `"auto"` keeps them at the
    cores other programs leave free (docs/training.md), re-measured by `poll()` between steps at
    most every `every` seconds. Spinning threads crawl when another program takes a core; with
    `"auto"`, a seeded run repeats exactly only where the load does (pin the threads for that).
    Without `/proc/stat`, `"auto"` changes nothing.

    Args:
        threads: An int, None or `"auto"`.
        most: With `"auto"`, the most threads it sets (default: torch's count when it is made).
        every: With `"auto"`, seconds between two looks at the load.

    Example:
        >>> before = torch.get_num_threads()
        >>> with CpuThreads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
        >>> with CpuThreads("auto", every=0.0) as threads:
        ...     threads.poll()
        ...     1 <= torch.get_num_threads() <= threads.most
        True
    """

    def __init__(self, threads: int | str | None = "auto", most: int | None = None, every: float = 1.0) -> None:
        self.threads = threads
        self.most = most or torch.get_num_threads()
        self.every = every
        self.used: set[int] = set()
        """Every thread count this context has run with."""
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._niced_free = hasattr(os, "nice") and os.nice(0) == 0  # niced processes give way to this one
        self._last: tuple[float, float, float] | None = None

    def __enter__(self) -> CpuThreads:
        self._before = torch.get_num_threads()
        if self.threads == "auto":
            torch.set_num_threads(min(self.most, self._before) if self._before else self.most)
            self._last = self._sample()
        elif self.threads is not None:
            torch.set_num_threads(self.threads)  # type: ignore[arg-type]  # an int: the callers check
        self.used = {torch.get_num_threads()}
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._before)

    def poll(self) -> None:
        """With `"auto"`, follow the free cores: re-measure if `every` seconds have passed since the last look."""
        if self._last is None or time.monotonic() - self._last[0] < self.every:
            return
        now = self._sample()
        if now is None:
            return
        wall, busy, own = (b - a for a, b in zip(self._last, now, strict=True))
        self._last = now
        if wall <= 0:
            return
        others = max(0.0, (busy - own) / wall)  # cores' worth of CPU the other processes took
        threads = max(1, min(self.most, round(len(self._cpus) - others)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.used.add(threads)

    def _sample(self) -> tuple[float, float, float] | None:
        """(monotonic seconds, busy CPU seconds of this process's CPUs, this process's CPU seconds)."""
        try:
            with open("/proc/stat") as handle:
                rows = {r[0]: r for line in handle if line.startswith("cpu") and (r := line.split())}
            ticks = [[int(v) for v in rows[f"cpu{i}"][1:9]] for i in self._cpus]
        except (OSError, KeyError, ValueError):
            return None
        # busy: all but idle and iowait; work at a lower priority than this process's counts as free (it gives way)
        busy = sum(sum(t) - t[3] - t[4] - (t[1] if self._niced_free else 0) for t in ticks)
        return time.monotonic(), busy * self._tick, time.process_time()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What a result was measured on: CPU model, core count, torch threads and version, the GPU if any.

    Examples:
        >>> sorted(describe_machine(torch.device("cpu")))
        ['cpu', 'cpu_count', 'platform', 'torch', 'torch_threads']
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "platform": platform.system(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
