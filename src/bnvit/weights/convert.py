"""What a ViT state dict holds, and how foreign ones map to bnvit's layout (no file reading here)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.models._manipulate import adapt_input_conv

from .._util import checks as _checks
from ..models.features import resample_pos_embed
from ..models.fold import fold_affine_before_linear
from ..models.vit import ViT

__all__ = ["adapt_in_chans", "checkpoint_filter_fn", "describe_state_dict", "ln_ffn_to_bn_ffn", "resample_to_grid"]

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
    """Convert a state dict (the article's layout or bnvit's, DDP or compiled) to bnvit's (timm's filter protocol).

    With a `model`, input channels and a learnable positional embedding are adapted to it and the
    result is checked; a mismatch raises `ValueError` listing every difference but the classes.

    Args:
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
        state_dict = adapt_in_chans(state_dict, model.cfg.patch_size, model.cfg.in_chans)
        state_dict = resample_to_grid(state_dict, model.cfg.grid_size)
        check_compatible(state_dict, model)
    return state_dict


_PATCH_KEYS = (
    "patch_embed.pre_norm.weight",
    "patch_embed.pre_norm.bias",
    "patch_embed.pre_norm.bn.weight",
    "patch_embed.pre_norm.bn.bias",
    "patch_embed.pre_norm.bn.running_mean",
    "patch_embed.pre_norm.bn.running_var",
)


def adapt_in_chans(state_dict: dict[str, torch.Tensor], patch_size: int, in_chans: int) -> dict[str, torch.Tensor]:
    """Adapt a ViT state dict's input layer to `in_chans` channels, as timm does for its stems.

    1 to `C` is exact for gray images copied into every channel; other patch sizes are left unchanged.

    Examples:
        >>> from bnvit import ViT
        >>> sd = adapt_in_chans(ViT(depth=1).state_dict(), patch_size=7, in_chans=3)
        >>> tuple(sd["patch_embed.proj.weight"].shape)
        (64, 147)
    """
    weight = state_dict.get("patch_embed.proj.weight")
    area = patch_size * patch_size
    if weight is None or weight.shape[1] == area * in_chans or weight.shape[1] % area:
        return state_dict
    source = weight.shape[1] // area
    out = dict(state_dict)
    as_conv = weight.reshape(weight.shape[0], patch_size, patch_size, source).permute(0, 3, 1, 2)
    adapted = adapt_input_conv(in_chans, as_conv, base_chans=source).to(weight.dtype)
    out["patch_embed.proj.weight"] = adapted.permute(0, 2, 3, 1).reshape(weight.shape[0], area * in_chans)
    for key in (k for k in _PATCH_KEYS if k in state_dict):
        values = state_dict[key].reshape(patch_size, patch_size, source)
        if in_chans == 1:
            values = values.mean(dim=-1, keepdim=True)
        else:
            values = values.repeat(1, 1, -(-in_chans // source))[..., :in_chans]
        out[key] = values.reshape(-1).contiguous()
    return out


def resample_to_grid(state_dict: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """`state_dict` with its learnable positional embedding resampled to `grid` (non-square left as is).

    Examples:
        >>> from bnvit import ViT
        >>> sd = resample_to_grid(ViT(depth=1).state_dict(), (8, 8))
        >>> tuple(sd["pos_embed"].shape)
        (1, 65, 64)
    """
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or pos_embed.shape[1] == grid[0] * grid[1] + 1:
        return state_dict
    side = round((pos_embed.shape[1] - 1) ** 0.5)
    if side * side != pos_embed.shape[1] - 1:
        return state_dict
    return {**state_dict, "pos_embed": resample_pos_embed(pos_embed, grid, (side, side))}


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer a `ViT` configuration from a bnvit state dict (its split of `attn_width` into heads is not stored).

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
    c = model.cfg
    return dict(
        norm=c.norm,
        depth=c.depth,
        qkv_bias=c.qkv_bias,
        dim=c.dim,
        attn_width=c.heads * c.dim_head,
        mlp_dim=c.mlp_dim,
        num_classes=c.num_classes,
        pos_embed=c.pos_embed,
        patch_dim=c.patch_size**2 * c.in_chans,
        num_tokens=c.num_tokens if c.pos_embed == "learn" else None,
    )


def check_compatible(
    state_dict: Mapping[str, torch.Tensor], model: ViT, source: str = "checkpoint", allow_new_head: bool = False
) -> None:
    """Raise `ValueError` listing every way `state_dict` does not fit `model` (the head aside, when allowed)."""
    found, wanted = describe_state_dict(state_dict), _describe_model(model)
    diffs = [
        f"{key}: checkpoint {found[key]!r}, model {wanted[key]!r}"
        for key in found
        if key != "num_classes" and found[key] != wanted[key]
    ]
    if diffs:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(diffs))
    # A different class count is the caller's to allow (timm drops the head when num_classes differs
    # from the pretrained cfg's; load_model when asked for num_classes); everything else must fit.
    asked_other_classes = model.num_classes != getattr(model, "pretrained_cfg", {}).get(
        "num_classes", model.num_classes
    )
    mismatch = _checks.state_dict_mismatch(
        model.state_dict(), state_dict, ignore="head." if allow_new_head or asked_other_classes else None
    )
    if mismatch and "head.weight" in state_dict and found["num_classes"] != model.num_classes:
        mismatch += f"; it has {found['num_classes']} classes: pass num_classes={found['num_classes']} to load it whole"
    if mismatch:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}({model.cfg.norm!r}, depth {model.cfg.depth}): {mismatch}"
        )


def config_from(found: dict[str, Any], asked: Mapping[str, Any], source: str) -> dict[str, Any]:
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
    raise_on_contradictions(inferred, asked, source, ignore=("num_classes",))
    return {**inferred, **asked}


def raise_on_contradictions(inferred: Mapping[str, Any], asked: Mapping[str, Any], source: str, ignore=()) -> None:
    """Raise `ValueError` naming every argument that was `asked` with another value than the checkpoint's."""
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


_NORM2 = re.compile(r"^(?P<block>(?:.*\.)?blocks\.\d+)\.norm2\.weight$")


def ln_ffn_to_bn_ffn(state_dict: Mapping[str, torch.Tensor], *, fold_norm: bool = True) -> dict[str, torch.Tensor]:
    """A timm ViT state dict of LayerNorm `Block`s converted to `bnvit.BNFFNBlock`s (docs/timm.md lists the keys).

    Per block `norm2` is dropped (its affine map folded into `mlp.fc1` if `fold_norm`) and
    `mlp.norm.bn` added as the identity; an already converted state dict is copied unchanged.

    Args:
        state_dict: timm `VisionTransformer` keys.
        fold_norm: Fold `norm2`'s weight and bias into `fc1` (else drop them).

    Returns:
        A new state dict; unchanged tensors are the same objects.

    Raises:
        ValueError: A block whose MLP is not timm's `Mlp`, or `norm2` in some blocks only.

    Examples:
        >>> import timm
        >>> sd = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32).state_dict()
        >>> out = ln_ffn_to_bn_ffn(sd)
        >>> "blocks.0.norm2.weight" in out, float(out["blocks.0.mlp.norm.bn.running_var"][0])
        (False, 1.0)
    """
    out = dict(state_dict)
    blocks = [m["block"] for k in state_dict if (m := _NORM2.match(k))]
    converted = {k.rsplit(".mlp.norm.bn.", 1)[0] for k in state_dict if ".mlp.norm.bn." in k}
    if blocks and converted:
        raise ValueError(
            f"the state dict mixes LayerNorm blocks ({blocks[0]} has norm2) and BatchNorm-FFN blocks "
            f"({sorted(converted)[0]} has mlp.norm.bn); it is neither timm's ViT nor its BatchNorm-FFN form"
        )
    for block in blocks:
        if f"{block}.mlp.fc1.weight" not in state_dict or f"{block}.mlp.norm.weight" in state_dict:
            mlp_keys = sorted(k[len(block) + 1 :] for k in state_dict if k.startswith(f"{block}.mlp."))
            raise ValueError(
                f"{block}'s MLP is not timm's Mlp (Linear fc1 -> act -> Linear fc2, no inner norm): it holds "
                f"{', '.join(mlp_keys)}; only that MLP converts to the BatchNorm FFN (gated MLPs such as SwiGLU do not)"
            )
        gamma, beta = out.pop(f"{block}.norm2.weight"), out.pop(f"{block}.norm2.bias", None)
        weight, bias = out[f"{block}.mlp.fc1.weight"], out.get(f"{block}.mlp.fc1.bias")
        if fold_norm:  # without a bias in fc1 only the scale folds (the BatchNorm after it removes shifts)
            shift = torch.zeros_like(gamma) if beta is None or bias is None else beta
            weight, folded_bias = fold_affine_before_linear(gamma, shift, weight, bias)
            out[f"{block}.mlp.fc1.weight"] = weight
            if bias is not None:
                out[f"{block}.mlp.fc1.bias"] = folded_bias
        hidden, like = weight.shape[0], dict(dtype=weight.dtype)
        bn = f"{block}.mlp.norm.bn."
        out[bn + "weight"], out[bn + "bias"] = torch.ones(hidden, **like), torch.zeros(hidden, **like)
        out[bn + "running_mean"], out[bn + "running_var"] = torch.zeros(hidden, **like), torch.ones(hidden, **like)
        out[bn + "num_batches_tracked"] = torch.tensor(0)
    return out
