"""Shared fixtures.

Tests that need the real MNIST files read them from `BNVIT_DATA` (`../shared/data` from the
project root in CI); without it they are skipped with a message saying so.

bnvit is imported before torch, so the suite's OpenMP threads wait passively: with a core taken by
another program, spinning threads made tests many times slower (docs/training.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# isort: off
import bnvit  # noqa: F401  before torch: bnvit._util.device sets OpenMP's passive waiting (robust to a busy core)
import torch

# isort: on

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CHECKPOINTS = Path(
    os.environ.get("BNVIT_REFERENCE", ROOT.parent / "shared" / "checkpoints" / "reference")
).resolve()

# benchmarks/reference_vit.py is the straightforward reference-style model the library is checked against.
sys.path.insert(0, str(ROOT / "benchmarks"))


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
