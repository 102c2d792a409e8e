"""Fold BatchNorm into neighbouring Linears for inference via each module's `fuse()` (docs/folding.md)."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._util.checks import check_bn_statistics

__all__ = [
    "FoldingSequential",
    "ScaleShift",
    "bn_scale_shift",
    "fold_affine_before_linear",
    "fold_batchnorm",
    "fold_bn_after_linear",
    "fold_bn_before_linear",
    "fold_sequential",
]


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode map of `bn` as float64 `(scale, shift)`."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it has no running statistics (track_running_stats=False)")
    mean = bn.running_mean.double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


class ScaleShift(nn.Module):
    """`x * scale + shift` over the last axis: an eval-mode BatchNorm with nothing to fold into."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def bn_scale_shift(bn: _BatchNorm) -> ScaleShift:
    """The eval-mode map of `bn` as a `ScaleShift`, in `bn`'s dtype and device.

    Examples:
        >>> bn = nn.BatchNorm1d(3).eval()
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(bn_scale_shift(bn)(x), bn(x), atol=1e-6)
        True
    """
    scale, shift = _bn_affine(bn)
    like = bn.running_mean
    return ScaleShift(scale.to(like.dtype), shift.to(like.dtype))


def _new_linear(like: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out = nn.Linear(like.in_features, like.out_features, bias=True, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out.train(like.training)


def fold_bn_after_linear(linear: nn.Linear, bn: _BatchNorm) -> nn.Linear:
    """A new Linear equal to `bn(linear(x))` in eval mode.

    Examples:
        >>> lin, bn = nn.Linear(4, 3), nn.BatchNorm1d(3).eval()
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fold_bn_after_linear(lin, bn)(x), bn(lin(x)), atol=1e-6)
        True
    """
    scale, shift = _bn_affine(bn)
    weight = linear.weight.double() * scale[:, None]
    bias = shift if linear.bias is None else linear.bias.double() * scale + shift
    return _new_linear(linear, weight, bias)


def fold_bn_before_linear(bn: _BatchNorm, linear: nn.Linear) -> nn.Linear:
    """A new Linear equal to `linear(bn(x))` in eval mode.

    Examples:
        >>> bn, lin = nn.BatchNorm1d(4).eval(), nn.Linear(4, 3)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fold_bn_before_linear(bn, lin)(x), lin(bn(x)), atol=1e-6)
        True
    """
    weight, bias = fold_affine_before_linear(*_bn_affine(bn), linear.weight, linear.bias)
    return _new_linear(linear, weight, bias)


def fold_affine_before_linear(
    scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of `x -> W (scale * x + shift) + b`, computed in float64.

    Examples:
        >>> lin = nn.Linear(4, 3)
        >>> s, t, x = torch.rand(4) + 0.5, torch.randn(4), torch.randn(5, 4)
        >>> w, b = fold_affine_before_linear(s, t, lin.weight, lin.bias)
        >>> torch.allclose(x @ w.T + b, lin(x * s + t), atol=1e-6)
        True
    """
    w = weight.detach().double()
    folded_bias = w @ shift.detach().double()
    if bias is not None:
        folded_bias = folded_bias + bias.detach().double()
    folded = w * scale.detach().double()[None, :]
    return folded.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm next to a Linear into it, for inference (same eval outputs up to rounding).

    Args:
        model: A model in eval mode.
        inplace: Fold `model` itself instead of a copy.

    Returns:
        The folded model, in eval mode.

    Raises:
        TypeError: If `model` is not an `nn.Module`.
        ValueError: If a module is in training mode or a BatchNorm holds impossible statistics.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> model = ViTBNFFN(depth=2).eval()
        >>> folded = fold_batchnorm(model)
        >>> x = torch.rand(4, 1, 28, 28)
        >>> bool((folded(x) - model(x)).abs().max() < 1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm needs a torch.nn.Module, got {model!r} ({type(model).__name__})")
    in_training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if in_training:
        raise ValueError(
            "fold_batchnorm needs a model in eval mode: in training mode BatchNorm normalizes with "
            f"batch statistics, which cannot be folded. Call model.eval() first (in training mode: {in_training[0]})"
        )
    check_bn_statistics(model, "fold_batchnorm: the model")
    if not inplace:
        model = copy.deepcopy(model)
    if _owns_fuse(model):
        model = model.fuse()
    if isinstance(model, nn.Sequential):
        fold_sequential(model)
    _fold_children(model)
    return model.eval()


def _fold_children(module: nn.Module) -> None:
    """Fold each child (its `fuse()`, or the pairs of an `nn.Sequential`), then its children: timm's walk."""
    for name, child in list(module.named_children()):
        if _owns_fuse(child):
            folded = child.fuse()
            if folded is not child:
                setattr(module, name, folded)
            child = folded
        elif isinstance(child, nn.Sequential):
            fold_sequential(child)
        _fold_children(child)


def _owns_fuse(module: nn.Module) -> bool:
    """Whether `module` has bnvit's `fuse()` (also when a user subclasses a bnvit module)."""
    fuse = getattr(type(module), "fuse", None)
    return callable(fuse) and getattr(fuse, "__module__", "").startswith("bnvit.")


class FoldingSequential(nn.Sequential):
    """An `nn.Sequential` whose `fuse()` folds its `Linear -> BatchNorm1d` pairs, so `reparameterize_model` folds MLPs.

    Examples:
        >>> seq = FoldingSequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
        >>> [type(m).__name__ for m in seq.fuse()]
        ['Linear', 'Identity', 'ReLU']
    """

    def fuse(self) -> FoldingSequential:
        """Fold each `Linear -> BatchNorm1d` pair in place (eval mode only); returns `self`."""
        fold_sequential(self)
        return self


@torch.no_grad()
def fold_sequential(seq: nn.Sequential) -> None:
    """Fold `Linear -> BatchNorm1d` pairs of an `nn.Sequential` in place, leaving `nn.Identity` in each BN's slot.

    Examples:
        >>> seq = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
        >>> fold_sequential(seq)
        >>> [type(m).__name__ for m in seq]
        ['Linear', 'Identity', 'ReLU']
    """
    names = list(seq._modules)
    for first, second in itertools.pairwise(names):
        linear, bn = seq._modules[first], seq._modules[second]
        if isinstance(linear, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            seq._modules[first] = fold_bn_after_linear(linear, bn)
            seq._modules[second] = nn.Identity()
