"""The article's BatchNorm FFN inside timm's own Vision Transformers (docs/timm-blocks.md).

`BatchNormMlp` is the FFN with timm's `Mlp` signature, `BNFFNBlock` a `block_fn` for timm's
`VisionTransformer`, and `to_bn_ffn` converts an existing LayerNorm ViT in place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, get_act_layer
from timm.models.vision_transformer import ATTN_LAYERS, Block, VisionTransformer
from torch import nn

from .._util import checks as _checks
from ..models.batchnorm import TORCHSCRIPT_REFUSAL
from ..models.blocks import BatchNormFFN, EncoderBlock, FeedForward
from ..models.fold import fold_affine_before_linear
from ..models.vit import ViT

__all__ = ["BNFFNBlock", "BatchNormMlp", "name_bn_ffn", "to_bn_ffn"]


def _two(name: str, value: Any, check: Callable[[str, Any], Any]) -> tuple[Any, Any]:
    """`value` as a pair (timm's `to_2tuple`), each item checked."""
    first, second = value if isinstance(value, tuple | list) and len(value) == 2 else (value, value)
    return check(f"{name}[0]", first), check(f"{name}[1]", second)


def _name(layer: Any) -> str:
    """A layer argument as a message names it: `SwiGLU`, `partial(GluMlp)`."""
    if isinstance(layer, functools.partial):
        return f"partial({_name(layer.func)})"
    return getattr(layer, "__name__", repr(layer))


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


class BatchNormMlp(BatchNormFFN):
    """The article's BatchNorm FFN with the signature of timm's `Mlp`; a `bnvit.BatchNormFFN`, so it folds.

    Args:
        hidden_features: Hidden width (default: `in_features`).
        out_features: Output width (default: `in_features`).
        act_layer: A class called without arguments, or a name timm knows (`"gelu"`, ...).
        norm_layer: Must be `None`: the hidden norm is the BatchNorm.
        bias: For `fc1` and `fc2`, or a pair.
        drop: Dropout after the activation and after `fc2`, or a pair.
        use_conv: Must be `False`.

    Raises:
        ValueError: `norm_layer` given, `use_conv=True`, a width below 1 or a rate outside [0, 1).
        TypeError: A width, flag or rate of the wrong type.

    Examples:
        >>> mlp = BatchNormMlp(64, hidden_features=128)
        >>> mlp(torch.randn(2, 17, 64)).shape
        torch.Size([2, 17, 64])
        >>> [name for name, _ in mlp.named_children()]
        ['fc1', 'norm', 'act', 'drop1', 'fc2', 'drop2']
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | str = nn.GELU,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if norm_layer is not None:
            raise ValueError(
                f"BatchNormMlp normalizes its hidden features with its own BatchNorm; norm_layer must be None, "
                f"got {_name(norm_layer)} (timm's scale_mlp_norm=True asks for it)"
            )
        if use_conv:
            raise ValueError("BatchNormMlp works on (..., C) tokens; use_conv=True (NCHW maps) is not supported")
        in_features = _checks.positive_int("in_features", in_features)
        hidden = in_features if hidden_features is None else _checks.positive_int("hidden_features", hidden_features)
        out = in_features if out_features is None else _checks.positive_int("out_features", out_features)
        act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        if not callable(act):
            raise TypeError(f"act_layer must be an activation class or name, got {act_layer!r}")
        super().__init__(
            in_features,
            hidden,
            _two("drop", drop, _checks.rate),
            out_dim=out,
            bias=_two("bias", bias, _bool),
            act_layer=act,
            device=device,
            dtype=dtype,
        )


def _attention(attn_layer: Any, dim: int, depth: int, **kwargs: Any) -> nn.Module:
    """timm's attention as its `Block` builds it: a class or a name of `ATTN_LAYERS`; `depth` if it takes one."""
    if isinstance(attn_layer, str):
        if attn_layer not in ATTN_LAYERS:
            valid = ", ".join(repr(k) for k in ATTN_LAYERS)
            raise ValueError(f"unknown attn_layer {attn_layer!r}; valid names: {valid}, or an attention class")
        attn_layer = ATTN_LAYERS[attn_layer]
    if not callable(attn_layer):
        raise TypeError(f"attn_layer must be an attention class or name, got {attn_layer!r}")
    if "depth" in inspect.signature(attn_layer).parameters:
        kwargs["depth"] = depth
    return attn_layer(dim, **kwargs)


def _mlp_class(mlp_layer: Any) -> type[BatchNormMlp]:
    """The FFN class of a `BNFFNBlock`: `BatchNormMlp` for timm's default `Mlp`, or a subclass given."""
    if mlp_layer is Mlp or mlp_layer is None:
        return BatchNormMlp
    if isinstance(mlp_layer, type) and issubclass(mlp_layer, BatchNormMlp):
        return mlp_layer
    raise ValueError(
        f"BNFFNBlock's FFN is a bnvit.BatchNormMlp; mlp_layer={_name(mlp_layer)} is not one "
        "(leave timm's default Mlp, which it replaces, or pass BatchNormMlp or a subclass)"
    )


class BNFFNBlock(nn.Module):
    """The article's transformer block as a `block_fn` for timm's `VisionTransformer`.

    timm's attention with its pre-norm, then `BatchNormMlp` with no norm in front; takes every
    argument of timm's `Block`. The BatchNorm's statistics include tokens hidden by `attn_mask`.

    Args:
        scale_mlp_norm: Must be `False`: the FFN's norm is its BatchNorm.
        proj_bias: Bias of the attention's output projection and of the FFN's Linear layers.
        proj_drop: Dropout after the attention's projection and inside the FFN.
        init_values: LayerScale's initial value (`None` or 0: none).
        norm_layer: The attention's pre-norm (and its q/k norms).
        mlp_layer: timm's `Mlp` (replaced by `BatchNormMlp`) or a `BatchNormMlp` subclass.
        attn_layer: timm's attention class, or a name timm's ViT knows.

    Raises:
        ValueError: `scale_mlp_norm=True`, a foreign `mlp_layer`, an unknown `attn_layer`, a bad width or rate.

    Examples:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", block_fn=BNFFNBlock, img_size=32, depth=2)
        >>> type(model.blocks[0].mlp).__name__, hasattr(model.blocks[0], "norm2")
        ('BatchNormMlp', False)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 1000])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] | str = nn.GELU,
        norm_layer: Callable[..., nn.Module] = LayerNorm,
        mlp_layer: Any = Mlp,
        attn_layer: Any = TimmAttention,
        depth: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        if unsupported:
            raise TypeError(
                f"BNFFNBlock takes the arguments of timm's Block (the block of timm's VisionTransformer: vit_*, "
                f"deit_*, ...); got {', '.join(sorted(unsupported))}, which another ViT family passes "
                "(rel_pos_cls: vit_relpos_*); that family's blocks are not supported"
            )
        if scale_mlp_norm:
            raise ValueError(
                "BNFFNBlock has no norm inside its FFN but its BatchNorm; scale_mlp_norm must be False, got True"
            )
        dim = _checks.positive_int("dim", dim)
        mlp_ratio = _checks.positive_float("mlp_ratio", mlp_ratio)
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = _attention(
            attn_layer,
            dim,
            depth,
            num_heads=_checks.positive_int("num_heads", num_heads),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            scale_norm=scale_attn_norm,
            proj_bias=proj_bias,
            attn_drop=_checks.rate("attn_drop", attn_drop),
            proj_drop=_checks.rate("proj_drop", proj_drop),
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if _checks.rate("drop_path", drop_path) > 0 else nn.Identity()
        self.mlp = _mlp_class(mlp_layer)(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(TORCHSCRIPT_REFUSAL)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


# ---------------------------------------------------------------------------- conversion


def _with_bn(
    ffn: Mlp | FeedForward, build: Callable[[int, int, int], BatchNormFFN], norm: nn.Module | None
) -> BatchNormFFN:
    """`build(...)` with `ffn`'s layers and a fresh BatchNorm; `norm`'s affine map folded into `fc1`."""
    fc1, fc2 = ffn.fc1, ffn.fc2
    if norm is not None and getattr(norm, "weight", None) is not None:
        shift = norm.bias if norm.bias is not None and fc1.bias is not None else torch.zeros_like(norm.weight)
        weight, bias = fold_affine_before_linear(norm.weight, shift, fc1.weight, fc1.bias)
        with torch.no_grad():
            fc1.weight.copy_(weight)
            if fc1.bias is not None:
                fc1.bias.copy_(bias)
    with torch.device("meta"):  # nothing allocated: every module but the BatchNorm is replaced by ffn's own
        new = build(fc1.in_features, fc1.out_features, fc2.out_features)
    new.norm = type(new.norm)(fc1.out_features, device=fc1.weight.device, dtype=fc1.weight.dtype)
    new.fc1, new.act, new.drop1, new.fc2, new.drop2 = fc1, ffn.act, ffn.drop1, fc2, ffn.drop2
    return new.train(ffn.training)


def _refuse_timm_block(index: int, block: nn.Module) -> None:
    """Raise if `block` is not a plain timm `Block` whose MLP is timm's `Mlp` without an inner norm."""
    where = f"blocks.{index} is a {type(block).__module__}.{type(block).__name__}"
    if isinstance(block, BNFFNBlock):
        raise ValueError(f"the model is already in the article's form ({where}); there is nothing to convert")
    if type(block) is not Block:
        raise ValueError(
            f"to_bn_ffn converts timm's pre-norm Block (x + attn(norm1(x)), x + mlp(norm2(x))); {where}, "
            "whose layout it does not know"
        )
    mlp = block.mlp
    if isinstance(mlp, BatchNormFFN):
        raise ValueError(
            f"blocks.{index}.mlp is already a BatchNorm FFN (mlp_layer=BatchNormMlp), behind timm's norm2 "
            "LayerNorm; for the article's form, with no norm before the FFN, build with block_fn=bnvit.BNFFNBlock"
        )
    if type(mlp) is not Mlp or isinstance(mlp.fc1, nn.Conv2d):
        raise ValueError(
            f"to_bn_ffn converts timm's Mlp (Linear -> act -> Linear); blocks.{index}.mlp is a "
            f"{type(mlp).__name__}, whose layout it does not know (gated MLPs such as SwiGLU have no single fc1)"
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(
            f"blocks.{index}.mlp has a norm inside (scale_mlp_norm=True); the article's FFN has only its BatchNorm"
        )


def _convert_timm(model: VisionTransformer, fold_norm: bool) -> None:
    for index, block in enumerate(model.blocks):
        _refuse_timm_block(index, block)
    for index, block in enumerate(model.blocks):
        new = BNFFNBlock.__new__(BNFFNBlock)  # assembled from the block's own modules, nothing re-initialised
        nn.Module.__init__(new)
        new.norm1, new.attn, new.ls1, new.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        new.mlp = _with_bn(block.mlp, BatchNormMlp, block.norm2 if fold_norm else None)
        new.ls2, new.drop_path2 = block.ls2, block.drop_path2
        model.blocks[index] = new.train(block.training)


def _convert_bnvit(model: ViT, fold_norm: bool) -> None:
    if model.cfg.norm != "ln":
        form = "already in the article's form" if model.cfg.norm == "bn_ffn" else "a ViTBN (BatchNorm everywhere)"
        raise ValueError(
            f"to_bn_ffn converts a LayerNorm ViT (norm='ln'); this one has norm={model.cfg.norm!r}, {form}"
        )
    for index, block in enumerate(model.blocks):
        if type(block) is not EncoderBlock or type(block.ffn) is not FeedForward:
            raise ValueError(
                f"to_bn_ffn converts bnvit's EncoderBlock with its FeedForward; blocks.{index} is a "
                f"{type(block).__name__} with a {type(getattr(block, 'ffn', None)).__name__}"
            )
    for block in model.blocks:
        block.ffn = _with_bn(block.ffn, _bnvit_ffn, block.ffn.norm if fold_norm else None)
    model.cfg = dataclasses.replace(model.cfg, norm="bn_ffn")


def name_bn_ffn(model: VisionTransformer) -> VisionTransformer:
    """Name a timm ViT of `BNFFNBlock`s by its registered BN-FFN twin, so `save_for_hf` can export it.

    Sets `pretrained_cfg["architecture"]` and drops `block_fn` from the reconstruction arguments.

    Returns:
        `model` itself.

    Raises:
        TypeError: `model` is not a timm `VisionTransformer`.
        ValueError: A block is not a `BNFFNBlock`, or the architecture has no registered twin.

    Examples:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", block_fn=BNFFNBlock, img_size=32, depth=1)
        >>> name_bn_ffn(model).pretrained_cfg["architecture"], "block_fn" in model._model_args
        ('vit_tiny_patch16_bnffn_224', False)
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"name_bn_ffn names a timm VisionTransformer, got {type(model).__name__}")
    if not all(isinstance(block, BNFFNBlock) for block in model.blocks):
        raise ValueError("name_bn_ffn names a ViT whose blocks are all bnvit.BNFFNBlock; convert it with to_bn_ffn")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture") or ""
    twin = _twin(arch)
    if twin is None:
        registered = ", ".join(n for n in timm.list_models("*bnffn*") if _is_bnvits(n))
        raise ValueError(
            f"bnvit registers no BatchNorm-FFN twin of {arch!r}; registered: {registered} "
            "(save_for_hf needs a name that rebuilds the model)"
        )
    if twin != arch:
        cfg["notes"] = (f"{arch} with bnvit.BNFFNBlock: the weights of {arch}.{cfg.get('tag')} converted",)
    cfg["architecture"] = twin
    model.pretrained_cfg = model.default_cfg = cfg
    model._model_args = {k: v for k, v in getattr(model, "_model_args", {}).items() if k != "block_fn"}
    return model


def _is_bnvits(name: str) -> bool:
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("bnvit.")


def _twin(arch: str) -> str | None:
    """The registered BatchNorm-FFN name of a timm ViT architecture (itself if it is one), or None."""
    if _is_bnvits(arch) and "bnffn" in arch:
        return arch
    for candidate in (re.sub(r"_(\d+)$", r"_bnffn_\1", arch), arch.replace("timmvitln_", "timmvitbnffn_", 1)):
        if candidate != arch and _is_bnvits(candidate):
            return candidate
    return None


def _bnvit_ffn(dim: int, hidden: int, out: int) -> BatchNormFFN:
    return BatchNormFFN(dim, hidden, out_dim=out)


def to_bn_ffn(model: nn.Module, *, fold_norm: bool = True) -> nn.Module:
    """Convert a LayerNorm ViT in place to the article's form: BatchNorm inside each FFN, no norm before it.

    Weights that carry over are kept as the same tensors; new BatchNorms start as in training:
    recalibrate (`bnvit.recalibrate_bn`) and fine-tune before use. For a state dict: `ln_ffn_to_bn_ffn`.

    Args:
        model: A timm `VisionTransformer` of timm `Block`s, or a bnvit `ViT` with `norm="ln"`.
        fold_norm: Fold the dropped LayerNorm's affine map into `fc1` (else drop it).

    Returns:
        `model` itself, converted.

    Raises:
        TypeError: `model` is neither (a compiled or DDP-wrapped model: convert the inner one).
        ValueError: A layout the conversion does not know, or already converted; nothing changed.

    Examples:
        >>> import timm
        >>> model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2)
        >>> fc1 = model.blocks[0].mlp.fc1
        >>> model = to_bn_ffn(model)
        >>> type(model.blocks[0]).__name__, model.blocks[0].mlp.fc1 is fc1
        ('BNFFNBlock', True)
        >>> model.pretrained_cfg["architecture"]
        'deit_tiny_patch16_bnffn_224'
    """
    _bool("fold_norm", fold_norm)
    if isinstance(model, VisionTransformer):
        _convert_timm(model, fold_norm)
        if _twin((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "") is not None:
            name_bn_ffn(model)
    elif isinstance(model, ViT):
        _convert_bnvit(model, fold_norm)
    else:
        raise TypeError(
            f"to_bn_ffn converts a timm VisionTransformer or a bnvit ViT, got {type(model).__name__} "
            "(for a compiled or DDP-wrapped model, convert the model inside it)"
        )
    return model
