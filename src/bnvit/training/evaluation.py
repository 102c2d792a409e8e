"""`evaluate()`: the mean loss and top-1 accuracy of a classifier, in eval mode, over every process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util.device import autocast, resolve_precision
from . import inputs
from .inputs import TrainData
from .run import StepSettings
from .world import alone

__all__ = ["evaluate", "evaluate_loader"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TrainData,
    *,
    batch_size: int = 5000,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy of `model` on `data`, in eval mode.

    Args:
        model: A classifier returning `(batch, num_classes)` logits.
        data: Anything `fit` accepts as data.
        batch_size: Batch size for datasets and tensors.
        device: Where to evaluate; the model is moved there.
        precision: `"fp32"`, `"bf16"`, `"fp16"` or `"auto"`.
        loss_fn: Loss; cross-entropy by default.

    Returns:
        `{"loss": ..., "acc": ..., "n": ...}`.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> images, labels = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
        >>> sorted(evaluate(ViTBNFFN(depth=1), (images, labels), device="cpu"))
        ['acc', 'loss', 'n']
    """
    world = alone(device)
    loader = inputs.as_loader(data, name="data", batch_size=batch_size, shuffle=False, device=world.device, seed=0)
    settings = StepSettings(
        world=world,
        precision=resolve_precision(precision, world.device),
        loss_fn=loss_fn or F.cross_entropy,
        dtype=inputs.model_dtype(model),
        num_classes=inputs.preflight(model.to(world.device), loader, "data", world.device),
    )
    return evaluate_loader(model, loader, settings, "evaluation")


def evaluate_loader(model: nn.Module, loader: Any, s: StepSettings, split: str = "validation") -> dict:
    """Loss and accuracy over `loader`, summed over every process of the world."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.int64)
    n, check, problem, where = 0, not inputs.checked_up_front(loader), None, f"{split} data"
    try:
        with torch.no_grad():
            for step, (images, labels) in enumerate(loader, start=1):
                problem = inputs.batch_problem(images, labels, s.num_classes) if check else None
                if problem is not None:  # the processes may hold different numbers of batches: agree after the loop
                    where = f"{split} data, batch {step}"
                    break
                images, labels = inputs.to_device(images, labels, s.device, s.dtype)
                with autocast(s.device, s.precision):
                    logits = model(images)
                loss_sum += s.loss_fn(logits.float(), labels).double() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                n += len(labels)
    finally:
        model.train(was_training)
    if check:
        inputs.raise_together(s.world, problem, where)
    loss, hits, n = s.world.sum(loss_sum, correct, n)
    return {"loss": loss / n, "acc": hits / n, "n": int(n)}
