"""timm's ViT and DeiT sizes with the BatchNorm FFN by name: LayerNorm weights converted on load, the Hub round trip."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

import bnvit
from bnvit.timm import name_bn_ffn, to_bn_ffn
from bnvit.timm.vision_transformer_bnffn import LN_TWINS
from bnvit.weights.convert import ln_ffn_to_bn_ffn

SMALL = dict(img_size=32, depth=2)


def _ln_file(tmp_path, name="vit_tiny_patch16_224", **kwargs):
    """A randomly initialised timm LayerNorm ViT, with non-trivial norm2 affines, saved as safetensors."""
    model = timm.create_model(name, **{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.norm2.weight.uniform_(0.5, 2.0)
            block.norm2.bias.uniform_(-0.5, 0.5)
    path = tmp_path / "ln.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _trained_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    model.train()
    with torch.no_grad():
        model(x * 2 + 0.3)
    return model.eval()


def test_every_timm_vit_and_deit_size_is_registered_as_timms_model_with_the_bn_ffn():
    assert set(LN_TWINS) <= set(timm.list_models("*_patch16_bnffn_224"))
    for name, twin in LN_TWINS.items():
        model, ln = timm.create_model(name, depth=1), timm.create_model(twin, depth=1)
        assert type(model) is type(ln) is timm.models.VisionTransformer
        assert all(isinstance(b, bnvit.BNFFNBlock) for b in model.blocks)
        assert model.pretrained_cfg["architecture"] == name
        for key in ("mean", "std", "crop_pct", "interpolation", "num_classes", "hf_hub_id"):
            assert model.pretrained_cfg[key] == ln.pretrained_cfg[key], (name, key)  # the twin's weights and data


@pytest.mark.parametrize("fold_norm", [True, False])
def test_pretrained_loads_layernorm_weights_converted_as_to_bn_ffn_converts_the_model(tmp_path, fold_norm):
    ln, path = _ln_file(tmp_path)
    model = timm.create_model(
        "vit_tiny_patch16_bnffn_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        fold_norm=fold_norm,
        **SMALL,
    ).eval()
    converted = to_bn_ffn(ln, fold_norm=fold_norm).eval()
    mine, theirs = model.state_dict(), converted.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-6) for k in mine)
    assert (
        float(mine["blocks.0.mlp.norm.bn.running_var"].min()) == 1.0
        and int(mine["blocks.1.mlp.norm.bn.num_batches_tracked"]) == 0
    )
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_bnffn_224"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), converted(x), atol=1e-5)


def test_folding_norm2_keeps_its_affine_map_in_fc1():
    ln = timm.create_model("vit_tiny_patch16_224", **SMALL)
    with torch.no_grad():
        ln.blocks[0].norm2.weight.uniform_(0.5, 2.0)
        ln.blocks[0].norm2.bias.uniform_(-0.5, 0.5)
    sd = ln.state_dict()
    folded, dropped = ln_ffn_to_bn_ffn(sd), ln_ffn_to_bn_ffn(sd, fold_norm=False)
    x = torch.randn(5, 192)
    norm2, fc1 = ln.blocks[0].norm2, ln.blocks[0].mlp.fc1
    expected = fc1(x * norm2.weight + norm2.bias)
    got = x @ folded["blocks.0.mlp.fc1.weight"].T + folded["blocks.0.mlp.fc1.bias"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(dropped["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"])
    assert not any(".norm2." in k for k in folded)


def test_a_mismatch_is_one_error_never_a_partial_load(tmp_path):
    _, path = _ln_file(tmp_path)
    overlay = dict(file=str(path))
    with pytest.raises(
        ValueError, match=r"do not fit vit_tiny_patch16_bnffn_224 \(missing: blocks\.2\..*nothing was loaded"
    ):
        # another num_classes makes timm load non-strictly: the check is ours
        timm.create_model(
            "vit_tiny_patch16_bnffn_224",
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            img_size=32,
            depth=3,
            num_classes=5,
        )
    with pytest.raises(ValueError, match=r"other shapes: blocks\.0\.attn\.proj\.bias \(192,\) for \(384,\)"):
        timm.create_model("vit_small_patch16_bnffn_224", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL)
    model = timm.create_model(
        "vit_tiny_patch16_bnffn_224", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, **SMALL
    )
    assert model.head.out_features == 5  # a new head is what timm gives for another num_classes


def test_deit_names_load_deit_layernorm_weights(tmp_path):
    ln, path = _ln_file(tmp_path, "deit_small_patch16_224")
    model = timm.create_model(
        "deit_small_patch16_bnffn_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL
    )
    assert torch.equal(model.blocks[1].attn.qkv.weight, ln.blocks[1].attn.qkv.weight)


def _round_trip(model, tmp_path, x):
    save_for_hf(model, tmp_path / "hub", safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded


@pytest.mark.parametrize("how", ["registered", "block_fn", "to_bn_ffn"])
def test_save_for_hf_and_local_dir_give_identical_logits(how, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    if how == "registered":
        model = timm.create_model("vit_tiny_patch16_bnffn_224", num_classes=3, **SMALL)
    elif how == "block_fn":
        model = name_bn_ffn(
            timm.create_model("vit_tiny_patch16_224", block_fn=bnvit.BNFFNBlock, num_classes=3, **SMALL)
        )
    else:
        model = to_bn_ffn(timm.create_model("deit_tiny_patch16_224", num_classes=3, **SMALL))
    loaded = _round_trip(_trained_bn(model, x), tmp_path, x)
    assert loaded.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"]
    assert loaded.pretrained_cfg["architecture"].endswith("_patch16_bnffn_224")


def test_a_block_fn_model_unnamed_cannot_be_saved_and_name_bn_ffn_says_what_it_names(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", block_fn=bnvit.BNFFNBlock, **SMALL)
    with pytest.raises(ValueError, match="block_fn"):
        save_for_hf(model, tmp_path / "hub")
    large = timm.create_model("vit_large_patch16_224", block_fn=bnvit.BNFFNBlock, img_size=32, depth=1)
    with pytest.raises(
        ValueError, match=r"no BatchNorm-FFN twin of 'vit_large_patch16_224'; registered: .*vit_tiny_patch16_bnffn_224"
    ):
        name_bn_ffn(large)
    with pytest.raises(ValueError, match=r"blocks are all bnvit\.BNFFNBlock"):
        name_bn_ffn(timm.create_model("vit_tiny_patch16_224", **SMALL))
