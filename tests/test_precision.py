"""fit()'s default precision: the fastest one that does not change what training reaches."""

from __future__ import annotations

import statistics

import pytest
import torch

from bnvit import ViTBNFFN, fit
from bnvit.data import load_mnist
from bnvit.training import cpu_has_fast_bf16, resolve_precision


def test_auto_precision_per_device():
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision='fp16' needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_cpu_autocast_attention_matches_fp32_attention():
    """The CPU autocast path (bf16 products, fp32 softmax) computes the same attention to bf16 rounding."""
    torch.manual_seed(0)
    block = ViTBNFFN(depth=1).blocks[0].attn.eval()
    x = torch.randn(4, 17, 64)
    with torch.no_grad():
        exact = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = block(x).float()
    assert (fast - exact).abs().max() < 0.05 * exact.abs().max()
    assert not torch.equal(fast, exact)  # the bf16 path really ran


def _short_run(mnist_root, precision: str, seed: int) -> float:
    images, labels = load_mnist(mnist_root, train=True)
    test_images, test_labels = load_mnist(mnist_root, train=False)
    torch.manual_seed(seed)
    history = fit(
        ViTBNFFN(depth=2),
        (images[:3000], labels[:3000]),
        (test_images[:1000], test_labels[:1000]),
        epochs=2,
        lr=3e-3,
        device="cpu",
        precision=precision,
        seed=seed,
        progress=False,
    )
    assert history.meta["precision"] == resolve_precision(precision, torch.device("cpu"))
    return history.val_acc[-1]


@pytest.mark.slow
def test_default_precision_reaches_the_accuracy_of_fp32(mnist_root):
    """Two seeds in fp32 and two with the default; the means differ by less than the seed noise.

    Seed noise is the spread between the two fp32 runs (about 1 point at this size: 3,000
    images, 2 epochs); the tolerance is twice that, at least 2 points.
    """
    fp32 = [_short_run(mnist_root, "fp32", seed) for seed in (0, 1)]
    default = [_short_run(mnist_root, "auto", seed) for seed in (0, 1)]
    assert min(fp32) > 0.7, fp32
    noise = abs(fp32[0] - fp32[1])
    assert abs(statistics.fmean(default) - statistics.fmean(fp32)) <= max(2 * noise, 0.02), (default, fp32)
