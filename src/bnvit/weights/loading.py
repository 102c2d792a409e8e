"""Weights in: reading and verifying weight files, `load_model`, and the weights shipped in the package."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models._pretrained import PretrainedCfg

from .._util import checks as _checks
from .._util.checks import first_line
from .._util.io import tensors_sha256, verify_checkpoint_file
from ..models.vit import ViT
from .convert import check_compatible, checkpoint_filter_fn, config_from, describe_state_dict
from .names import current_name

__all__ = [
    "SHIPPED",
    "SHIPPED_TAG",
    "WEIGHTS_DIR",
    "WEIGHT_FILES",
    "load_model",
    "read_state_dict",
    "recipe_summary",
    "shipped_record",
]

WEIGHTS_DIR = Path(__file__).resolve().parent
"""Where the package's own trained weights live: `<name>.safetensors`, one per shipped tag."""
_PACKAGED_WEIGHTS = WEIGHTS_DIR  # the folder the default cfgs name; `WEIGHTS_DIR` may be pointed elsewhere
SHIPPED_TAG = "bnvit_mnist"
"""Tag of the weights trained with bnvit's recipe (examples/train_weights.py) on MNIST."""
SHIPPED = ("vitln_mnist", "vitbnffn_mnist")
"""The names whose weights ship in the package, under the tag `SHIPPED_TAG`."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
"""Weight files of a `local-dir:` folder, in timm's order of preference (safetensors first)."""


def shipped_record(name: str) -> dict[str, Any] | None:
    """The training run behind `name`'s shipped weights (`WEIGHTS_DIR/<name>.json`), or None.

    Examples:
        >>> f"{shipped_record('vitbnffn_mnist')['clean_test_acc']:.2%}"
        '99.56%'
        >>> shipped_record("vit_mnist")["model"]  # an old name: the record of vitln_mnist
        'vitln_mnist'
        >>> shipped_record("vitln_cifar") is None
        True
    """
    try:
        return json.loads((_PACKAGED_WEIGHTS / f"{current_name(name)}.json").read_text())
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


def _shipped_notes(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The lines a shipped weight's pretrained cfg carries: what it scores, how it was made, its temperature."""
    notes = (
        f"MNIST test accuracy {record['clean_test_acc']:.2%} (clean), {record['augmented_test_acc']:.2%} "
        "(the article's frozen augmented test set), last epoch",
        f"trained by examples/train_weights.py: {recipe_summary(record)}",
    )
    if "calibration" in record:
        t = record["calibration"]["temperature"]
        notes += (f"calibrated probabilities: softmax(logits / {t}) (bnvit.weights.calibration.shipped_temperature)",)
    return notes


def shipped_cfg(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` for the weights of `name` shipped in the package (`WEIGHTS_DIR/<name>.safetensors`)."""
    record = shipped_record(name)
    notes = _shipped_notes(record) if record else None
    return dict(cfg, file=str(_PACKAGED_WEIGHTS / f"{name}.safetensors"), **({"notes": notes} if notes else {}))


def locate_shipped(variant: str, cfg: PretrainedCfg) -> str:
    """`cfg.file`, or for the package's own weights their current place in `WEIGHTS_DIR` (or a clear error)."""
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


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file or a `save_for_hf` folder, never executing code from it.

    A bare state dict or one under `"model"`, `"state_dict"` or `"model_state_dict"`. Damage is refused:
    bad zip CRCs, a safetensors `sha256` mismatch, NaN/inf, impossible BatchNorm statistics.

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
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint (weights only): {first_line(err)}") from err
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
        raise ValueError(f"cannot read {path} as a safetensors file: {first_line(err)}") from err
    expected = metadata.get("sha256")
    if expected is not None and expected != tensors_sha256(obj):
        raise ValueError(f"{path} is damaged: its tensors do not match the sha256 in its metadata")
    return obj


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **kwargs: Any) -> ViT:
    """Build the right `ViT` for a checkpoint (the article's or bnvit's) and load it, in eval mode.

    Args:
        **kwargs: `ViT` arguments a state dict does not record (`heads`, `in_chans`, `pool`).

    Examples:
        >>> model = load_model(os.path.join(os.environ["BNVIT_REFERENCE"], "VITBNFFN_d5_15.pth"))  # doctest: +SKIP
        >>> model.config["norm"], model.config["depth"]  # doctest: +SKIP
        ('bn_ffn', 5)
    """
    state_dict = checkpoint_filter_fn(read_state_dict(path, map_location))
    found = describe_state_dict(state_dict)
    config = config_from(found, kwargs, source=os.fspath(path))
    model = ViT(**config)
    check_compatible(state_dict, model, os.fspath(path), allow_new_head=found["num_classes"] != config["num_classes"])
    if found["num_classes"] != config["num_classes"]:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    model.load_state_dict(state_dict, strict=found["num_classes"] == config["num_classes"])
    return model.to(map_location).eval()
