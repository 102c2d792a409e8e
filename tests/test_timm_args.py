"""timm's creation arguments on bnvit's ViTs: global_pool, bn_momentum, bn_eps, dynamic_img_size,
set_input_size, pretrained weights at another image size or channel count."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import resample_abs_pos_embed
from torch import nn

import bnvit  # noqa: F401  (registers the models)
from bnvit import ViT
from bnvit.weights.loading import WEIGHTS_DIR, read_state_dict

SMALL = dict(depth=2, dim=16, heads=2, dim_head=8, mlp_dim=32)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(
    ("global_pool", "pooled"),
    [
        ("token", lambda t: t[:, 0]),
        ("avg", lambda t: t[:, 1:].mean(1)),  # timm's meaning: the patch tokens, the CLS token excluded
        ("mean", lambda t: t.mean(1)),  # the article's: every token
        ("", lambda t: t),  # no pooling: the head on every token
    ],
)
def test_global_pool_as_timm_defines_it(global_pool, pooled):
    model = timm.create_model("vitbnffn_mnist", global_pool=global_pool, **SMALL).eval()
    x = torch.rand(3, 1, 28, 28)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled(tokens))
    torch.testing.assert_close(model(x), model.head(pooled(tokens)))
    assert model.config["pool"] == ("cls" if global_pool == "token" else global_pool)


def test_default_pool_is_still_the_cls_token():
    assert timm.create_model("vitbnffn_mnist", depth=1).pool == "cls"
    assert ViT(depth=1).pool == "cls"


def test_bad_global_pool():
    with pytest.raises(ValueError, match=r"^unknown pool 'max'; valid choices: 'cls', 'avg', 'mean', ''$"):
        timm.create_model("vitbnffn_mnist", global_pool="max", depth=1)
    with pytest.raises(ValueError, match=r"pool='mean' and global_pool='avg' disagree"):
        ViT(depth=1, pool="mean", global_pool="avg")


@pytest.mark.parametrize("name", ["vitbnffn_mnist", "vitbn_mnist", "vitbnffn_cifar"])
def test_bn_momentum_and_eps_reach_every_batchnorm(name):
    model = timm.create_model(name, bn_momentum=0.25, bn_eps=1e-3, depth=2)
    norms = _batchnorms(model)
    assert norms and all(m.momentum == 0.25 and m.eps == 1e-3 for m in norms)
    default = timm.create_model(name, depth=2)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in _batchnorms(default))
    # the momentum is the one the running statistics use
    bn = model.blocks[0].ffn.norm.bn
    before = bn.running_mean.clone()
    model.train()(torch.rand(4, *model.pretrained_cfg["input_size"]))
    assert not torch.equal(bn.running_mean, before)
    assert model.config["bn_momentum"] == 0.25 and model.config["bn_eps"] == 1e-3


def test_bn_momentum_survives_a_rebuild_from_config():
    model = ViT(norm="bn", bn_momentum=0.5, bn_eps=0.01, **SMALL)
    again = ViT(**model.config)
    assert all(m.momentum == 0.5 and m.eps == 0.01 for m in _batchnorms(again))


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan")])
def test_bad_bn_momentum(value):
    with pytest.raises(ValueError, match=rf"^bn_momentum must be in \(0, 1\], got {value}$"):
        timm.create_model("vitbnffn_mnist", bn_momentum=value, depth=1)


def test_bn_momentum_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"bn_momentum must be a number in \(0, 1\], got 'fast'"):
        ViT(depth=1, bn_momentum="fast")


@pytest.mark.parametrize("value", [0, -1e-5, float("inf")])
def test_bad_bn_eps(value):
    with pytest.raises(ValueError, match=rf"^bn_eps must be a finite number > 0, got {value}$"):
        timm.create_model("vitbnffn_mnist", bn_eps=value, depth=1)


def test_dynamic_img_size_resamples_the_position_embedding_on_the_fly():
    model = timm.create_model("vitbnffn_mnist", dynamic_img_size=True, **SMALL).eval()
    x = torch.rand(2, 1, 28, 28)
    static = timm.create_model("vitbnffn_mnist", **SMALL).eval()
    static.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), static(x))  # at the built size, nothing changes

    big = torch.rand(2, 1, 56, 42)
    expected_pos = resample_abs_pos_embed(model.pos_embed, [8, 6], [4, 4], num_prefix_tokens=1)
    sized = ViT(norm="bn_ffn", img_size=(56, 42), **SMALL).eval()
    sized.load_state_dict({**model.state_dict(), "pos_embed": expected_pos})
    torch.testing.assert_close(model(big), sized(big))
    final, feats = model.forward_intermediates(big, indices=1)
    assert final.shape == (2, 49, 16) and feats[0].shape == (2, 16, 8, 6)

    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 28, 28\), got \(2, 1, 56, 42\)"):
        static(big)
    with pytest.raises(ValueError, match=r"H and W multiples of the patch size 7, got \(2, 1, 30, 28\)"):
        model(torch.rand(2, 1, 30, 28))


def test_dynamic_img_size_with_the_sincos_embedding():
    model = ViT(pos_embed="sincos", dynamic_img_size=True, **SMALL).eval()
    sized = ViT(pos_embed="sincos", img_size=56, **SMALL).eval()
    sized.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 56, 56)
    torch.testing.assert_close(model(x), sized(x))


def test_set_input_size():
    model = timm.create_model("vitbnffn_mnist", **SMALL).eval()
    old_pos = model.pos_embed.detach().clone()
    model.set_input_size(img_size=(56, 42))
    assert model.num_tokens == 49 and model.config["img_size"] == (56, 42)
    assert model.pretrained_cfg["input_size"] == (1, 56, 42)
    assert resolve_data_config({}, model=model)["input_size"] == (1, 56, 42)
    expected = resample_abs_pos_embed(old_pos, [8, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[:, 0], old_pos[:, 0])  # the CLS token's is kept
    assert model(torch.rand(2, 1, 56, 42)).shape == (2, 10)
    assert isinstance(model.pos_embed, nn.Parameter)

    with pytest.raises(ValueError, match=r"patch_size=4 asked, the model has patch_size=7"):
        model.set_input_size(patch_size=4)
    with pytest.raises(ValueError, match=r"img_size \(30, 30\) is not divisible by patch_size 7"):
        model.set_input_size(img_size=30)


def test_pretrained_at_another_img_size_resamples_as_timm_does():
    shipped = read_state_dict(WEIGHTS_DIR / "vitbnffn_mnist.safetensors")
    model = timm.create_model("vitbnffn_mnist", pretrained=True, img_size=56).eval()
    expected = resample_abs_pos_embed(shipped["pos_embed"], [8, 8], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[:, 0], shipped["pos_embed"][:, 0])
    torch.testing.assert_close(model.blocks[0].ffn.fc1.weight, shipped["blocks.0.ffn.fc1.weight"])
    assert model.pretrained_cfg["input_size"] == (1, 56, 56)
    assert model(torch.rand(2, 1, 56, 56)).shape == (2, 10)


def test_pretrained_at_the_trained_size_is_unchanged():
    shipped = read_state_dict(WEIGHTS_DIR / "vitbnffn_mnist.safetensors")
    model = timm.create_model("vitbnffn_mnist", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.pool == "cls"


@pytest.mark.parametrize("pretrained", [False, True])
def test_input_size_follows_in_chans(pretrained):
    model = timm.create_model("vitbnffn_mnist", pretrained=pretrained, in_chans=3).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 28, 28) and cfg["mean"] == (0.0,) * 3 and cfg["std"] == (1.0,) * 3
    assert model(torch.rand(2, *cfg["input_size"])).shape == (2, 10)
    assert timm.get_pretrained_cfg_value("vitbnffn_mnist", "input_size") == (1, 28, 28)  # the registry's is kept


def test_input_size_follows_in_chans_down_to_one():
    model = timm.create_model("vitbnffn_cifar", in_chans=1, depth=1)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (1, 32, 32)
    assert cfg["mean"] == pytest.approx((sum((0.4914, 0.4822, 0.4465)) / 3,))


def test_features_only_cfg_follows_in_chans():
    extractor = timm.create_model("vitbnffn_mnist", in_chans=3, features_only=True, depth=2)
    assert extractor.pretrained_cfg["input_size"] == (3, 28, 28)


@pytest.mark.parametrize("name", ["timmvitln_mnist", "timmvitbnffn_mnist", "dnnbn_mnist"])
def test_input_size_follows_in_chans_on_the_other_families(name):
    model = timm.create_model(name, in_chans=3, depth=1)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 28, 28) and cfg["mean"] == (0.0,) * 3
    assert model(torch.rand(2, *cfg["input_size"])).shape == (2, 10)
