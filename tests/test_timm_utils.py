"""BatchNorm in timm's utilities: freezing, bn_momentum / bn_eps, TorchScript, the blocks that are refused."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.utils import freeze

import bnvit
from bnvit.models.batchnorm import FrozenBatchNorm1d, freeze_batchnorm, unfreeze_batchnorm


def _stats(model):
    return [m.running_mean.clone() for m in model.modules() if hasattr(m, "running_mean")]


def test_timm_freeze_then_freeze_batchnorm_fixes_the_statistics_too():
    model = timm.create_model("timmvitbnffn_mnist", depth=1)
    x = torch.rand(8, 1, 28, 28)
    freeze(model)  # timm's: gradients off; its statistics freeze knows BatchNorm2d only
    before = _stats(model)
    model.train()(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))
    freeze_batchnorm(model)
    assert isinstance(model.blocks[0].mlp.norm.bn, FrozenBatchNorm1d)
    before = _stats(model)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))
    assert torch.allclose(train_out, eval_out)  # in train mode too: the statistics it holds
    assert not any(p.requires_grad for p in model.parameters())
    unfreeze_batchnorm(model)
    assert type(model.blocks[0].mlp.norm.bn) is torch.nn.BatchNorm1d
    assert torch.equal(model.blocks[0].mlp.norm.bn.running_mean, before[0])


@pytest.mark.parametrize("name", ["timmvitbnffn_mnist", "vit_tiny_patch16_bnffn_224", "vitbnffn_mnist", "dnnbn_mnist"])
def test_bn_momentum_and_eps_are_taken_by_every_model_with_a_batchnorm(name):
    model = timm.create_model(name, depth=1, bn_momentum=0.01, bn_eps=1e-3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and all(bn.momentum == 0.01 and bn.eps == 1e-3 for bn in bns)
    with pytest.raises(ValueError, match=r"bn_momentum must be in \(0, 1\], got 1.5"):
        timm.create_model(name, depth=1, bn_momentum=1.5)


@pytest.mark.parametrize("name", ["vitln_mnist", "vitbnffn_mnist", "timmvitbnffn_mnist"])
def test_torchscript_is_refused_in_one_sentence_naming_torch_export(name):
    model = timm.create_model(name, depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's own deprecation warning
        with pytest.raises(TypeError, match=r"^TorchScript cannot compile bnvit's models .*torch\.export\.export"):
            torch.jit.script(model)


def test_relpos_vits_are_refused_naming_what_is_supported():
    with pytest.raises(TypeError, match=r"BNFFNBlock takes the arguments of timm's Block .*got rel_pos_cls"):
        timm.create_model("vit_relpos_base_patch16_224", block_fn=bnvit.BNFFNBlock, img_size=32, depth=1)


def test_a_batchnorm_mlp_behind_timms_layernorm_is_refused_for_its_real_reason():
    model = timm.create_model("vit_tiny_patch16_224", mlp_layer=bnvit.BatchNormMlp, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"already a BatchNorm FFN \(mlp_layer=BatchNormMlp\), behind timm's norm2"):
        bnvit.to_bn_ffn(model)
