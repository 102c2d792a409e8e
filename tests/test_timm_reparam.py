"""timm's `reparameterize_model` (`--reparam` in timm's scripts) on bnvit's models: BatchNorm folded, same logits."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

import bnvit
from bnvit.weights.names import registered_names


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics away from their defaults, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 0.3)
    return model.eval()


def _small(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs: dict = dict(depth=1)
    if name.endswith("_224"):
        kwargs["img_size"] = 32
    model = timm.create_model(name, **kwargs)
    c = model.pretrained_cfg["input_size"][0]
    size = 32 if name.endswith("_224") else model.pretrained_cfg["input_size"][1]
    x = torch.rand(6, c, size, size)
    return _trained(model, x), x


@pytest.mark.parametrize("name", registered_names())
def test_reparameterize_model_folds_every_bnvit_model(name):
    model, x = _small(name)
    had_bn = _bns(model) > 0
    with torch.no_grad():
        expected = model(x)
        folded = reparameterize_model(model)
        out = folded(x)
    assert _bns(folded) == 0
    assert (out - expected).abs().max() <= 1e-5
    if had_bn:  # the statistics mattered: dropping the BatchNorms instead would change the logits
        assert _bns(model) > 0  # not in place: the original keeps its BatchNorms


def test_reparameterize_model_folds_a_timm_vit_with_the_bn_ffn():
    model = timm.create_model("vit_tiny_patch16_224", block_fn=bnvit.BNFFNBlock, img_size=32, depth=2)
    x = torch.rand(4, 3, 32, 32)
    model = _trained(model, x)
    with torch.no_grad():
        expected = model(x)
        out = reparameterize_model(model)(x)
    assert (out - expected).abs().max() <= 1e-5


def test_fuse_returns_the_folded_module_and_fold_batchnorm_still_works_in_place():
    model = _trained(bnvit.ViTBN(depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32), torch.rand(4, 1, 28, 28))
    ffn = model.blocks[0].ffn
    assert ffn.fuse() is ffn and isinstance(ffn.norm, nn.Identity)
    folded = bnvit.fold_batchnorm(model.eval(), inplace=True)
    assert folded is model and _bns(model) == 0


def test_a_vitbn_given_to_timm_keeps_its_final_norm_as_a_scale_and_shift():
    # timm calls the fuse() of a model's children only: the final norm has no Linear beside it to fold into
    model, _ = _small("vitbn_mnist")
    folded = reparameterize_model(model)
    assert type(folded.norm).__name__ == "ScaleShift"
    assert isinstance(bnvit.fold_batchnorm(model).norm, nn.Identity)  # bnvit's own walk folds it into the head


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason='ONNX export needs the optional extra: pip install "bnvit[onnx]"',
)
@pytest.mark.parametrize("name", ["vitbn_mnist", "timmvitbnffn_mnist", "dnnbn_mnist"])
def test_onnx_export_after_reparam_has_no_batchnorm_node(name, tmp_path):
    import onnx
    from timm.utils.onnx import onnx_export

    def ops(module: nn.Module, path) -> set[str]:
        onnx_export(module, str(path), example_input=x[:1], check=False)
        return {node.op_type for node in onnx.load(str(path)).graph.node}

    model, x = _small(name)
    assert "BatchNormalization" in ops(model, tmp_path / "plain.onnx")  # without --reparam the graph keeps them
    assert "BatchNormalization" not in ops(reparameterize_model(model), tmp_path / "reparam.onnx")
