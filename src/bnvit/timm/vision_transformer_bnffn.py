"""`timmvitln_mnist`, `timmvitbnffn_mnist`: timm's `VisionTransformer` at the article's MNIST scale (docs/timm.md)."""

from __future__ import annotations

import functools
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..models.batchnorm import set_bn_hyperparameters
from ..weights.convert import ln_ffn_to_bn_ffn
from ..weights.names import register_renamed
from .blocks import BNFFNBlock
from .builder import MNIST_LABELS, fitted_cfg

__all__ = ["LN_TWINS", "MNIST_ARGS", "bn_ffn_filter_fn", "timmvitbnffn_mnist", "timmvitln_mnist"]

MNIST_ARGS: dict[str, Any] = dict(
    img_size=28,
    patch_size=7,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    qkv_bias=False,
    class_token=True,
    global_pool="token",
)
"""The `VisionTransformer` arguments both builders start from (keywords given to them replace these)."""

default_cfgs = generate_default_cfgs(
    {
        name: dict(
            input_size=(1, 28, 28),
            mean=(0.0,),
            std=(1.0,),
            num_classes=10,
            label_names=MNIST_LABELS,
            fixed_input_size=True,
            interpolation="bilinear",
            crop_pct=1.0,
            first_conv="patch_embed.proj",
            classifier="head",
            license="mit",
        )
        for name in ("timmvitln_mnist", "timmvitbnffn_mnist")
    }
)


def _create(variant: str, pretrained: bool, blocks: type, **kwargs: Any) -> VisionTransformer:
    if "block_fn" in kwargs:
        raise ValueError(
            f"{variant} fixes block_fn={blocks.__name__}; build timm's VisionTransformer to choose another"
        )
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not any(overlay.get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
        raise ValueError(
            f"{variant} ships no trained weights; build it with pretrained=False, or name yours with "
            "pretrained_cfg_overlay=dict(file=PATH)"
        )
    out_indices = kwargs.pop("out_indices", 3)
    bn = dict(momentum=kwargs.pop("bn_momentum", None), eps=kwargs.pop("bn_eps", None))
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**MNIST_ARGS, **kwargs, "block_fn": blocks},
    )
    set_bn_hyperparameters(model, **bn)  # timm's ViT does not take them; a LayerNorm model has no BatchNorm
    # the cfg describes the images the model takes (in_chans, img_size), for timm's data config
    vit = next(m for m in model.modules() if isinstance(m, VisionTransformer))
    config = dict(
        in_chans=vit.patch_embed.proj.in_channels,
        img_size=vit.patch_embed.img_size,
        num_classes=vit.num_classes,
        dynamic_img_size=vit.dynamic_img_size,
    )
    fitted = fitted_cfg(vit.pretrained_cfg, config)
    vit.pretrained_cfg = vit.default_cfg = fitted
    if model is not vit:
        model.pretrained_cfg = model.default_cfg = {
            **model.pretrained_cfg,
            **{k: fitted[k] for k in ("input_size", "mean", "std")},
        }
    return model


@register_model
def timmvitln_mnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's ViT at the article's MNIST scale, with timm's LayerNorm `Block`s; depth 6 unless `depth=` is given."""
    return _create("timmvitln_mnist", pretrained, Block, **kwargs)


@register_model
def timmvitbnffn_mnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """`timmvitln_mnist` with `bnvit.BNFFNBlock`s: the article's BatchNorm FFN in timm's layout."""
    return _create("timmvitbnffn_mnist", pretrained, BNFFNBlock, **kwargs)


# ---------------------------------------------------------------------------- timm's ViT and DeiT sizes

_TIMM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
LN_TWINS: dict[str, str] = {
    f"{family}_{size}_patch16_bnffn_224": f"{family}_{size}_patch16_224"
    for family in ("vit", "deit")
    for size in _TIMM_SIZES
}
"""Each registered BatchNorm-FFN name -> the timm LayerNorm model of the same architecture whose weights it loads."""


def _converted_cfgs(name: str, twin: str) -> dict[str, dict[str, Any]]:
    """`name`'s pretrained cfgs: one per pretrained tag of its LayerNorm twin, the same weights converted on load."""
    cfgs = {}
    default = f"{twin}.{get_pretrained_cfg(twin).tag}"  # timm's default tag first: it stays the default
    for tagged in [default, *(t for t in timm.list_pretrained(f"{twin}.*") if t != default)]:
        cfg = get_pretrained_cfg(tagged).to_dict()
        cfg.pop("architecture", None)
        cfg.pop("tag", None)
        notes = f"timm's LayerNorm weights {tagged} converted to the BatchNorm FFN on load (bnvit.ln_ffn_to_bn_ffn)"
        # the Hub's safetensors (hf_hub_id) are timm's state dicts: no url / custom .npz loader
        cfgs[f"{name}.{tagged.partition('.')[2]}"] = dict(
            cfg, url="", custom_load=False, notes=(notes,), paper_name="Vision Transformer with BatchNorm"
        )
    return cfgs


default_cfgs.update(
    generate_default_cfgs({k: v for name, twin in LN_TWINS.items() for k, v in _converted_cfgs(name, twin).items()})
)


def bn_ffn_filter_fn(
    state_dict: dict[str, Any], model: VisionTransformer, *, fold_norm: bool = True, **timm_filter: Any
) -> dict[str, Any]:
    """timm's `pretrained_filter_fn` for a ViT of `BNFFNBlock`s: LayerNorm weights converted, every key checked.

    Raises:
        ValueError: Keys missing, unexpected or of another shape (the first few named).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter_fn

    out = ln_ffn_to_bn_ffn(timm_filter_fn(state_dict, model, **timm_filter), fold_norm=fold_norm)
    classifier = tuple(f"{c}." for c in _as_tuple(model.pretrained_cfg.get("classifier", "head")))
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(classifier)}
    given = {k: v.shape for k, v in out.items() if not k.startswith(classifier)}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    both = sorted(own.keys() & given.keys())
    shapes = [f"{k} {tuple(given[k])} for {tuple(own[k])}" for k in both if own[k] != given[k]]
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
            if items
        ]
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ValueError(f"the weights do not fit {arch} ({'; '.join(parts)}); nothing was loaded")
    return out


def _as_tuple(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _create_timm_size(variant: str, pretrained: bool, size: str, deit: bool, **kwargs: Any) -> VisionTransformer:
    block_fn = kwargs.pop("block_fn", BNFFNBlock)
    if block_fn is not BNFFNBlock:
        raise ValueError(f"{variant} is built from bnvit.BNFFNBlock; got block_fn={block_fn!r}")
    out_indices = kwargs.pop("out_indices", 3)
    fold_norm = kwargs.pop("fold_norm", True)
    bn = dict(momentum=kwargs.pop("bn_momentum", None), eps=kwargs.pop("bn_eps", None))
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=functools.partial(bn_ffn_filter_fn, fold_norm=fold_norm, adapt_layer_scale=deit),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**_TIMM_SIZES[size], **kwargs, "block_fn": BNFFNBlock},
    )
    set_bn_hyperparameters(model, **bn)
    if getattr(model, "dynamic_img_size", False):  # it takes other sizes: say so to timm's data config
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "fixed_input_size": False}
    return model


@register_model
def vit_tiny_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `vit_tiny_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("vit_tiny_patch16_bnffn_224", pretrained, "tiny", False, **kwargs)


@register_model
def vit_small_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `vit_small_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("vit_small_patch16_bnffn_224", pretrained, "small", False, **kwargs)


@register_model
def vit_base_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `vit_base_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("vit_base_patch16_bnffn_224", pretrained, "base", False, **kwargs)


@register_model
def deit_tiny_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `deit_tiny_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("deit_tiny_patch16_bnffn_224", pretrained, "tiny", True, **kwargs)


@register_model
def deit_small_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `deit_small_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("deit_small_patch16_bnffn_224", pretrained, "small", True, **kwargs)


@register_model
def deit_base_patch16_bnffn_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `deit_base_patch16_224` with `bnvit.BNFFNBlock`s; `pretrained=True` converts its LayerNorm weights."""
    return _create_timm_size("deit_base_patch16_bnffn_224", pretrained, "base", True, **kwargs)


register_renamed(__name__)  # timmvit_mnist, timmvit_bnffn_mnist: their names before `<family>_<size>`
