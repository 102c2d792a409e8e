"""BatchNorm at its edges: a batch of one image, eval-mode independence from the batch, low precision.

`test_layers.py` checks single blocks against hand computations; these tests check whole models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnvit import ViT, fit
from bnvit.models.blocks import TokenBatchNorm

SMALL = dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
EPS, MOMENTUM = 1e-5, 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny (batches of one image): a second thread only adds synchronization.

    Measured on 2 busy cores: 0.2 s with one thread, 4-45 s with two, for the batch-1 fits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_norms(model: nn.Module) -> dict[str, TokenBatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenBatchNorm)}


def capture_inputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """The `(values, features)` input of every TokenBatchNorm's BatchNorm, per forward pass."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        norm.bn.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
        for name, norm in token_norms(model).items()
    ]
    return seen, handles


# ----------------------------------------------------------------------------- a batch of one image


@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
def test_training_with_a_batch_of_one_image_normalizes_over_its_tokens(norm):
    torch.manual_seed(0)
    model = ViT(norm=norm, **SMALL).train()
    seen, handles = capture_inputs(model)
    image = torch.rand(1, 1, 28, 28)
    out = model(image)
    for handle in handles:
        handle.remove()
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for name, norm_layer in token_norms(model).items():
        values = seen[name]
        tokens = 16 if name.startswith("patch_embed.") else 17  # the 16 patches; with the CLS token after
        assert values.shape[0] == tokens, name
        # The running statistics moved by one step towards the statistics of those tokens.
        mean, var = values.double().mean(0), values.double().var(0, unbiased=True)
        torch.testing.assert_close(norm_layer.bn.running_mean.double(), MOMENTUM * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            norm_layer.bn.running_var.double(), 1 - MOMENTUM + MOMENTUM * var, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
def test_fit_with_batch_size_one_learns(norm):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (48,), generator=g)
    images = torch.rand(48, 1, 28, 28, generator=g) * 0.3
    images[labels == 1, :, :14] += 0.7  # class 1: a bright top half
    torch.manual_seed(0)
    model = ViT(norm=norm, num_classes=2, **SMALL)
    history = fit(model, (images, labels), (images, labels), epochs=3, lr=1e-3, batch_size=1, device="cpu", seed=0,
                  progress=False)  # fmt: skip
    assert not history.diverged
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] >= 0.75, history  # 2 classes; measured 0.92 (bn_ffn) and 1.0 (bn)
    assert all(int(n.bn.num_batches_tracked) == 3 * 48 for n in token_norms(model).values())


# ----------------------------------------------------------------------------- eval mode: no batch dependence


def _trained(norm: str) -> ViT:
    """A model whose running statistics are far from their initial values."""
    torch.manual_seed(1)
    model = ViT(norm=norm, **SMALL)
    images = torch.rand(64, 1, 28, 28) * 2 + 0.5
    fit(model, (images, torch.randint(0, 10, (64,))), epochs=2, lr=1e-3, batch_size=16, device="cpu", progress=False)
    return model


@pytest.mark.parametrize("norm", ["bn_ffn", "bn", "ln"])
def test_eval_predictions_do_not_depend_on_the_batch(norm):
    model = _trained(norm).eval()
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 28, 28, generator=g)
    small = torch.rand(7, 1, 28, 28, generator=g)
    large = torch.rand(100, 1, 28, 28, generator=g) * 3  # other companions, other statistics
    with torch.no_grad():
        alone = model(image)[0]
        in_small = model(torch.cat([small[:3], image, small[3:6]]))[3]
        in_large = model(torch.cat([large[:60], image, large[60:99]]))[60]
    # Different batch sizes take different matrix-product kernels: equal to float32 rounding.
    torch.testing.assert_close(in_small, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_large, alone, rtol=0, atol=1e-5)
    if norm != "ln":  # control: in training mode the companions change the prediction
        with torch.no_grad():
            model.train()
            trained_small = model(torch.cat([small[:3], image, small[3:6]]))[3]
            trained_large = model(torch.cat([large[:60], image, large[60:99]]))[60]
        assert (trained_small - trained_large).abs().max() > 1e-2


# ----------------------------------------------------------------------------- low precision


def _low_precision_cases():
    yield pytest.param("cpu", torch.bfloat16, id="cpu-bf16")
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")
    yield pytest.param("cuda", torch.float16, id="cuda-fp16", marks=cuda)
    yield pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=cuda)


@pytest.mark.parametrize(("device", "dtype"), list(_low_precision_cases()))
@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
def test_batchnorm_under_autocast_keeps_fp32_statistics(device, dtype, norm):
    torch.manual_seed(0)
    model = ViT(norm=norm, **SMALL).to(device).train()
    seen, handles = capture_inputs(model)
    outputs: dict[str, torch.Tensor] = {}
    for name, norm_layer in token_norms(model).items():
        handles.append(norm_layer.bn.register_forward_hook(lambda m, a, out, n=name: outputs.__setitem__(n, out)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(16, 1, 28, 28, device=device)
    with torch.autocast(device, dtype=dtype):
        logits = model(images)
    loss = nn.functional.cross_entropy(logits.float(), torch.randint(0, 10, (16,), device=device))
    loss.backward()
    opt.step()
    for handle in handles:
        handle.remove()
    assert any(values.dtype == dtype for values in seen.values())  # autocast did feed BatchNorms low precision
    for name, norm_layer in token_norms(model).items():
        bn = norm_layer.bn
        for tensor in (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.weight.grad):
            assert tensor.dtype == torch.float32, name
        # Statistics computed in fp32 from the low-precision input: equal to a float64 computation
        # up to fp32 rounding. Computed in bf16 they would be off by ~1e-4 (measured).
        values = seen[name].double()
        mean, var = values.mean(0), values.var(0, unbiased=True)
        torch.testing.assert_close(bn.running_mean.double(), MOMENTUM * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), 1 - MOMENTUM + MOMENTUM * var, rtol=1e-5, atol=1e-6)
        # The output is the fp32 normalization, rounded once to the output's precision.
        out = outputs[name]
        scale = torch.rsqrt(values.var(0, unbiased=False) + EPS) * 1.0  # weight 1 and bias 0 at the first step
        reference = (values - mean) * scale
        ulp = 2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-11 if out.dtype == torch.float16 else 2.0**-23
        torch.testing.assert_close(out.double(), reference, rtol=ulp, atol=1e-6)


def test_fit_in_bf16_on_cpu_keeps_fp32_batchnorm_statistics():
    torch.manual_seed(0)
    model = ViT(norm="bn", **SMALL)
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    history = fit(model, (images, labels), epochs=1, lr=1e-3, batch_size=16, device="cpu", precision="bf16",
                  progress=False)  # fmt: skip
    assert not history.diverged and history.meta["precision"] == "bf16"
    for name, norm_layer in token_norms(model).items():
        bn = norm_layer.bn
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32, name
        assert int(bn.num_batches_tracked) == 4 and torch.isfinite(bn.running_var).all(), name
