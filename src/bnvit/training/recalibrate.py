"""`recalibrate_bn`: BatchNorm running statistics recomputed with the weights frozen ("precise BN")."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._util import checks as _checks
from .._util.device import resolve_device
from . import inputs
from .inputs import TrainData

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: TrainData,
    num_batches: int | None = None,
    *,
    batch_size: int = 100,
    device: str | torch.device = "auto",
) -> nn.Module:
    """Recompute every BatchNorm's running statistics with the weights frozen ("precise BN").

    The statistics become the exact average over `num_batches` batches (other layers in eval
    mode). Useful after fine-tuning, before `fold_batchnorm`, or after a large final learning rate.

    Args:
        model: The model; modified in place and returned.
        data: Anything `fit` accepts as data (use the training distribution).
        num_batches: How many batches to average over (all of `data` if `None`).
        batch_size: Batch size for datasets and tensors.
        device: Where to run.

    Returns:
        `model`, in the mode it was in.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> model = recalibrate_bn(ViTBNFFN(depth=1), (torch.rand(50, 1, 28, 28), torch.zeros(50, dtype=torch.long)),
        ...                        device="cpu")
        >>> int(model.blocks[0].ffn.norm.bn.num_batches_tracked)
        1
    """
    if num_batches is not None:
        num_batches = _checks.positive_int("num_batches", num_batches)
    device = resolve_device(device)
    loader = inputs.as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=device, seed=0)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError("the model has no BatchNorm layer with running statistics to recalibrate")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.to(device).eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over batches
        m.train()
    try:
        for step, (images, _) in enumerate(loader, start=1):
            model(inputs.images_to(images, device, inputs.model_dtype(model)))
            if num_batches is not None and step >= num_batches:
                break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model
