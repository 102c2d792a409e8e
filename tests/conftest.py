"""Shared fixtures.

Tests that need the real MNIST files read them from `BNVIT_DATA` (`../shared/data` from the
project root in CI); without it they are skipped with a message saying so.

Between tests, the suite's CPU threads follow the cores other programs leave free
(`bnvit._util.device.CpuThreads`): with a core taken by another program, PyTorch's spinning
threads made tests many times slower (docs/training.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from bnvit._util.device import CpuThreads

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CHECKPOINTS = Path(
    os.environ.get("BNVIT_REFERENCE", ROOT.parent / "shared" / "checkpoints" / "reference")
).resolve()

# benchmarks/reference_vit.py is the straightforward reference-style model the library is checked against.
sys.path.insert(0, str(ROOT / "benchmarks"))


_THREADS = CpuThreads("auto", every=0.5)


def pytest_sessionstart(session: pytest.Session) -> None:
    _THREADS.__enter__()


def pytest_runtest_setup(item: pytest.Item) -> None:
    _THREADS.poll()  # between tests, never inside one: a test sees one thread count throughout


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _THREADS.__exit__()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding `MNIST/raw/*-ubyte`, from `BNVIT_DATA`."""
    value = os.environ.get("BNVIT_DATA")
    if not value:
        pytest.skip("set BNVIT_DATA to a folder with MNIST/raw/ to run tests on real MNIST")
    root = Path(value).resolve()
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        raise FileNotFoundError(f"BNVIT_DATA={value} has no MNIST/raw/t10k-images-idx3-ubyte")
    return root


@pytest.fixture(scope="session")
def reference_checkpoints() -> Path:
    """The article's published checkpoints (`BNVIT_REFERENCE`, default ../shared/checkpoints/reference)."""
    if not REFERENCE_CHECKPOINTS.is_dir():
        pytest.skip(f"reference checkpoints not found at {REFERENCE_CHECKPOINTS}")
    return REFERENCE_CHECKPOINTS
