"""Bad input raises ValueError / TypeError with a message naming the value and what is valid."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import bnvit
from bnvit import Attention, EncoderBlock, ViT, ViTBNFFN

SMALL = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)


@pytest.mark.parametrize(
    ("img_size", "patch_size", "match"),
    [
        (28, 5, r"img_size \(28, 28\).*patch_size 5"),
        ((28, 30), 7, r"img_size \(28, 30\).*patch_size 7"),
        (32, 7, r"img_size \(32, 32\).*patch_size 7"),
    ],
)
def test_img_size_not_divisible_by_patch_size(img_size, patch_size, match):
    with pytest.raises(ValueError, match=match):
        ViT(img_size=img_size, patch_size=patch_size, depth=1)


@pytest.mark.parametrize("name", ["patch_size", "in_chans", "dim", "depth", "heads", "dim_head", "mlp_dim"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got {value}"):
        ViT(**{"depth": 1, name: value})


@pytest.mark.parametrize(
    ("img_size", "match"),
    [
        (0, r"img_size must be an int >= 1, got 0"),
        (-28, r"img_size must be an int >= 1, got -28"),
        ((28, 0), r"img_size\[1\] must be an int >= 1, got 0"),
        ((28, 28, 28), r"img_size must be an int or an \(h, w\) pair, got \(28, 28, 28\)"),
    ],
)
def test_bad_img_size(img_size, match):
    with pytest.raises(ValueError, match=match):
        ViT(img_size=img_size, depth=1)


def test_negative_num_classes():
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got -1"):
        ViT(num_classes=-1, depth=1)
    model = ViT(depth=1, **SMALL)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got -2"):
        model.reset_classifier(-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dim=64.0), r"dim must be an int >= 1, got 64\.0 \(float\)"),
        (dict(depth="6"), r"depth must be an int >= 1, got '6' \(str\)"),
        (dict(heads=True), r"heads must be an int >= 1, got True \(bool\)"),
        (dict(img_size=28.0), r"img_size must be an int >= 1, got 28\.0 \(float\)"),
        (dict(qkv_bias="yes"), r"qkv_bias must be a bool, got 'yes'"),
        (dict(drop_rate="0.1"), r"drop_rate must be a number in \[0, 1\), got '0\.1' \(str\)"),
        (dict(num_classes=None), r"num_classes must be an int >= 0, got None"),
    ],
)
def test_wrong_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ViT(**{"depth": 1, **kwargs})


@pytest.mark.parametrize("name", ["drop_rate", "pos_drop_rate", "attn_drop_rate", "drop_path_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_rates_out_of_range(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\), got {value}"):
        ViT(**{"depth": 1, name: value})


@pytest.mark.parametrize(
    ("name", "value", "choices"),
    [
        ("norm", "layer", ("ln", "bn_ffn", "bn")),
        ("norm", "LN", ("ln", "bn_ffn", "bn")),
        ("pool", "max", ("cls", "avg", "mean", "")),
        ("pos_embed", "rope", ("learn", "sincos")),
        ("weight_init", "jax", ("reference", "timm")),
    ],
)
def test_unknown_choices(name, value, choices):
    valid = ", ".join(repr(c) for c in choices)
    with pytest.raises(ValueError, match=re.escape(f"unknown {name} {value!r}; valid choices: {valid}")):
        ViT(**{"depth": 1, name: value})


def test_unknown_norm_in_blocks():
    with pytest.raises(ValueError, match=r"unknown norm 'rms'; valid choices: 'ln', 'bn_ffn', 'bn'"):
        EncoderBlock(16, 2, 8, 32, norm="rms")
    with pytest.raises(ValueError, match=r"'rms'.*'ln', 'bn'"):
        Attention(16, 2, 8, norm="rms")
    with pytest.raises(ValueError, match=r"unknown norm 'rms'"):
        timm.create_model("vitln_mnist", norm="rms")


def test_fixed_norm_classes_reject_another_norm():
    with pytest.raises(ValueError, match=r"norm='bn_ffn', got norm='bn'"):
        ViTBNFFN(norm="bn")


def test_unknown_global_pool():
    model = ViT(depth=1, **SMALL)
    with pytest.raises(ValueError, match=r"unknown global_pool 'max'; valid choices: 'cls', 'avg', 'mean', ''$"):
        model.reset_classifier(10, global_pool="max")


@pytest.mark.parametrize("dim", [63, 15])
def test_sincos_with_odd_dim(dim):
    with pytest.raises(ValueError, match=rf"sincos.*even dim.*dim={dim}"):
        ViT(depth=1, dim=dim, pos_embed="sincos")
    # The learnable embedding has no such constraint.
    assert ViT(depth=1, dim=dim, heads=2, dim_head=8, pos_embed="learn").config["dim"] == dim


@pytest.mark.parametrize(
    ("shape", "got"),
    [
        ((2, 3, 28, 28), r"\(2, 3, 28, 28\)"),  # wrong channels
        ((2, 1, 32, 32), r"\(2, 1, 32, 32\)"),  # wrong image size
        ((2, 1, 28, 21), r"\(2, 1, 28, 21\)"),  # a size the patches would fit
        ((1, 28, 28), r"\(1, 28, 28\)"),  # 3-D input
        ((2, 1, 1, 28, 28), r"\(2, 1, 1, 28, 28\)"),
    ],
)
def test_forward_with_wrong_shape(shape, got):
    model = ViT(depth=1, **SMALL)
    with pytest.raises(ValueError, match=r"expected .*\(batch, 1, 28, 28\).*got " + got):
        model(torch.rand(*shape))
    with pytest.raises(ValueError, match=r"\(batch, 1, 28, 28\)"):
        model.forward_features(torch.rand(*shape))


def test_forward_with_wrong_shape_cifar_model():
    model = ViT(depth=1, img_size=32, patch_size=4, in_chans=3, **SMALL)
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\).*got \(4, 1, 28, 28\)"):
        model(torch.rand(4, 1, 28, 28))


def test_checkpoint_of_the_wrong_kind_or_size(tmp_path):
    state = ViTBNFFN(depth=2, **SMALL).state_dict()
    with pytest.raises(ValueError, match=r"does not match") as info:
        bnvit.checkpoint_filter_fn(state, ViT(norm="ln", depth=3, **SMALL))
    assert "norm: checkpoint 'bn_ffn', model 'ln'" in str(info.value)
    assert "depth: checkpoint 2, model 3" in str(info.value)

    with pytest.raises(ValueError, match=r"mlp_dim: checkpoint 32, model 64") as info:
        bnvit.checkpoint_filter_fn(state, ViTBNFFN(depth=2, dim=16, heads=2, dim_head=8, mlp_dim=64))
    assert "depth" not in str(info.value) and "norm:" not in str(info.value)

    path = tmp_path / "bnffn.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"norm='bn_ffn'.*vitbn_mnist.*norm='bn'"):
        timm.create_model("vitbn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match=r"dim: checkpoint 16, model 64"):
        timm.create_model("vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match=r"depth=3 was asked, the checkpoint has depth=2"):
        bnvit.load_model(path, depth=3, heads=2)
