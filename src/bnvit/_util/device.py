"""Devices, precision and CPU threads: what `"auto"` means on this machine.

Importing this module (which `import bnvit` does first) sets `OMP_WAIT_POLICY=PASSIVE` unless it
is already set, before torch is imported: OpenMP reads its waiting policy once, when torch loads
it, and spinning threads make training crawl when another program holds a core
(docs/training.md). A script that imports torch before bnvit keeps OpenMP's default unless it
sets the variable itself.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

OPENMP_WAIT_POLICY = "PASSIVE"
"""The OpenMP waiting policy bnvit asks for (`OMP_WAIT_POLICY`) unless one is set already."""

TORCH_LOADED_FIRST = "torch" in sys.modules
"""Whether torch was imported before bnvit; then OpenMP kept the policy it found in the environment."""

os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)

import torch  # noqa: E402  after the waiting policy is in the environment: OpenMP reads it when torch loads it

from . import checks as _checks  # noqa: E402

__all__ = [
    "OPENMP_WAIT_POLICY",
    "PRECISIONS",
    "TORCH_LOADED_FIRST",
    "autocast",
    "cpu_has_fast_bf16",
    "describe_machine",
    "resolve_device",
    "resolve_precision",
    "torch_threads",
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
    """`"auto"` -> the fastest precision that does not change what training reaches on `device`.

    That is bf16 autocast (matrix products in bf16; BatchNorm statistics, softmax and the loss
    in fp32) on CUDA and on CPUs with native bf16 instructions (AVX512-BF16 or AMX); fp32 on
    other CPUs, where bf16 is emulated and slower (docs/benchmarks.md).

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


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` PyTorch CPU threads (None: as they are), then restore the count.

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
