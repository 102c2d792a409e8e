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
or with `load_model(PATH)`. With `pretrained=True` a builder reads the weights first (a file,
a `local-dir:` folder written by `timm.models.save_for_hf`, an `hf-hub:` repository or the
weights shipped in the package) and builds the depth, qkv bias and positional embedding they
hold; it records them in `model.pretrained_model_args`, so `save_for_hf` writes them out.

`vit_mnist.bnvit_mnist` and `vitbnffn_mnist.bnvit_mnist` (the default tags of those names)
point at `bnvit/weights/<name>.safetensors` inside the installed package: trained weights drop
in there, and `timm.create_model(name, pretrained=True)` loads them offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._manipulate import adapt_input_conv
from timm.models._pretrained import PretrainedCfg

from . import _checks
from ._io import tensors_sha256, verify_checkpoint_file
from .vit import ViT, feature_take_indices

__all__ = [
    "WEIGHTS_DIR",
    "checkpoint_filter_fn",
    "describe_state_dict",
    "load_model",
    "pretrained_state_dict",
    "read_state_dict",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the package's own trained weights live: `<name>.safetensors`, one per shipped tag."""
_PACKAGED_WEIGHTS = WEIGHTS_DIR  # the folder the default cfgs name; `WEIGHTS_DIR` may be pointed elsewhere
SHIPPED_TAG = "bnvit_mnist"
"""Tag of the weights trained with bnvit's recipe (examples/train_weights.py) on MNIST."""
SHIPPED = ("vit_mnist", "vitbnffn_mnist")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
"""Weight files of a `local-dir:` folder, in timm's order of preference (safetensors first)."""

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
        first_conv="patch_embed.proj",
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


def shipped_record(name: str) -> dict[str, Any] | None:
    """The training run behind the weights of `name` shipped in the package, or None if none ship.

    `WEIGHTS_DIR/<name>.json`, written by examples/train_weights.py beside the weights: recipe,
    command, machine, wall time, per-epoch history and the test accuracies (docs/weights.md).

    Examples:
        >>> f"{shipped_record('vitbnffn_mnist')['clean_test_acc']:.2%}"
        '99.56%'
        >>> shipped_record("vit_cifar") is None
        True
    """
    try:
        return json.loads((_PACKAGED_WEIGHTS / f"{name}.json").read_text())
    except FileNotFoundError:
        return None


def recipe_summary(record: Mapping[str, Any]) -> str:
    """One line saying how shipped weights were trained, from their record (cfg notes and model card)."""
    r = record["recipe"]
    return (
        f"{r['epochs']} epochs of batch {r['batch_size']}; AdamW, lr {r['lr']:g}, weight decay "
        f"{r['weight_decay']:g}, {r['warmup_epochs']} warm-up epochs then cosine to zero; label smoothing "
        f"{r['label_smoothing']:g}; stochastic depth {r.get('drop_path_rate', 0.0):g}; gradient norm clipped at "
        f"{r['max_grad_norm']:g}; {r['augment']}; {record['precision']}; seed {record['seed']}"
    )


def _shipped_notes(record: Mapping[str, Any]) -> tuple[str, str]:
    """The two lines a shipped weight's pretrained cfg carries: what it scores and how it was made."""
    return (
        f"MNIST test accuracy {record['clean_test_acc']:.2%} (clean), {record['augmented_test_acc']:.2%} "
        "(the article's frozen augmented test set), last epoch",
        f"trained by examples/train_weights.py: {recipe_summary(record)}",
    )


def shipped_cfg(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` for the weights of `name` shipped in the package (`WEIGHTS_DIR/<name>.safetensors`)."""
    record = shipped_record(name)
    notes = _shipped_notes(record) if record else None
    return dict(cfg, file=str(_PACKAGED_WEIGHTS / f"{name}.safetensors"), **({"notes": notes} if notes else {}))


default_cfgs = generate_default_cfgs(
    {
        **{f"{name}.{SHIPPED_TAG}": shipped_cfg(name, _MNIST_CFG) for name in SHIPPED},
        **{
            f"{prefix}_mnist": _MNIST_CFG for prefix in ("vit", "vitbnffn", "vitbn") if f"{prefix}_mnist" not in SHIPPED
        },
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
        state_dict = adapt_in_chans(state_dict, model.cfg.patch_size, model.cfg.in_chans)
        _check_compatible(state_dict, model)
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
    """Adapt the input layer of a ViT state dict to `in_chans` input channels, as timm does for its stems.

    The patch projection is treated as the `p x p` convolution it is and adapted with timm's
    `adapt_input_conv`: from 1 channel to `C` its weights are repeated and scaled by `1 / C`; from
    `C` channels to 1 they are summed. The pre-norm's per-value parameters and statistics are
    repeated (1 to `C`) or averaged (`C` to 1). From 1 to `C` channels a gray image copied into
    every channel gives exactly the outputs of the original model; from `C` to 1 the result is
    exact when the pre-norm's parameters agree across channels, otherwise a starting point for
    fine-tuning. A state dict whose patches do not come from `patch_size` patches is returned
    unchanged (the mismatch is reported when it is loaded).

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


def _check_compatible(
    state_dict: Mapping[str, torch.Tensor], model: ViT, source: str = "checkpoint", allow_new_head: bool = False
) -> None:
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


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict safely from a checkpoint file or a `timm.models.save_for_hf` folder.

    Reads `.safetensors` files with safetensors and other files with `torch.load(...,
    weights_only=True)`, never executing code from the file. Accepts a bare state dict or a
    training checkpoint holding one under `"model"`, `"state_dict"` or `"model_state_dict"`.
    For a folder, reads the first of `WEIGHT_FILES` it holds (safetensors first, as timm).

    Damage is caught, never loaded: a zip checkpoint's CRCs are checked before unpickling, a
    safetensors file whose metadata carries `sha256` (bnvit's shipped weights do) is checked
    against its tensors, and weights holding NaN or infinity, or BatchNorm statistics no
    BatchNorm can hold (a negative running variance), are refused.

    Raises:
        FileNotFoundError: If `path` does not exist, or is a folder without a weight file.
        ValueError: If the file is damaged or not a readable checkpoint of finite tensors.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise FileNotFoundError(
                f"{path} holds no weights: expected one of {', '.join(WEIGHT_FILES)} "
                "(timm.models.save_for_hf writes model.safetensors or pytorch_model.bin)"
            )
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        obj = _read_safetensors(path, map_location)
    else:
        verify_checkpoint_file(path)
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # the unpickler raises many kinds on foreign bytes
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint (weights only): {_first_line(err)}") from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    broken = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ValueError(f"{path} holds NaN or infinite weights in {', '.join(broken[:3])}{more}: a broken checkpoint")
    _checks.check_bn_statistics(obj, path)
    return dict(obj)


def _read_safetensors(path: str, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open  # a dependency of timm; only needed for this format

    try:
        with safe_open(path, framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            obj = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
    except Exception as err:  # safetensors raises its own kinds on foreign bytes
        raise ValueError(f"cannot read {path} as a safetensors file: {_first_line(err)}") from err
    expected = metadata.get("sha256")
    if expected is not None and expected != tensors_sha256(obj):
        raise ValueError(f"{path} is damaged: its tensors do not match the sha256 in its metadata")
    return obj


def _first_line(err: Exception) -> str:
    """An exception's first line: torch's unpickling errors append paragraphs of advice that do not apply."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
    _check_compatible(state_dict, model, os.fspath(path), allow_new_head=found["num_classes"] != config["num_classes"])
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


def pretrained_state_dict(
    variant: str, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The weights `timm.create_model(variant, pretrained=True, ...)` loads, read as timm's loader reads them.

    `pretrained_cfg` and `pretrained_cfg_overlay` are those of `timm.create_model` (a tag, a
    dict or a `PretrainedCfg`; `local-dir:` and `hf-hub:` names arrive as such a cfg).

    In timm's order: a `state_dict` in the cfg, a `local-dir:` folder (`model.safetensors`
    first), an `hf-hub:` repository (through timm's hub loader and its cache), a `file`
    (bnvit's shipped weights are looked up in `WEIGHTS_DIR`), a `url`.

    Returns:
        The state dict and a description of where it came from, for error messages.

    Raises:
        ValueError: If the cfg points at no weights, or at shipped weights absent from this build.
        FileNotFoundError: If a `local-dir:` folder holds no weight file.
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.source != "local-dir" and cfg.state_dict is not None:
        return dict(cfg.state_dict), "the state dict in pretrained_cfg"
    if cfg.source == "local-dir":
        return read_state_dict(cfg.file), str(cfg.file)
    if cfg.source == "hf-hub" or (cfg.hf_hub_id and not cfg.file):
        from timm.models._hub import load_state_dict_from_hf  # needs huggingface_hub: only for hub loads

        args = (cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_filename else (cfg.hf_hub_id,)
        return load_state_dict_from_hf(*args), f"hf-hub:{cfg.hf_hub_id}"
    if cfg.file:
        return read_state_dict(_shipped_or_given(variant, cfg)), str(cfg.file)
    if cfg.url:
        sd = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
        return checkpoint_filter_fn(sd), cfg.url
    raise ValueError(
        f"no published weights for {variant}; load a file with "
        f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    )


def _locate_shipped(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with the package's own weights, if the cfg names them, located in `WEIGHTS_DIR` (or a clear error)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    if cfg.source == "local-dir" or cfg.state_dict is not None or not cfg.file:
        return kwargs
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "file": _shipped_or_given(variant, cfg)}}


def _shipped_or_given(variant: str, cfg: PretrainedCfg) -> str:
    """`cfg.file`, or for the package's own weights their current place in `WEIGHTS_DIR`."""
    path = Path(cfg.file)
    if path.parent != _PACKAGED_WEIGHTS:
        return cfg.file
    path = WEIGHTS_DIR / path.name
    if not path.is_file():
        raise ValueError(
            f"the weights of {variant}.{cfg.tag} are not shipped in this build of bnvit (looked for {path}); "
            f"train them with examples/train_weights.py and pass the file: timm.create_model({variant!r}, "
            f"pretrained=True, pretrained_cfg_overlay=dict(file=PATH)), or load a save_for_hf folder with "
            f"timm.create_model('local-dir:FOLDER', pretrained=True)"
        )
    return str(path)


def _resolve_cfg(variant: str, kwargs: Mapping[str, Any]) -> PretrainedCfg:
    return resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )


def _args_from_weights(variant: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Depth, qkv bias and positional embedding of the weights `pretrained=True` will load, checked."""
    state_dict, source = pretrained_state_dict(
        variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
    )
    found = describe_state_dict(checkpoint_filter_fn(state_dict))
    if found["norm"] != defaults["norm"]:
        builders = [f"{p}_*" for p, n in _PREFIX_NORM.items() if n == found["norm"]]
        raise ValueError(
            f"{source} holds a norm={found['norm']!r} model, but {variant} builds "
            f"norm={defaults['norm']!r}; use a {' / '.join(builders)} builder"
        )
    from_weights = dict(depth=found["depth"], qkv_bias=found["qkv_bias"], pos_embed=found["pos_embed"])
    _raise_on_contradictions(from_weights, kwargs, source)
    return from_weights


def _feature_cfg(variant: str, depth: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's `feature_cfg` for `features_only=True`: the getter wrapper over `forward_intermediates`."""
    out_indices = kwargs.pop("out_indices", min(3, depth))
    try:
        feature_take_indices(depth, out_indices)
    except ValueError as err:
        raise ValueError(f"{variant}: bad out_indices {out_indices!r}: {err}") from None
    return dict(out_indices=out_indices, feature_cls=kwargs.pop("feature_cls", "getter"))


@contextlib.contextmanager
def _quiet_adapted_stem() -> Iterator[None]:
    """Hide timm's warning that the stem 'already matches': `checkpoint_filter_fn` adapted its channels."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Pretrained patch_embed.proj weights already match")

    logger = logging.getLogger("timm.models._builder")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def build_with_weights(
    model_cls: type,
    variant: str,
    pretrained: bool,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
    *,
    infer: Any,
    num_blocks: Any,
    **build: Any,
) -> Any:
    """timm's `build_model_with_cfg`, with the architecture read from the weights when `pretrained`.

    Shared by the ViT and MLP builders. `infer(variant, defaults, kwargs)` reads the weights and
    returns the architecture arguments they fix; they are recorded as the model's reconstruction
    arguments (`pretrained_model_args`, and `_model_args`, which `timm.models.save_for_hf`
    exports). `num_blocks(model_args)` is the number of feature levels for `features_only`.
    """
    if pretrained:
        kwargs = _locate_shipped(variant, kwargs)
    from_weights = infer(variant, defaults, kwargs) if pretrained else {}
    model_args = {**defaults, **from_weights, **kwargs}
    feature_cfg = None
    if model_args.pop("features_only", False):
        feature_cfg = _feature_cfg(variant, num_blocks(model_args), model_args)
        model_args["features_only"] = True
    with _quiet_adapted_stem():
        model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **build, **model_args)
    if pretrained:  # whatever source timm loaded (a file, a hub repository, a state dict in the cfg)
        _checks.check_bn_statistics(model, f"the checkpoint timm loaded for {variant}")
    if from_weights:
        model.pretrained_model_args = {**getattr(model, "pretrained_model_args", {}), **from_weights}
        model._model_args = {**getattr(model, "_model_args", {}), **from_weights}
    return model


def _create_vit(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> ViT:
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
