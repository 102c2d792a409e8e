"""timm's own `VisionTransformer` at the article's MNIST scale, with and without the BatchNorm FFN.

Importing `bnvit` registers two timm names, the models of the transfer study
(`examples/transfer.py`, docs/timm-blocks.md), which asks whether the article's effect holds in
timm's standard layout:

| name | blocks |
|---|---|
| `timmvitln_mnist` | timm's `Block` (LayerNorm before attention and before the MLP) |
| `timmvitbnffn_mnist` | `bnvit.BNFFNBlock` (LayerNorm before attention, BatchNorm inside the FFN) |

Their names before the `<family>_<size>` scheme (`bnvit.weights.names`), `timmvit_mnist` and
`timmvit_bnffn_mnist`, still build them, with timm's warning for a renamed model.

Both are timm's `VisionTransformer` with the article's sizes where timm's layout allows them:
28x28x1 input, patch 7 (16 patches and a class token), width 64, 4 heads, MLP ratio 2 (hidden
width 128), 10 classes, class-token pooling, a learned position embedding, no qkv bias, depth 6
unless `depth=` is given, timm's initialization. What differs from bnvit's `ViT` (`vitln_mnist`,
`vitbnffn_mnist`): each head is `64 / 4 = 16` wide (bnvit: 8 heads of 64, an attention 8x wider
than the tokens), the patches are embedded by timm's strided convolution without bnvit's
LayerNorms before and after it, and the weights start from timm's truncated-normal
initialization instead of PyTorch's defaults. Every timm argument can be given to override these.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..models.features import input_cfg
from ..weights.names import register_renamed
from .blocks import BNFFNBlock

__all__ = ["MNIST_ARGS", "timmvitbnffn_mnist", "timmvitln_mnist"]

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
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**MNIST_ARGS, **kwargs, "block_fn": blocks},
    )
    # the cfg describes the images the model takes (in_chans, img_size), for timm's data config
    vit = next(m for m in model.modules() if isinstance(m, VisionTransformer))
    fitted = input_cfg(vit.pretrained_cfg, vit.patch_embed.proj.in_channels, vit.patch_embed.img_size)
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


register_renamed(__name__)  # timmvit_mnist, timmvit_bnffn_mnist: their names before `<family>_<size>`
