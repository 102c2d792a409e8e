"""What the commands load: a checkpoint file or shipped weights, as a digit classifier, with its temperature.

Shared by `bnvit predict`, `bnvit demo` and `bnvit calibrate` (`bnvit.app.cli`); every problem is a
`CommandError` with a one-line message naming the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from .._util.device import resolve_device
from ..data.digits import MNIST_SIZE
from ..models.vit import ViT
from ..weights.calibration import read_calibration, shipped_temperature
from ..weights.loading import SHIPPED, load_model

__all__ = ["SHIPPED_MODEL", "CommandError"]

SHIPPED_MODEL = "vitbnffn_mnist"
"""What `bnvit predict` uses without `--checkpoint`: bnvit's ViTBNFFN trained on MNIST."""


class CommandError(Exception):
    """A user error to report in one message (exit status 2), without a traceback."""


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as err:
        raise CommandError(f"--device: {err}") from err


def _source(checkpoint: str | None, model: str | None) -> str | None:
    """What `--checkpoint PATH` or `--model NAME` asks to load (a path, or shipped weights' name); None: the default."""
    if model is not None and checkpoint is not None:
        raise CommandError(f"--model {model} and --checkpoint {checkpoint}: give one of them")
    if model is not None and model not in SHIPPED:
        raise CommandError(
            f"--model {model!r}: no weights ship with bnvit under that name; choose from {', '.join(SHIPPED)}"
        )
    return model if model is not None else checkpoint


def _is_shipped(source: str) -> bool:
    """Whether `source` names weights shipped with bnvit (and no file of that name is there to mean otherwise)."""
    return source in SHIPPED and not Path(source).exists()


def _load_classifier(path: str, device: torch.device) -> ViT:
    """A checkpoint file's digit classifier, or the shipped weights `path` names (`vitln_mnist`)."""
    if _is_shipped(path):
        return _load_shipped(device, path)
    try:
        model = load_model(path, map_location=device)
    except FileNotFoundError as err:
        raise CommandError(f"checkpoint {path}: file not found") from err
    except IsADirectoryError as err:
        raise CommandError(f"checkpoint {path}: is a folder, not a checkpoint file") from err
    except (ValueError, RuntimeError, OSError) as err:
        if "as a PyTorch checkpoint" in str(err):  # torch.load itself failed: not a checkpoint at all
            raise CommandError(
                f"checkpoint {path}: not a PyTorch checkpoint file (torch.load with weights_only=True cannot read it)"
            ) from err
        raise CommandError(f"checkpoint {path}: not a bnvit or reference ViT checkpoint: {err}") from err
    c = model.config
    if c["in_chans"] != 1 or tuple(c["img_size"]) != (MNIST_SIZE, MNIST_SIZE) or c["num_classes"] != 10:
        h, w = c["img_size"]
        raise CommandError(
            f"checkpoint {path}: holds a model for {h}x{w}x{c['in_chans']} images with {c['num_classes']} classes; "
            f"bnvit predict classifies digits and needs a {MNIST_SIZE}x{MNIST_SIZE}x1 model with 10 classes"
        )
    return model


def _checkpoint_temperature(path: str) -> float:
    """The temperature `bnvit calibrate` wrote beside the checkpoint, else 1 (the raw softmax); shipped weights' own."""
    if _is_shipped(path):
        return shipped_temperature(path) or 1.0
    try:
        return read_calibration(path) or 1.0
    except (ValueError, OSError) as err:
        raise CommandError(f"checkpoint {path}: {err}") from err


def _load_shipped(device: torch.device, name: str = SHIPPED_MODEL) -> ViT:
    try:
        return timm.create_model(name, pretrained=True).to(device).eval()
    except (ValueError, OSError) as err:
        raise CommandError(f"the weights shipped as {name} cannot be used: {err}") from err
