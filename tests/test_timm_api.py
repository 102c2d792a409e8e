"""bnvit's models behave as timm's own: the intent of timm's tests/test_models.py, on every name.

timm's model tests (forward, backward, default_cfgs_non_std, forward_features with
`features_only=True`, forward_intermediates, torch.fx forward and backward) are re-stated here
for all 17 registered names; TorchScript is not supported (see docs/timm.md). To keep the run
short every ViT is built at depth 2 and the 224x224 ones at 64x64 (a 4x4 grid): the widths of
ViT-Ti/S/B stay, the block count and the token count shrink. Sharing weights the timm way
(`save_for_hf` -> `local-dir:` / `hf-hub:`), input-channel adaptation and the shipped-weights
mechanism are tested offline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import timm
import torch
from timm.models import FeatureInfo, save_for_hf
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import bnvit
from bnvit import MLP, ViT
from bnvit.models.vit import ViTConfig
from bnvit.timm import registry as bnvit_registry
from bnvit.weights import loading as bnvit_loading

VITS = sorted(n for n in timm.list_models(module="registry") if n.startswith("vit"))
MLPS = sorted(n for n in timm.list_models(module="registry") if n.startswith("dnn"))
ALL = VITS + MLPS
BIG = {n for n in VITS if n.endswith("_224")}


def small_args(name: str) -> dict:
    """Keyword arguments that make `name` cheap to run: depth 2, and 64x64 inputs for the 224 models."""
    if name in MLPS:
        return {}
    return dict(depth=2, img_size=64) if name in BIG else dict(depth=2)


def build(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **{**small_args(name), **kwargs})


def images(model: nn.Module, batch: int) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = model.config
    return torch.randn(batch, cfg["in_chans"], *cfg["img_size"])


def test_the_names_are_the_17_of_bnvit():
    assert len(VITS) == 15 and MLPS == ["dnn_mnist", "dnnbn_mnist"]


# ---------------------------------------------------------------------------- timm's model tests


@pytest.mark.parametrize("name", ALL)
def test_forward_and_grad_checkpointing(name):
    model = build(name).eval()
    x = images(model, 1)
    out = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
    model.set_grad_checkpointing() if hasattr(model, "set_grad_checkpointing") else None
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    model = build(name, num_classes=42).train()
    out = model(images(model, 2))
    out.mean().backward()
    assert out.shape[-1] == 42
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ALL)
def test_default_cfgs_non_std(name):
    model = build(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.pretrained_cfg
    x = images(model, 1)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape[-1 if feats.ndim == 3 else 1] == model.num_features
    assert pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre.shape
    torch.testing.assert_close(out, pre)
    assert build(name, num_classes=0).eval()(x).shape[-1] == model.num_features

    for key in ("classifier", "first_conv"):
        assert cfg[key] + ".weight" in state_dict, key


def _check_feature_maps(outputs, channels, reductions, x):
    assert len(outputs) == len(channels) == len(reductions)
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.ndim == 4 and o.shape[0] == x.shape[0] and o.shape[1] == c
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(name, feature_cls):
    extra = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = build(name, features_only=True, **extra).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    depth = model.model.cfg.depth if name in VITS else model.model.config["depth"]
    assert len(channels) == min(3, small_args(name).get("depth", 3)) == depth  # pruned to the blocks it needs
    x = images(model.model, 1)
    _check_feature_maps(model(x), channels, reductions, x)


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name):
    model = build(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = images(model, 2)
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    _check_feature_maps(intermediates, info.channels(), info.reduction(), x)
    torch.testing.assert_close(final, model.forward_features(x))
    model.set_grad_checkpointing() if hasattr(model, "set_grad_checkpointing") else None
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)

    nlc = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].ndim == 3 and nlc[0].shape[-1] == info.channels()[-1]
    torch.testing.assert_close(nlc[0].transpose(1, 2).reshape(intermediates[-1].shape), intermediates[-1])
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], intermediates[0])


@pytest.mark.parametrize("norm", ["ln", "bn_ffn", "bn"])
def test_vit_intermediates_split_off_the_cls_token(norm):
    model = ViT(depth=3, norm=norm, dim=16, heads=2, dim_head=8, mlp_dim=32).eval()
    x = torch.rand(2, 1, 28, 28)
    pairs = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, norm=True, intermediates_only=True)
    tokens = model.forward_features(x)
    patches, cls = pairs[-1]
    assert cls.shape == (2, 1, 16) and patches.shape == (2, 16, 4, 4)
    torch.testing.assert_close(cls[:, 0], tokens[:, 0])
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), tokens[:, 1:])
    with pytest.raises(ValueError, match=r"'NHWC'.*'NCHW', 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def _fx_model(model: nn.Module, train: bool) -> nn.Module:
    """The last node of the traced graph as a feature extractor, as timm's fx tests build it."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]])


@pytest.mark.parametrize("name", ALL)
def test_fx_forward(name):
    model = build(name).eval()
    x = images(model, 1)
    with torch.inference_mode():
        expected = model(x)
        traced = _fx_model(model, train=False)
        (out,) = traced(x).values()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ALL)
def test_fx_backward(name):
    model = build(name, num_classes=42).train()
    traced = _fx_model(model, train=True)
    (out,) = traced(images(model, 2)).values()
    out.mean().backward()
    assert out.shape[-1] == 42
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", VITS)
def test_torchvision_feature_extractor_on_every_vit(name):
    model = build(name).eval()
    x = images(model, 2)
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "first", "blocks.1": "last", "norm": "out"})
    feats = extractor(x)
    blocks = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    for key, (patches, cls) in zip(("first", "last"), blocks, strict=True):
        torch.testing.assert_close(feats[key], torch.cat([cls, patches], dim=1))
    torch.testing.assert_close(feats["out"], model.forward_features(x))


def test_traced_models_keep_the_input_check():
    for model in (ViT(depth=1).eval(), MLP().eval()):
        traced = torch.fx.symbolic_trace(model)
        with pytest.raises(ValueError, match="expected"):
            traced(torch.rand(2, 1, 20, 20))


@pytest.mark.parametrize(("out_indices", "valid"), [(7, "1..6"), ([0, 6], "0..5"), ([-7], "-6..-1")])
def test_features_only_with_out_indices_out_of_range(out_indices, valid):
    with pytest.raises(ValueError, match=rf"vitbnffn_mnist: bad out_indices.*6 blocks.*{re.escape(valid)}") as info:
        timm.create_model("vitbnffn_mnist", features_only=True, out_indices=out_indices)
    assert "AssertionError" not in str(info.value)
    with pytest.raises(ValueError, match=r"dnn_mnist: bad out_indices.*3 blocks"):
        timm.create_model("dnn_mnist", features_only=True, out_indices=[3])


def test_prune_intermediate_layers_keeps_what_features_need():
    model = ViT(depth=4, dim=16, heads=2, dim_head=8, mlp_dim=32).eval()
    x = torch.rand(2, 1, 28, 28)
    expected = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.blocks) == 2 == model.config["depth"] and model.num_classes == 0
    torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True), expected)


# ---------------------------------------------------------------------------- sharing weights


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("name", ["vitbnffn_mnist", "vitbn_cifar", "dnnbn_mnist"])
@pytest.mark.parametrize("safe", [True, False])
def test_save_for_hf_then_local_dir_round_trip(name, safe, tmp_path):
    extra = dict(depth=2, qkv_bias=True, pool="mean") if name in VITS else dict(depth=2, hidden=32)
    model = timm.create_model(name, **extra).eval()
    save_for_hf(model, tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == name and config["model_args"]["depth"] == 2
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert _same_outputs(model, loaded, images(model, 3))


def test_builder_records_what_it_read_from_the_weights(tmp_path, reference_checkpoints):
    model = timm.create_model(
        "vitbnffn_mnist",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(reference_checkpoints / "VITBNFFN_d5_15.pth")),
    )
    read = dict(depth=5, qkv_bias=False, pos_embed="learn")
    assert model.pretrained_model_args == read and read.items() <= model._model_args.items()
    save_for_hf(model, tmp_path, safe_serialization=True)
    assert read.items() <= json.loads((tmp_path / "config.json").read_text())["model_args"].items()
    again = timm.create_model(f"local-dir:{tmp_path}")  # architecture from config.json alone
    assert again.config["depth"] == 5
    assert _same_outputs(model, timm.create_model(f"local-dir:{tmp_path}", pretrained=True), torch.rand(2, 1, 28, 28))


def test_hf_hub_names_load_through_timms_hub_code(tmp_path, monkeypatch):
    """An `hf-hub:` name runs timm's own hub code; only the download is served from a folder."""
    from huggingface_hub.errors import EntryNotFoundError

    model = timm.create_model("vitbn_mnist", depth=2).eval()
    save_for_hf(model, tmp_path, safe_serialization="both")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        path = tmp_path / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)
    loaded = timm.create_model("hf-hub:someone/vitbn-mnist", pretrained=True)
    assert _same_outputs(model, loaded, torch.rand(2, 1, 28, 28))
    assert ("someone/vitbn-mnist", "config.json") in asked
    assert ("someone/vitbn-mnist", "model.safetensors") in asked  # safetensors first, as timm prefers


def test_local_dir_without_weights_says_what_it_expected(tmp_path):
    save_for_hf(timm.create_model("vitln_mnist", depth=1), tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected one of model\.safetensors"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_weights_of_another_architecture_name_the_difference(tmp_path):
    save_for_hf(timm.create_model("vitbnffn_mnist", depth=2), tmp_path, safe_serialization=True)
    file = str(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm='bn_ffn'.*vitbn_mnist builds norm='bn'"):
        timm.create_model("vitbn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=file))
    with pytest.raises(ValueError, match=r"dim: checkpoint 64, model 32"):
        timm.create_model("vitbnffn_mnist", pretrained=True, dim=32, pretrained_cfg_overlay=dict(file=file))
    with pytest.raises(ValueError, match=r"depth=3 was asked, the checkpoint has depth=2"):
        timm.create_model("vitbnffn_mnist", pretrained=True, depth=3, pretrained_cfg_overlay=dict(file=file))


@pytest.mark.parametrize("name", ["vitln_mnist", "vitbn_mnist"])
def test_one_channel_weights_on_three_channels_are_exact_for_gray_images(name, tmp_path):
    model = timm.create_model(name, depth=2).eval()
    save_for_hf(model, tmp_path, safe_serialization=True)
    rgb = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, in_chans=3).eval()
    assert rgb.in_chans == 3 and rgb.patch_embed.proj.in_features == 147
    gray = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(rgb(gray.expand(-1, 3, -1, -1)), model(gray), atol=1e-5, rtol=0)


def test_three_channel_weights_on_one_channel(tmp_path):
    model = timm.create_model("vitbnffn_cifar", depth=1).eval()
    save_for_hf(model, tmp_path, safe_serialization=True)
    gray = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, in_chans=1).eval()
    assert gray.patch_embed.proj.in_features == 16
    proj = model.patch_embed.proj.weight.reshape(64, 4, 4, 3)
    torch.testing.assert_close(gray.patch_embed.proj.weight, proj.sum(-1).reshape(64, 16))  # timm's rule: summed
    assert torch.isfinite(gray(torch.rand(2, 1, 32, 32))).all()


def test_shipped_weights_load_offline_from_the_package_folder(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(bnvit_loading, "WEIGHTS_DIR", tmp_path)
    assert timm.get_pretrained_cfg("vitbnffn_mnist").tag == bnvit_registry.SHIPPED_TAG
    with pytest.raises(ValueError, match=r"vitbnffn_mnist\.bnvit_mnist are not shipped in this build.*file=PATH"):
        timm.create_model("vitbnffn_mnist", pretrained=True)
    trained = timm.create_model("vitbnffn_mnist", depth=3).eval()
    save_file(trained.state_dict(), str(tmp_path / "vitbnffn_mnist.safetensors"))
    shipped = timm.create_model("vitbnffn_mnist.bnvit_mnist", pretrained=True)
    assert shipped.config["depth"] == 3 and shipped.pretrained_cfg["tag"] == "bnvit_mnist"
    assert _same_outputs(trained, shipped, torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("name", ["vitbnffn_mnist", "dnnbn_mnist"])
def test_pretrained_weights_are_read_once(name, tmp_path, monkeypatch):
    """The builder reads the weights for the architecture they hold; timm loads that same state dict."""
    trained = timm.create_model(name, depth=2).eval()
    path = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), path)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kw: reads.append(f) or load(f, *args, **kw))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert [str(f) for f in reads] == [str(path)]
    assert _same_outputs(trained, model, torch.rand(2, 1, 28, 28))
    assert model.pretrained_cfg["file"] == str(path) and "state_dict" not in model.pretrained_cfg
    assert "source" not in model.pretrained_cfg


def test_local_dir_weights_are_read_once(tmp_path, monkeypatch):
    trained = timm.create_model("vitbnffn_mnist", depth=2).eval()
    save_for_hf(trained, tmp_path, safe_serialization=True)

    def second_read(path, *args, **kwargs):
        raise AssertionError(f"timm read {path} a second time")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_path", second_read)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert _same_outputs(trained, model, torch.rand(2, 1, 28, 28))
    assert model.pretrained_cfg["source"] == "local-dir" and "state_dict" not in model.pretrained_cfg
    features = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True)
    cfgs = [m.pretrained_cfg for m in features.modules() if hasattr(m, "pretrained_cfg")]
    assert len(cfgs) == 2 and not any("state_dict" in cfg for cfg in cfgs)  # the wrapper and the model it wraps


def test_shipped_weights_live_inside_the_package():
    cfg = timm.get_pretrained_cfg("vitln_mnist")
    assert cfg.file.endswith("bnvit/weights/vitln_mnist.safetensors") and cfg.has_weights


# ---------------------------------------------------------------------------- the model layer


def test_vit_config_is_the_single_source_of_settings():
    model = ViT(depth=2, norm="bn_ffn", dim=16, heads=2, dim_head=8, mlp_dim=32)
    assert isinstance(model.cfg, ViTConfig) and model.config == dataclasses.asdict(model.cfg)
    assert not {"norm_kind", "_pool"} & set(vars(model))
    assert ViT(model.cfg).config == model.config == ViT(**model.config).config
    model.reset_classifier(3, global_pool="avg")
    assert model.cfg.pool == model.pool == "avg" and model.cfg.num_classes == model.num_classes == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.cfg.depth = 3


def test_vit_config_rejects_unknown_arguments():
    with pytest.raises(TypeError, match=r"unknown ViT argument\(s\) dpeth; valid ones: img_size, .*depth"):
        ViT(dpeth=3)
    with pytest.raises(ValueError, match=r"depth must be an int >= 1, got 0"):
        ViTConfig(depth=0)


def test_fold_batchnorm_calls_each_modules_fuse():
    model = bnvit.ViTBN(depth=2, dim=16, heads=2, dim_head=8, mlp_dim=32).eval()
    x = torch.rand(3, 1, 28, 28)
    expected = model(x)
    folded = bnvit.fold_batchnorm(model)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in folded.modules())
    assert (folded(x) - expected).abs().max() <= 1e-5
    block = folded.blocks[0]
    for module in (block.ffn, block.attn, folded.patch_embed, folded):
        assert callable(module.fuse)
