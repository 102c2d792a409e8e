"""Model cards and Hub folders for bnvit's models, in timm's format (docs/timm.md, "Sharing weights")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf as _timm_save_for_hf
from timm.models._hub import generate_readme
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._util.checks import check_bn_statistics
from .._util.io import atomic_write_text
from .loading import SHIPPED_TAG, recipe_summary, shipped_record
from .names import check_name

__all__ = ["model_card", "model_stats", "save_for_hf"]

ARTICLE = '"Vision Transformer with BatchNorm" (November 2024)'


def model_stats(name: str) -> dict[str, Any]:
    """Parameters (M), GMACs of one image and the input size of a registered bnvit model, counted on meta.

    Examples:
        >>> model_stats("vitbnffn_mnist")
        {'Params (M)': 0.89, 'GMACs': 0.017, 'Image size': '28 x 28, 1 channel'}

    Raises:
        ValueError: If `name` is not one of bnvit's models (the message lists them).
    """
    arch = check_name(name).split(".")[0]
    with torch.device("meta"):
        model = timm.create_model(arch).eval()
    channels, height, width = model.pretrained_cfg["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, channels, height, width, device="meta"))
    params = sum(p.numel() for p in model.parameters())
    plural = "s" if channels > 1 else ""
    return {
        "Params (M)": round(params / 1e6, 2),
        "GMACs": round(counter.get_total_flops() / 2e9, 3),
        "Image size": f"{height} x {width}, {channels} channel{plural}",
    }


def model_card(name: str) -> dict[str, Any]:
    """timm's `model_card` dict for a registered bnvit model; shipped weights add their recipe and results.

    Examples:
        >>> card = model_card("vitbnffn_mnist")
        >>> card["details"]["Dataset"], card["details"]["Accuracy"]["MNIST test set"]
        ('MNIST', '99.56%')
        >>> card["details"]["Calibration"]["temperature"]
        '0.4844: probabilities are softmax(logits / 0.4844)'
        >>> "Accuracy" in model_card("vitln_cifar")["details"]
        False

    Raises:
        ValueError: If `name` is not one of bnvit's models (the message lists them).
    """
    name = check_name(name)
    arch = name.split(".")[0]
    details: dict[str, Any] = {"Model Type": "Image classification / feature backbone"}
    details["Model Stats"] = model_stats(arch)
    record = shipped_record(arch) if name in (arch, f"{arch}.{SHIPPED_TAG}") else None
    if record is not None:
        details["Dataset"] = "MNIST"
        details["Accuracy"] = {
            "MNIST test set": f"{record['clean_test_acc']:.2%}",
            "the article's frozen augmented MNIST test set": f"{record['augmented_test_acc']:.2%}",
            "selection": "last epoch; no early stopping, no model selection on the test set",
        }
        details["Training"] = _recipe_lines(record)
        details["Calibration"] = _calibration_lines(record)
    details["Papers"] = [ARTICLE]
    details["Library"] = "bnvit (registers its models in timm on import)"
    tag = f".{SHIPPED_TAG}" if record is not None else ""
    pretrained = "True" if record is not None else "False"
    scaled = f" / {record['calibration']['temperature']}" if record is not None else ""
    usage = (
        "```python\nimport timm\nimport torch\n\nimport bnvit  # noqa: F401  (registers the models)\n\n"
        f'model = timm.create_model("{arch}{tag}", pretrained={pretrained}).eval()\n'
        f"images = torch.rand(2, *model.pretrained_cfg['input_size'])  # pixels in [0, 1]\n"
        "with torch.no_grad():\n"
        f"    probabilities = (model(images){scaled}).softmax(-1)"
        + ("  # calibrated: logits divided by the temperature\n" if scaled else "\n")
        + "print(probabilities.argmax(-1))\n```"
    )
    return {
        "description": _description(arch),
        "details": details,
        "usage": usage,
        "license": "mit",
        "tags": ["image-classification", "timm", "bnvit"],
    }


_card_of = model_card  # save_for_hf's `model_card` argument, named as timm names it, shadows the function


def save_for_hf(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    model_card: dict[str, Any] | None = None,
    model_name: str | None = None,
    safe_serialization: bool | str = True,
) -> Path:
    """timm's `save_for_hf` plus a `README.md` model card; loads back with `timm.create_model("local-dir:" + folder)`.

    Args:
        model: A model built by `timm.create_model` from a bnvit name.
        model_card: Default: `model_card()` of the model's name and tag.
        model_name: The card's title; default `<architecture>.<tag>`.
        safe_serialization: True (safetensors), False (pickle) or "both".

    Returns:
        The folder.

    Raises:
        ValueError: No timm name to use, or impossible BatchNorm statistics (nothing written).
    """
    check_bn_statistics(model, "save_for_hf: the model")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = model_name or (f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg.get("architecture"))
    if name is None:
        raise ValueError(
            f"{type(model).__name__} was not built by timm.create_model, so its name is unknown; "
            "pass model_name='vitbnffn_mnist' (a registered name) or a model_card"
        )
    card = model_card if model_card is not None else _card_of(name)
    folder = Path(save_directory)
    _timm_save_for_hf(model, str(folder), safe_serialization=safe_serialization)
    atomic_write_text(folder / "README.md", generate_readme(card, name))
    return folder


def _description(arch: str) -> str:
    if arch.startswith(("dnn", "mlp")):
        kind = "A multilayer perceptron from the article's MLP comparison"
    elif arch.startswith("timmvit"):
        blocks = "bnvit's BNFFNBlock (BatchNorm inside the FFN)" if "bnffn" in arch else "timm's LayerNorm Block"
        kind = f"timm's VisionTransformer at the article's MNIST scale with {blocks}, from the transfer study"
    elif arch.startswith("vitbnffn"):
        kind = "A ViTBNFFN: a Vision Transformer whose feed-forward network is Linear -> BatchNorm -> GELU -> Linear"
        kind += " (no LayerNorm before it; attention keeps its LayerNorm)"
    elif arch.startswith("vitbn"):
        kind = "A ViTBN: a Vision Transformer with BatchNorm in place of every LayerNorm"
    else:
        kind = "A standard Vision Transformer with LayerNorm, the article's baseline"
    return f"{kind}, as described in {ARTICLE}."


def _calibration_lines(record: dict[str, Any]) -> dict[str, str]:
    calibration = record["calibration"]
    test, t = calibration["test"], calibration["temperature"]
    return {
        "temperature": f"{t}: probabilities are softmax(logits / {t})",
        "fitted on": calibration["fitted_on"],
        "MNIST test set": (
            f"expected calibration error {test['before']['ece']:.2%} at T = 1, {test['after']['ece']:.2%} calibrated; "
            f"mean confidence {test['before']['mean_confidence']:.2%} -> {test['after']['mean_confidence']:.2%} "
            f"for an accuracy of {test['accuracy']:.2%}"
        ),
    }


def _recipe_lines(record: dict[str, Any]) -> dict[str, str]:
    machine = record.get("machine")
    if isinstance(machine, dict):
        threads = machine.get("torch_threads")
        machine = f"{machine.get('cpu')}, {threads} torch thread{'' if threads == 1 else 's'}"
    return {
        "images": f"the {record['train_images']:,} MNIST training images",
        "recipe": recipe_summary(record),
        "command": f"`{record['command']}`",
        "wall time": f"{record['wall_seconds'] / 60:.0f} minutes on {machine}",
    }
