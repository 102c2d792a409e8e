"""Folding BatchNorm into the neighbouring Linear layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnvit import BatchNormFFN, ViT, ViTBN, ViTBNFFN, fold_batchnorm
from bnvit.models.fold import fold_bn_after_linear, fold_bn_before_linear

SMALL = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _randomize_affine(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)


def _prepared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random affine parameters and running statistics far from their defaults, in eval mode."""
    _randomize_affine(model)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(x * 3 + 0.5)
    for bn in _bns(model):
        assert int(bn.num_batches_tracked) == 4
        assert (bn.running_mean.abs().max() > 0.05) and ((bn.running_var - 1).abs().max() > 0.05)
    return model.eval()


@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_folded_vit_gives_the_same_logits(norm, qkv_bias, pool):
    x = torch.rand(8, 1, 28, 28)
    model = _prepared(ViT(depth=2, norm=norm, qkv_bias=qkv_bias, pool=pool, **SMALL), x)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        out = folded(x)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() <= 1e-5
    # The logits are not trivially equal to a model whose BatchNorms were merely dropped.
    dropped = copy.deepcopy(model)
    for block in dropped.blocks:
        block.ffn.norm = nn.Identity()
    with torch.no_grad():
        assert (dropped(x) - expected).abs().max() > 1e-2


def test_folded_vitbnffn_keeps_attention_layernorms():
    x = torch.rand(4, 1, 28, 28)
    model = _prepared(ViTBNFFN(depth=3, **SMALL), x)
    folded = fold_batchnorm(model)
    assert not _bns(folded)
    for block in folded.blocks:
        assert isinstance(block.ffn, BatchNormFFN)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.ffn.modules())
        assert isinstance(block.attn.norm, nn.LayerNorm)
    assert isinstance(folded.patch_embed.pre_norm, nn.LayerNorm) and isinstance(folded.norm, nn.LayerNorm)
    assert sum(isinstance(m, nn.LayerNorm) for m in folded.modules()) == 3 + 3


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_folded_vitbn_has_no_normalization_left(pool):
    x = torch.rand(4, 1, 28, 28)
    model = _prepared(ViTBN(depth=2, pool=pool, **SMALL), x)
    folded = fold_batchnorm(model)
    assert not _bns(folded)
    assert not any(isinstance(m, nn.LayerNorm) for m in folded.modules())
    assert not any(type(m).__name__ == "TokenBatchNorm" for m in folded.modules())
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5


def test_fold_is_not_inplace_by_default():
    x = torch.rand(4, 1, 28, 28)
    model = _prepared(ViTBNFFN(depth=2, **SMALL), x)
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert folded is not model
    assert len(_bns(model)) == 2
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not folded.training


def test_fold_inplace_modifies_the_model():
    x = torch.rand(4, 1, 28, 28)
    model = _prepared(ViTBNFFN(depth=2, **SMALL), x)
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm(model, inplace=True)
    assert folded is model
    assert not _bns(model)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5


def test_fold_in_training_mode_raises():
    model = ViTBNFFN(depth=1, **SMALL)
    with pytest.raises(ValueError, match=r"eval\(\)"):
        fold_batchnorm(model.train())
    model.eval()
    model.blocks[0].ffn.norm.bn.train()  # one BatchNorm left in training mode
    with pytest.raises(ValueError, match=r"eval\(\)"):
        fold_batchnorm(model)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"eval\(\)"):
        fold_batchnorm(mlp)


def test_sequential_mlp_folds():
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 16),
        nn.BatchNorm1d(16),
        nn.Sigmoid(),
        nn.Linear(16, 12, bias=False),
        nn.BatchNorm1d(12),
        nn.Sigmoid(),
        nn.Linear(12, 5),
    )
    x = torch.randn(32, 4, 5)
    mlp = _prepared(mlp, x)
    with torch.no_grad():
        expected = mlp(x)
        folded = fold_batchnorm(mlp)
        out = folded(x)
    assert not _bns(folded)
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 3
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_after_linear_is_exact(bias):
    linear, bn = nn.Linear(7, 5, bias=bias).double(), nn.BatchNorm1d(5).double()
    _randomize_affine(bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
    bn.eval()
    x = torch.randn(11, 7, dtype=torch.float64)
    folded = fold_bn_after_linear(linear, bn)
    assert isinstance(folded, nn.Linear) and folded.bias is not None
    h = x @ linear.weight.T + (linear.bias if bias else 0)
    expected = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_before_linear_is_exact(bias):
    bn, linear = nn.BatchNorm1d(7).double(), nn.Linear(7, 5, bias=bias).double()
    _randomize_affine(bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
    bn.eval()
    x = torch.randn(11, 7, dtype=torch.float64)
    folded = fold_bn_before_linear(bn, linear)
    assert isinstance(folded, nn.Linear) and folded.bias is not None
    normed = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = normed @ linear.weight.T + (linear.bias if bias else 0)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


def test_fold_keeps_the_parameter_dtype():
    linear, bn = nn.Linear(4, 3), nn.BatchNorm1d(3).eval()
    assert fold_bn_after_linear(linear, bn).weight.dtype == torch.float32
    assert fold_bn_before_linear(nn.BatchNorm1d(4).eval(), linear).weight.dtype == torch.float32


@pytest.mark.parametrize("not_a_model", ["x", None, {"w": torch.zeros(1)}])
def test_fold_of_something_not_a_module_is_a_type_error(not_a_model):
    with pytest.raises(
        TypeError, match=r"fold_batchnorm needs a torch\.nn\.Module, got .*\(" + type(not_a_model).__name__
    ):
        fold_batchnorm(not_a_model)


@pytest.mark.parametrize(
    ("buffer", "value", "problem"),
    [
        ("running_var", -0.25, r"running_var has 1 negative value \(min -0\.25\)"),
        ("running_var", float("nan"), "running_var has 1 non-finite value"),
        ("running_mean", float("inf"), "running_mean has 1 non-finite value"),
    ],
)
def test_fold_refuses_batchnorm_statistics_that_cannot_be(buffer, value, problem):
    model = ViTBNFFN(depth=1, **SMALL).eval()
    getattr(model.blocks[0].ffn.norm.bn, buffer)[5] = value
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=r"fold_batchnorm: the model holds impossible BatchNorm statistics: blocks\.0\."
    ):
        fold_batchnorm(model, inplace=True)
    with pytest.raises(ValueError, match=problem):
        fold_batchnorm(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k.endswith(buffer) for k in before)  # nothing was folded
