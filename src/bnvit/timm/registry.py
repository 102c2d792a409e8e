"""timm entry points and pretrained configs of bnvit's ViT and the article's MLPs (docs/timm.md lists them).

`import bnvit` registers them; with `pretrained=True` a builder reads the weights first and builds
what they hold. `vitln_mnist` and `vitbnffn_mnist` default to weights shipped in the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..models.dnn import MLP
from ..models.vit import ViT
from ..weights.convert import checkpoint_filter_fn, describe_state_dict, raise_on_contradictions
from ..weights.loading import SHIPPED, SHIPPED_TAG, shipped_cfg
from ..weights.names import register_renamed
from .builder import MNIST_INPUT, build_with_weights, pretrained_cfg

__all__: list[str] = []  # entry points only: build them with timm.create_model(name)

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
_SHORT = {"tiny": "ti", "small": "s", "base": "b"}  # ViT-Ti/16, ViT-S/16, ViT-B/16, as the papers write them
_PREFIX_NORM = {"vitln": "ln", "vitbnffn": "bn_ffn", "vitbn": "bn"}

_MNIST_CFG = pretrained_cfg(first_conv="patch_embed.proj", **MNIST_INPUT)
_CIFAR_CFG = pretrained_cfg(
    first_conv="patch_embed.proj",
    input_size=(3, 32, 32),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
_IMAGENET_CFG = pretrained_cfg(
    first_conv="patch_embed.proj",
    input_size=(3, 224, 224),
    num_classes=1000,
    interpolation="bicubic",
    crop_pct=0.9,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
)

default_cfgs = generate_default_cfgs(
    {
        **{f"{name}.{SHIPPED_TAG}": shipped_cfg(name, _MNIST_CFG) for name in SHIPPED},
        **{
            f"{prefix}_mnist": _MNIST_CFG
            for prefix in ("vitln", "vitbnffn", "vitbn")
            if f"{prefix}_mnist" not in SHIPPED
        },
        **{f"{prefix}_cifar": _CIFAR_CFG for prefix in ("vitln", "vitbnffn", "vitbn")},
        **{name: pretrained_cfg(first_conv="layers.0", **MNIST_INPUT) for name in ("dnn_mnist", "dnnbn_mnist")},
        **{
            f"{prefix}_{_SHORT[width]}16_224": _IMAGENET_CFG
            for prefix in ("vitln", "vitbnffn", "vitbn")
            for width in _IMAGENET_WIDTHS
        },
    }
)


def _args_from_weights(
    state_dict: dict[str, torch.Tensor],
    source: str,
    variant: str,
    defaults: Mapping[str, Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """Depth, qkv bias and positional embedding of the weights `pretrained=True` loads, checked."""
    found = describe_state_dict(checkpoint_filter_fn(state_dict))
    if found["norm"] != defaults["norm"]:
        builders = [f"{p}_*" for p, n in _PREFIX_NORM.items() if n == found["norm"]]
        raise ValueError(
            f"{source} holds a norm={found['norm']!r} model, but {variant} builds "
            f"norm={defaults['norm']!r}; use a {' / '.join(builders)} builder"
        )
    from_weights = dict(depth=found["depth"], qkv_bias=found["qkv_bias"], pos_embed=found["pos_embed"])
    raise_on_contradictions(from_weights, kwargs, source)
    return from_weights


def _create_vit(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> ViT:
    if "global_pool" in kwargs and "pool" not in kwargs:  # timm's name for the pooling
        kwargs["pool"] = kwargs.pop("global_pool")
    return build_with_weights(
        ViT,
        variant,
        pretrained,
        defaults,
        kwargs,
        infer=_args_from_weights,
        num_blocks=lambda args: args["depth"],
        pretrained_filter_fn=checkpoint_filter_fn,
    )


@register_model
def vitln_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViT (LayerNorm) for 28x28 MNIST; depth 6 unless `depth=` is given (formerly `vit_mnist`)."""
    return _create_vit("vitln_mnist", pretrained, dict(_MNIST, norm="ln"), **kwargs)


@register_model
def vitbnffn_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBNFFN for 28x28 MNIST; depth 6 unless `depth=` is given."""
    return _create_vit("vitbnffn_mnist", pretrained, dict(_MNIST, norm="bn_ffn"), **kwargs)


@register_model
def vitbn_mnist(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViTBN (BatchNorm everywhere) for 28x28 MNIST; depth 6 unless `depth=` is given."""
    return _create_vit("vitbn_mnist", pretrained, dict(_MNIST, norm="bn"), **kwargs)


@register_model
def vitln_cifar(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The article's ViT configuration (LayerNorm) for 32x32x3 inputs, patch 4 (formerly `vit_cifar`)."""
    return _create_vit("vitln_cifar", pretrained, dict(_CIFAR, norm="ln"), **kwargs)


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
def vitln_ti16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 (dim 192, 3 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_ti16_224", pretrained, _imagenet("tiny", "ln"), **kwargs)


@register_model
def vitln_s16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 (dim 384, 6 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_s16_224", pretrained, _imagenet("small", "ln"), **kwargs)


@register_model
def vitln_b16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 (dim 768, 12 heads) with LayerNorm, in bnvit's architecture."""
    return _create_vit("vitln_b16_224", pretrained, _imagenet("base", "ln"), **kwargs)


@register_model
def vitbnffn_ti16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_ti16_224", pretrained, _imagenet("tiny", "bn_ffn"), **kwargs)


@register_model
def vitbnffn_s16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_s16_224", pretrained, _imagenet("small", "bn_ffn"), **kwargs)


@register_model
def vitbnffn_b16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 with a BatchNorm in every FFN."""
    return _create_vit("vitbnffn_b16_224", pretrained, _imagenet("base", "bn_ffn"), **kwargs)


@register_model
def vitbn_ti16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Ti/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_ti16_224", pretrained, _imagenet("tiny", "bn"), **kwargs)


@register_model
def vitbn_s16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-S/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_s16_224", pretrained, _imagenet("small", "bn"), **kwargs)


@register_model
def vitbn_b16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-B/16 with BatchNorm in place of every LayerNorm."""
    return _create_vit("vitbn_b16_224", pretrained, _imagenet("base", "bn"), **kwargs)


# The article's MLPs (`bnvit.models.dnn`).


def _mlp_args_from_weights(
    state_dict: dict[str, torch.Tensor],
    source: str,
    variant: str,
    defaults: Mapping[str, Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """Depth and width of the MLP weights `pretrained=True` loads."""
    linears = sorted(int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and k.endswith(".weight"))
    has_bn = any(k.endswith(".running_mean") for k in state_dict)
    if has_bn != (defaults["norm"] == "bn"):
        raise ValueError(f"{source} holds an MLP {'with' if has_bn else 'without'} BatchNorm; {variant} does not")
    weights = [state_dict[f"layers.{i}.weight"] for i in linears if state_dict[f"layers.{i}.weight"].ndim == 2]
    depth = len(weights) - (0 if "head.weight" in state_dict else 1)  # old layout: the head is the last Linear
    return dict(depth=depth, hidden=int(weights[0].shape[0]))


def _create_mlp(variant: str, pretrained: bool, norm: str | None, **kwargs: Any) -> MLP:
    return build_with_weights(
        MLP,
        variant,
        pretrained,
        dict(norm=norm),
        kwargs,
        infer=_mlp_args_from_weights,
        num_blocks=lambda args: args.get("depth", 3),
    )


@register_model
def dnn_mnist(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The article's DNN_d3: 3 hidden layers of 100 sigmoid units (`depth=` to change)."""
    return _create_mlp("dnn_mnist", pretrained, None, **kwargs)


@register_model
def dnnbn_mnist(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The article's DNNBN_d3: DNN_d3 with a BatchNorm before each sigmoid."""
    return _create_mlp("dnnbn_mnist", pretrained, "bn", **kwargs)


register_renamed(__name__)  # vit_mnist, vit_cifar: the names of vitln_mnist, vitln_cifar before `<family>_<size>`
