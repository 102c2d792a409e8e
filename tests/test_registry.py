"""Every registered name builds through timm.create_model."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from bnvit import ViT

MNIST = ["vitln_mnist", "vitbnffn_mnist", "vitbn_mnist"]
CIFAR = ["vitln_cifar", "vitbnffn_cifar", "vitbn_cifar"]
IMAGENET = [f"{p}_{w}16_224" for p in ("vitln", "vitbnffn", "vitbn") for w in ("ti", "s", "b")]
ALL = MNIST + CIFAR + IMAGENET
NORM_OF = {"vitln": "ln", "vitbnffn": "bn_ffn", "vitbn": "bn"}
# name -> (in_chans, side, patch, dim, num_classes) of the default build
DEFAULTS = {
    **{n: (1, 28, 7, 64, 10) for n in MNIST},
    **{n: (3, 32, 4, 64, 10) for n in CIFAR},
    **{n: (3, 224, 16, {"ti16": 192, "s16": 384, "b16": 768}[n.split("_")[1]], 1000) for n in IMAGENET},
}


def test_all_names_are_registered():
    listed = set(timm.list_models("vit*_mnist") + timm.list_models("vit*_cifar") + timm.list_models("vit*16_224"))
    assert set(ALL) <= listed
    assert sorted(timm.list_models(module="registry")) == sorted([*ALL, "dnn_mnist", "dnnbn_mnist"])
    for name in ALL:
        assert timm.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == "bnvit.timm.registry"


def test_names_do_not_clash_with_timm():
    ours = set(ALL)
    for module in timm.list_modules():
        names = set(timm.list_models(module=module))
        if module != "registry":
            assert not names & ours, f"timm module {module} registers {sorted(names & ours)}"
        for name in names:
            # Every name is still served by the module that registered it: bnvit replaced none of timm's.
            defined_in = timm.models.model_entrypoint(name).__module__
            assert defined_in.rsplit(".", 1)[-1] == module, f"{name} of {module} now comes from {defined_in}"
    assert timm.models.model_entrypoint("vit_tiny_patch16_224").__module__ == "timm.models.vision_transformer"


@pytest.mark.parametrize("name", ALL)
def test_create_model_with_overrides(name):
    _, _, patch, dim, _ = DEFAULTS[name]
    img = 2 * patch  # a 2x2 grid keeps the big models cheap
    model = timm.create_model(name, depth=1, num_classes=3, in_chans=2, img_size=img, drop_rate=0.1)
    assert isinstance(model, ViT)
    c = model.config
    assert (c["depth"], c["num_classes"], c["in_chans"], c["img_size"], c["drop_rate"]) == (1, 3, 2, (img, img), 0.1)
    assert (c["patch_size"], c["dim"], c["norm"]) == (patch, dim, NORM_OF[name.split("_")[0]])
    assert len(model.blocks) == 1
    assert model.blocks[0].attn.proj_drop.p == 0.1
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 2, img, img))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg(name):
    chans, side, patch, _, num_classes = DEFAULTS[name]
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (chans, side, side)
    assert len(cfg.mean) == len(cfg.std) == chans
    assert all(s > 0 for s in cfg.std)
    assert cfg.classifier == "head"
    assert cfg.num_classes == num_classes
    model = timm.create_model(name, depth=1, img_size=2 * patch)
    assert model.pretrained_cfg["input_size"] == (chans, 2 * patch, 2 * patch)  # follows the model's img_size
    assert model.pretrained_cfg["classifier"] == "head"
    assert isinstance(getattr(model, model.pretrained_cfg["classifier"]), nn.Linear)
    assert model.num_classes == num_classes
    assert model.config["in_chans"] == chans


def test_mnist_and_cifar_builders_use_the_article_config():
    for name in MNIST + CIFAR:
        c = timm.create_model(name).config
        assert (c["dim"], c["heads"], c["dim_head"], c["mlp_dim"], c["depth"]) == (64, 8, 64, 128, 6)
        assert (c["pool"], c["pos_embed"], c["qkv_bias"], c["drop_rate"]) == ("cls", "learn", False, 0.0)
        assert c["weight_init"] == "reference"
    assert timm.create_model("vitbnffn_mnist").num_tokens == 17
    assert timm.get_pretrained_cfg_value("vitln_mnist", "mean") == (0.0,)
    assert timm.get_pretrained_cfg_value("vitln_mnist", "std") == (1.0,)


@pytest.mark.parametrize("name", ["vitbn_mnist", "vitln_ti16_224"])  # no weights shipped for these
def test_pretrained_without_a_file_raises(name):
    with pytest.raises(ValueError, match=rf"{name}.*pretrained_cfg_overlay"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ["vitln_mnist", "vitbn_cifar"])
def test_features_only_gives_the_last_three_blocks(name):
    model = timm.create_model(name, features_only=True, depth=4).eval()
    side, patch = DEFAULTS[name][1], DEFAULTS[name][2]
    assert model.feature_info.module_name() == ["blocks.1", "blocks.2", "blocks.3"]
    feats = model(torch.rand(2, DEFAULTS[name][0], side, side))
    assert [tuple(f.shape) for f in feats] == [(2, 64, side // patch, side // patch)] * 3
