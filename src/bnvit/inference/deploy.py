"""Inference-ready models: BatchNorm folded, optionally compiled, and exported to ONNX."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util.checks import check_bn_statistics, first_line
from .._util.device import resolve_device
from .._util.io import atomic_path, check_writable
from ..models.fold import fold_batchnorm
from ..models.vit import ViT

__all__ = ["ONNX_INPUT_NAME", "ONNX_OUTPUT_NAME", "export_onnx", "for_inference"]

ONNX_INPUT_NAME = "images"
"""Name of the input of the ONNX files `export_onnx` writes: float32 `(batch, C, H, W)` in [0, 1]."""
ONNX_OUTPUT_NAME = "logits"
"""Name of the output of the ONNX files `export_onnx` writes: float32 `(batch, num_classes)`."""

_ONNX_EXTRA = 'pip install "bnvit[onnx]"'


def for_inference(
    model: nn.Module,
    *,
    fold: bool = True,
    compile: bool = False,
    script: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """An inference-ready copy of `model`: eval mode, BatchNorm folded, no gradients; `model` is untouched.

    Args:
        fold: Fold every BatchNorm next to a Linear into it (`bnvit.fold_batchnorm`).
        compile: Wrap the copy in `torch.compile`.
        script: Return a `torch.jit.script` module (plain modules only; deprecated in PyTorch).
        device: Move the copy there (`"auto"` too); default: where `model` is.

    Returns:
        The copy (a `torch.compile` wrapper or TorchScript module when asked for).

    Raises:
        TypeError: If `model` is not an `nn.Module` or a flag is not a bool.
        ValueError: Both `compile` and `script`, an invalid `device`, or impossible BatchNorm statistics.
        NotImplementedError: If `script=True` and TorchScript cannot compile the model.

    Examples:
        >>> import torch
        >>> import bnvit
        >>> from bnvit import ViTBN, for_inference
        >>> model = ViTBN(depth=2).eval()
        >>> fast = for_inference(model)
        >>> norms = (nn.LayerNorm, nn.BatchNorm1d, bnvit.TokenBatchNorm)
        >>> sum(isinstance(m, norms) for m in fast.modules())  # a folded ViTBN has none left
        0
        >>> x = torch.rand(4, 1, 28, 28)
        >>> bool((fast(x) - model(x)).abs().max() < 1e-5), model.training, fast.training
        (True, False, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"for_inference needs a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("fold", fold), ("compile", compile), ("script", script)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if compile and script:
        raise ValueError("compile=True and script=True exclude each other: choose torch.compile or TorchScript")
    target = None if device is None else resolve_device(device)
    check_bn_statistics(model, "for_inference: the model")

    inference = copy.deepcopy(model).eval()
    if target is not None:
        inference = inference.to(target)
    if fold:
        inference = fold_batchnorm(inference, inplace=True)
    inference.requires_grad_(False)

    if script:
        return _script(inference)
    if compile:
        return torch.compile(inference)
    return inference


def _script(model: nn.Module) -> nn.Module:
    try:
        return torch.jit.script(model)
    except Exception as err:  # TorchScript raises several kinds of frontend errors
        why = (
            "its patch embedding calls einops.rearrange, a function with **kwargs, which TorchScript does not support"
            if isinstance(model, ViT)
            else "TorchScript does not support part of its code"
        )
        detail = first_line(err).rstrip(":")
        raise NotImplementedError(
            f"script=True: torch.jit.script cannot compile {type(model).__name__}: {why} "
            f"({type(err).__name__}: {detail}). TorchScript is deprecated in PyTorch; use "
            "for_inference(model, compile=True) for a faster model in Python, bnvit.export_onnx(model, path) for a "
            "portable file, or torch.export.export(model, (images,)) for an ahead-of-time graph"
        ) from err


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"export_onnx needs the optional packages {', '.join(missing)}, which are not installed; "
            f"install them with: {_ONNX_EXTRA}"
        )


def _example_input(model: nn.Module, example_input: torch.Tensor | None, batch: int) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
        if example_input.ndim < 1 or example_input.shape[0] < 2:
            raise ValueError(
                f"example_input needs a batch of at least 2 (a batch of 1 would be baked into the graph), "
                f"got shape {tuple(example_input.shape)}"
            )
        return example_input.detach().float().cpu()
    if isinstance(model, ViT):
        c = model.config
        return torch.rand(batch, c["in_chans"], *c["img_size"])
    raise ValueError(
        f"export_onnx cannot guess the input shape of a {type(model).__name__}; pass example_input=, "
        "a float tensor of shape (batch >= 2, ...) like the real inputs"
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    opset: int | None = None,
    batch_size_dynamic: bool = True,
    example_input: torch.Tensor | None = None,
) -> Path:
    """Export `for_inference(model)` to an ONNX file (input `"images"`, output `"logits"`), written atomically.

    Args:
        model: A `ViT`, or another module with `example_input`.
        path: The `.onnx` file; its folder is created if needed.
        fold: Fold BatchNorm into the neighbouring Linear layers first.
        opset: ONNX opset (>= 18); default: the exporter's.
        batch_size_dynamic: Make the batch axis dynamic.
        example_input: An input to trace with (batch >= 2 if dynamic); needed for non-`ViT` modules.

    Returns:
        The path written.

    Raises:
        ImportError: If onnx or onnxscript is not installed (`pip install "bnvit[onnx]"`).
        ValueError: Bad `opset`, an input shape that cannot be inferred, impossible BatchNorm statistics.
        OSError: If `path` cannot be written (checked before exporting).

    Examples:
        >>> import tempfile, pathlib
        >>> from bnvit import ViTBN, export_onnx
        >>> folder = tempfile.mkdtemp()
        >>> path = export_onnx(ViTBN(depth=1).eval(), pathlib.Path(folder) / "vitbn.onnx")  # doctest: +SKIP
        >>> import onnxruntime, numpy as np  # doctest: +SKIP
        >>> session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # doctest: +SKIP
        >>> session.run(None, {"images": np.random.rand(3, 1, 28, 28).astype(np.float32)})[0].shape  # doctest: +SKIP
        (3, 10)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an int >= 18 (the torch.export-based ONNX exporter), got {opset!r}")
    if not isinstance(batch_size_dynamic, bool):
        raise TypeError(f"batch_size_dynamic must be a bool, got {batch_size_dynamic!r}")
    _require_onnx()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx needs a file path, {path} is a folder")
    check_bn_statistics(model, "export_onnx: the model")
    check_writable(path.parent, f"folder of {path.name}")  # before the export, which takes seconds

    inference = for_inference(model, fold=fold, device="cpu")
    images = _example_input(inference, example_input, batch=2 if batch_size_dynamic else 1)
    kwargs: dict[str, Any] = {}
    if batch_size_dynamic:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    program = torch.onnx.export(
        inference,
        (images,),
        dynamo=True,
        input_names=[ONNX_INPUT_NAME],
        output_names=[ONNX_OUTPUT_NAME],
        opset_version=opset,
        verbose=False,
        **kwargs,
    )
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
    return path
