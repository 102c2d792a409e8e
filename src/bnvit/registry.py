"""timm builders, pretrained configs and the reference-checkpoint converter.

Importing `bnvit` registers these names in timm's model registry:

| name                             | input     | patch | norm     |
|----------------------------------|-----------|-------|----------|
| `vit_mnist`                      | 1x28x28   | 7     | `ln`     |
| `vitbnffn_mnist`                 | 1x28x28   | 7     | `bn_ffn` |
| `vitbn_mnist`                    | 1x28x28   | 7     | `bn`     |
| `vit_cifar`, `vitbnffn_cifar`, `vitbn_cifar` | 3x32x32 | 4 | as named |
| `vitln_{tiny,small,base}_patch16_224`, `vitbnffn_...`, `vitbn_...` | 3x224x224 | 16 | as named |

The MNIST and CIFAR builders use the article's configuration (dim 64, 8 heads of width 64,
MLP width 128, depth 6 unless `depth=` is given) and its initialization. The ImageNet-size
twins use the usual ViT-Ti/S/B widths, qkv bias and timm-style initialization; the LayerNorm
twin is called `vitln_*` because `vit_*_patch16_224` are timm's own models.

The article's reference checkpoints load with
`timm.create_model("vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`
or with `load_model(PATH)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .vit import ViT

__all__ = ["checkpoint_filter_fn", "describe_state_dict", "load_model", "read_state_dict"]

_ARTICLE = dict(dim=64, heads=8, dim_head=64, mlp_dim=128, depth=6, pool="cls", pos_embed="learn", qkv_bias=False)
_MNIST = dict(_ARTICLE, img_size=28, patch_size=7, in_chans=1, num_classes=10)
_CIFAR = dict(_ARTICLE, img_size=32, patch_size=4, in_chans=3, num_classes=10)
_IMAGENET = dict(
    img_size=224, patch_size=16, in_chans=3, num_classes=1000, depth=12, dim_head=64, qkv_bias=True, weight_init="timm"
)
_IMAGENET_WIDTHS = {
    "tiny": dict(dim=192, heads=3, mlp_dim=768),
    "small": dict(dim=384, heads=6, mlp_dim=1536),
    "base": dict(dim=768, heads=12, mlp_dim=3072),
}
_PREFIX_NORM = {"vit": "ln", "vitln": "ln", "vitbnffn": "bn_ffn", "vitbn": "bn"}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    defaults = dict(
        num_classes=10,
        interpolation="bilinear",
        crop_pct=1.0,
        fixed_input_size=True,
        classifier="head",
        paper_name="Vision Transformer with BatchNorm",
        license="mit",
    )
    return {**defaults, **kwargs}


_MNIST_CFG = _cfg(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,))
_CIFAR_CFG = _cfg(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
_IMAGENET_CFG = _cfg(
    input_size=(3, 224, 224),
    num_classes=1000,
    interpolation="bicubic",
    crop_pct=0.9,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
)

default_cfgs = generate_default_cfgs(
    {
        **{f"{prefix}_mnist": _MNIST_CFG for prefix in ("vit", "vitbnffn", "vitbn")},
        **{f"{prefix}_cifar": _CIFAR_CFG for prefix in ("vit", "vitbnffn", "vitbn")},
        **{
            f"{prefix}_{width}_patch16_224": _IMAGENET_CFG
            for prefix in ("vitln", "vitbnffn", "vitbn")
            for width in _IMAGENET_WIDTHS
        },
    }
)

# ---------------------------------------------------------------------------- checkpoints

# The reference repository's keys -> bnvit's keys (see docs/checkpoints.md).
_REFERENCE_KEYS = [
    (r"^pos_embedding(_random)?$", "pos_embed"),
    (r"^to_patch_embedding\.1\.", "patch_embed.pre_norm."),
    (r"^to_patch_embedding\.2\.", "patch_embed.proj."),
    (r"^to_patch_embedding\.3\.", "patch_embed.norm."),
    (r"^transformer\.norm\.", "norm."),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.attn.norm."),
    (r"^transformer\.layers\.(\d+)\.0\.(patch_emb|to_qkv)\.", r"blocks.\1.attn.qkv."),
    (r"^transformer\.layers\.(\d+)\.0\.(out_proj|to_out)\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.layers\.(\d+)\.1\.Lin1\.", r"blocks.\1.ffn.fc1."),
    (r"^transformer\.layers\.(\d+)\.1\.BN\.", r"blocks.\1.ffn.norm."),
    (r"^transformer\.layers\.(\d+)\.1\.Lin2\.", r"blocks.\1.ffn.fc2."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.0\.", r"blocks.\1.ffn.norm."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.1\.", r"blocks.\1.ffn.fc1."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.4\.", r"blocks.\1.ffn.fc2."),
    (r"^(linear_head|mlp_head)\.", "head."),
]
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _is_reference_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("to_patch_embedding.", "transformer.")) for k in state_dict)


def _convert_reference(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = key
        for pattern, replacement in _REFERENCE_KEYS:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        else:
            if key != "cls_token":
                unknown.append(key)
        out[new] = value
    if unknown:
        raise ValueError(f"unrecognized keys in a reference-layout checkpoint: {unknown[:8]}")
    return _nest_batchnorm(out)


def _nest_batchnorm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move `X.weight`, `X.running_mean`, ... of every BatchNorm `X` to `X.bn.*` (`TokenBatchNorm`)."""
    bn_prefixes = {k[: -len(b)] for k in state_dict for b in _BN_BUFFERS if k.endswith("." + b)}
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix + "." in bn_prefixes and not prefix.endswith(".bn"):
            key = f"{prefix}.bn.{leaf}"
        out[key] = value
    return out


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop `module.` (DDP) and `_orig_mod.` (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ViT | None = None) -> dict[str, Any]:
    """Convert a state dict to bnvit's layout (timm's `pretrained_filter_fn` protocol).

    Accepts the article's reference layout (`to_patch_embedding.*`, `transformer.layers.*`,
    `linear_head` / `mlp_head`), bnvit's own layout, and either wrapped by DDP (`module.`) or
    `torch.compile` (`_orig_mod.`). With a `model`, the result is checked against it and a
    mismatch (model kind, depth, widths, qkv bias) raises `ValueError` listing every
    difference; a different number of classes is left for timm to adapt.

    Args:
        state_dict: The loaded state dict.
        model: The model it is for (optional).

    Returns:
        The state dict in bnvit's layout.

    Examples:
        >>> sd = {"transformer.layers.0.1.Lin1.weight": torch.zeros(128, 64)}
        >>> list(checkpoint_filter_fn(sd))
        ['blocks.0.ffn.fc1.weight']
    """
    state_dict = _strip_wrappers(state_dict)
    if _is_reference_layout(state_dict):
        state_dict = _convert_reference(state_dict)
    if model is not None:
        _check_compatible(state_dict, model)
    return state_dict


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer a `ViT` configuration from a state dict in bnvit's layout.

    Infers `norm`, `depth`, `qkv_bias`, `dim`, `mlp_dim`, `num_classes`, `pos_embed`, the
    attention width `heads * dim_head` (as `attn_width`), the patch length `patch_dim` and
    the number of tokens. The split of `attn_width` into heads is not stored in a state dict.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> info = describe_state_dict(ViTBNFFN(depth=3).state_dict())
        >>> info["norm"], info["depth"], info["qkv_bias"]
        ('bn_ffn', 3, False)
    """
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a bnvit ViT state dict: missing {missing}")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if "blocks.0.attn.norm.bn.weight" in state_dict:
        norm = "bn"
    elif "blocks.0.ffn.norm.bn.weight" in state_dict:
        norm = "bn_ffn"
    else:
        norm = "ln"
    qkv = state_dict["blocks.0.attn.qkv.weight"]
    proj = state_dict["patch_embed.proj.weight"]
    head = state_dict.get("head.weight")
    return dict(
        norm=norm,
        depth=max(blocks) + 1,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        dim=int(state_dict["cls_token"].shape[-1]),
        attn_width=int(qkv.shape[0]) // 3,
        mlp_dim=int(state_dict["blocks.0.ffn.fc1.weight"].shape[0]),
        num_classes=0 if head is None else int(head.shape[0]),
        pos_embed="learn" if "pos_embed" in state_dict else "sincos",
        patch_dim=int(proj.shape[1]),
        num_tokens=int(state_dict["pos_embed"].shape[1]) if "pos_embed" in state_dict else None,
    )


def _describe_model(model: ViT) -> dict[str, Any]:
    c = model.config
    return dict(
        norm=c["norm"],
        depth=c["depth"],
        qkv_bias=c["qkv_bias"],
        dim=c["dim"],
        attn_width=c["heads"] * c["dim_head"],
        mlp_dim=c["mlp_dim"],
        num_classes=c["num_classes"],
        pos_embed=c["pos_embed"],
        patch_dim=c["patch_size"] ** 2 * c["in_chans"],
        num_tokens=model.num_tokens if c["pos_embed"] == "learn" else None,
    )


def _check_compatible(state_dict: Mapping[str, torch.Tensor], model: ViT, source: str = "checkpoint") -> None:
    found, wanted = describe_state_dict(state_dict), _describe_model(model)
    diffs = [
        f"{key}: checkpoint {found[key]!r}, model {wanted[key]!r}"
        for key in found
        if key != "num_classes" and found[key] != wanted[key]
    ]
    if diffs:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(diffs))


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict safely (`weights_only=True`) from a checkpoint file.

    Accepts a bare state dict or a training checkpoint holding one under `"model"`,
    `"state_dict"` or `"model_state_dict"`. Never executes code from the file.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a readable PyTorch checkpoint of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler raises many kinds on foreign bytes
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint (weights only): {err}") from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **kwargs: Any) -> ViT:
    """Build the right `ViT` for a checkpoint and load it, in one call.

    Works with the article's reference checkpoints and with bnvit's own. Depth, norm, widths,
    qkv bias and input size are read from the file; `kwargs` are passed to `ViT` (for what a
    state dict does not record: `heads`, defaults to 8, `in_chans`, defaults to 1, `pool`) and
    must not contradict the file.

    Args:
        path: Checkpoint file.
        map_location: Where to load the tensors.
        **kwargs: Extra `ViT` arguments.

    Returns:
        The model, in eval mode.

    Examples:
        >>> model = load_model("../shared/checkpoints/reference/VITBNFFN_d5_15.pth")  # doctest: +SKIP
        >>> model.config["norm"], model.config["depth"]  # doctest: +SKIP
        ('bn_ffn', 5)
    """
    state_dict = checkpoint_filter_fn(read_state_dict(path, map_location))
    found = describe_state_dict(state_dict)
    config = _config_from(found, kwargs, source=os.fspath(path))
    model = ViT(**config)
    _check_compatible(state_dict, model, source=os.fspath(path))
    if found["num_classes"] != config["num_classes"]:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    model.load_state_dict(state_dict, strict=found["num_classes"] == config["num_classes"])
    return model.to(map_location).eval()


def _config_from(found: dict[str, Any], asked: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A full `ViT` config from what a checkpoint holds, checked against what was asked."""
    heads = asked.get("heads", 8)
    in_chans = asked.get("in_chans", 1)
    patch = round((found["patch_dim"] / in_chans) ** 0.5)
    if patch * patch * in_chans != found["patch_dim"]:
        raise ValueError(f"{source}: a patch of {found['patch_dim']} values does not fit in_chans={in_chans}")
    if found["attn_width"] % heads:
        raise ValueError(f"{source}: attention width {found['attn_width']} is not divisible by heads={heads}")
    inferred = dict(
        norm=found["norm"],
        depth=found["depth"],
        qkv_bias=found["qkv_bias"],
        dim=found["dim"],
        heads=heads,
        dim_head=found["attn_width"] // heads,
        mlp_dim=found["mlp_dim"],
        num_classes=found["num_classes"],
        pos_embed=found["pos_embed"],
        patch_size=patch,
        in_chans=in_chans,
    )
    num_patches = found["num_tokens"] - 1 if found["num_tokens"] else None
    if num_patches is not None and "img_size" not in asked:
        side = round(num_patches**0.5)
        if side * side != num_patches:
            raise ValueError(f"{source}: {num_patches} patches do not form a square image; pass img_size=(h, w)")
        inferred["img_size"] = side * patch
    _raise_on_contradictions(inferred, asked, source, ignore=("num_classes",))
    return {**inferred, **asked}


def _raise_on_contradictions(inferred: Mapping[str, Any], asked: Mapping[str, Any], source: str, ignore=()) -> None:
    clashes = [
        f"{key}={asked[key]!r} was asked, the checkpoint has {key}={value!r}"
        for key, value in inferred.items()
        if key in asked and key not in ignore and _normalized(key, asked[key]) != _normalized(key, value)
    ]
    if clashes:
        raise ValueError(f"{source} contradicts the requested model:\n  " + "\n  ".join(clashes))


def _normalized(key: str, value: Any) -> Any:
    if key == "img_size" and isinstance(value, int):
        return (value, value)
    if key == "img_size" and isinstance(value, list):
        return tuple(value)
    return value


# ---------------------------------------------------------------------------- builders


def _create_vit(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> ViT:
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant} does not support features_only; use forward_features() instead")
    model_args = {**defaults}
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not cfg.has_weights and cfg.state_dict is None:
            raise ValueError(
                f"no published weights for {variant}; load a file with "
                f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
            )
        if cfg.file:
            found = describe_state_dict(checkpoint_filter_fn(read_state_dict(cfg.file)))
            if found["norm"] != defaults["norm"]:
                builders = [f"{p}_*" for p, n in _PREFIX_NORM.items() if n == found["norm"]]
                raise ValueError(
                    f"{cfg.file} holds a norm={found['norm']!r} model, but {variant} builds "
                    f"norm={defaults['norm']!r}; use a {' / '.join(builders)} builder"
                )
            from_file = dict(depth=found["depth"], qkv_bias=found["qkv_bias"], pos_embed=found["pos_embed"])
            _raise_on_contradictions(from_file, kwargs, cfg.file)
            model_args.update(from_file)
    model_args.update(kwargs)
    return build_model_with_cfg(ViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **model_args)


@register_model
def vit_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViT (LayerNorm) for 28x28 MNIST; depth 6 unless `depth=` is given."""
    return _create_vit("vit_mnist", pretrained, dict(_MNIST, norm="ln"), **kwargs)


@register_model
def vitbnffn_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBNFFN for 28x28 MNIST; depth 6 unless `depth=` is given."""
    return _create_vit("vitbnffn_mnist", pretrained, dict(_MNIST, norm="bn_ffn"), **kwargs)


@register_model
def vitbn_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBN (BatchNorm everywhere) for 28x28 MNIST; depth 6 unless `depth=` is given."""
    return _create_vit("vitbn_mnist", pretrained, dict(_MNIST, norm="bn"), **kwargs)


@register_model
def vit_cifar(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViT configuration (LayerNorm) for 32x32x3 inputs, patch 4."""
    return _create_vit("vit_cifar", pretrained, dict(_CIFAR, norm="ln"), **kwargs)


@register_model
def vitbnffn_cifar(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBNFFN configuration for 32x32x3 inputs, patch 4."""
    return _create_vit("vitbnffn_cifar", pretrained, dict(_CIFAR, norm="bn_ffn"), **kwargs)


@register_model
def vitbn_cifar(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBN configuration for 32x32x3 inputs, patch 4."""
    return _create_vit("vitbn_cifar", pretrained, dict(_CIFAR, norm="bn"), **kwargs)


def _imagenet(width: str, norm: str) -> dict[str, Any]:
    return dict(_IMAGENET, **_IMAGENET_WIDTHS[width], norm=norm)


@register_model
def vitln_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 (dim 192, 3 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_tiny_patch16_224", pretrained, _imagenet("tiny", "ln"), **kwargs)


@register_model
def vitln_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 (dim 384, 6 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_small_patch16_224", pretrained, _imagenet("small", "ln"), **kwargs)


@register_model
def vitln_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 (dim 768, 12 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_base_patch16_224", pretrained, _imagenet("base", "ln"), **kwargs)


@register_model
def vitbnffn_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_tiny_patch16_224", pretrained, _imagenet("tiny", "bn_ffn"), **kwargs)


@register_model
def vitbnffn_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_small_patch16_224", pretrained, _imagenet("small", "bn_ffn"), **kwargs)


@register_model
def vitbnffn_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_base_patch16_224", pretrained, _imagenet("base", "bn_ffn"), **kwargs)


@register_model
def vitbn_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_tiny_patch16_224", pretrained, _imagenet("tiny", "bn"), **kwargs)


@register_model
def vitbn_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_small_patch16_224", pretrained, _imagenet("small", "bn"), **kwargs)


@register_model
def vitbn_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_base_patch16_224", pretrained, _imagenet("base", "bn"), **kwargs)
