"""BatchNorm for tokens, exact under activation checkpointing and synchronized across processes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._util import checks as _checks
from .fold import bn_scale_shift

__all__ = [
    "TORCHSCRIPT_REFUSAL",
    "CPUSyncBatchNorm",
    "FrozenBatchNorm1d",
    "TokenBatchNorm",
    "bn_safe_context_fn",
    "convert_batchnorm",
    "freeze_batchnorm",
    "in_recomputation",
    "restore_batchnorm",
    "set_bn_hyperparameters",
    "synced_batchnorm",
    "unfreeze_batchnorm",
]

_TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu")  # where torch's own SyncBatchNorm synchronizes

_recompute = threading.local()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    """Mark the recomputation pass of activation checkpointing (see `bn_safe_checkpoint`)."""
    previous = getattr(_recompute, "active", False)
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = previous


def bn_safe_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint` under which BatchNorm statistics update once per step."""
    return contextlib.nullcontext(), _recomputing()


def in_recomputation() -> bool:
    """Whether this forward is a recomputation by autograd (activation checkpointing); False when compiling.

    Examples:
        >>> in_recomputation()
        False
    """
    if getattr(_recompute, "active", False):
        return True
    return not torch.compiler.is_compiling() and _graph_task_id() != -1


# The id of the autograd graph task this thread is executing, -1 outside a backward pass (what
# torch.utils.checkpoint itself asks). Should a PyTorch release drop it, only `bn_safe_context_fn` is
# recognised, and tests/test_timm_blocks.py says so.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


TORCHSCRIPT_REFUSAL = (
    "TorchScript cannot compile bnvit's models (einops, and BatchNorm statistics kept exact under activation "
    "checkpointing through Python state); use torch.export.export(model, (x,)), torch.compile or "
    "bnvit.export_onnx instead"
)
"""What `torch.jit.script` says for a bnvit model or block (TorchScript is deprecated in PyTorch)."""


def set_bn_hyperparameters(model: nn.Module, momentum: float | None = None, eps: float | None = None) -> nn.Module:
    """Set every BatchNorm's momentum and eps in `model` (`None`: unchanged), validated as in `ViTConfig`.

    Raises:
        ValueError: momentum outside (0, 1], or eps not finite and > 0.
    """
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, int | float):
            raise TypeError(f"bn_momentum must be a number in (0, 1], got {momentum!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {momentum}")
    if eps is not None:
        eps = _checks.positive_float("bn_eps", eps)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = module.momentum if momentum is None else float(momentum)
            module.eps = module.eps if eps is None else eps
    return model


class FrozenBatchNorm1d(nn.Module):
    """A `BatchNorm1d` frozen to its eval-mode map; its state dict keys are a BatchNorm's."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps
        n = bn.num_features
        like = dict(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        weight = torch.ones(n, **like) if bn.weight is None else bn.weight.detach().clone()
        bias = torch.zeros(n, **like) if bn.bias is None else bn.bias.detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return x * scale + (self.bias - self.running_mean * scale)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every `BatchNorm1d` in `model` by a `FrozenBatchNorm1d`, in place; returns `model`.

    `timm.utils.freeze` freezes only `BatchNorm2d`; `unfreeze_batchnorm` undoes this.

    Examples:
        >>> from bnvit import ViTBNFFN
        >>> model = freeze_batchnorm(ViTBNFFN(depth=1))
        >>> type(model.blocks[0].ffn.norm.bn).__name__
        'FrozenBatchNorm1d'
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm1d) and child.track_running_stats:
            setattr(model, name, FrozenBatchNorm1d(child))
        else:
            freeze_batchnorm(child)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every `FrozenBatchNorm1d` in `model` back into a trainable `BatchNorm1d` (same values), in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, FrozenBatchNorm1d):
            bn = nn.BatchNorm1d(child.num_features, eps=child.eps, device=child.weight.device, dtype=child.weight.dtype)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            unfreeze_batchnorm(child)
    return model


class TokenBatchNorm(nn.Module):
    """BatchNorm of the last axis over every other axis, as `self.bn` (a `BatchNorm1d`) on the `(B * N, C)` view.

    Examples:
        >>> norm = TokenBatchNorm(64)
        >>> norm(torch.randn(8, 17, 64)).shape
        torch.Size([8, 17, 64])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(TORCHSCRIPT_REFUSAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and in_recomputation():
            with _scratch_running_stats(self.bn):
                out = self.bn(flat)
        else:
            out = self.bn(flat)
        return out.view(x.shape)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The eval-mode `ScaleShift` of this norm, for timm's `reparameterize_model` when no Linear takes it."""
        return bn_scale_shift(self.bn)


@contextlib.contextmanager
def _scratch_running_stats(bn: nn.modules.batchnorm._BatchNorm) -> Iterator[None]:
    """Let `bn` update copies of its running statistics; the originals (and their version counters) stay untouched."""
    originals = {
        n: b for n in ("running_mean", "running_var", "num_batches_tracked") if (b := getattr(bn, n)) is not None
    }
    for name, buffer in originals.items():
        setattr(bn, name, buffer.clone())
    try:
        yield
    finally:
        for name, buffer in originals.items():
            setattr(bn, name, buffer)


# ----------------------------------------------------------------------------- BatchNorm across processes


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the samples of every process via `all_reduce`; statistics in float64, two passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # type: ignore[override]
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x.to(compute)
        stats = torch.cat(
            [xc.sum(dims, dtype=torch.float64), xc.new_tensor([x.numel() // channels], dtype=torch.float64)]
        )
        dist.all_reduce(stats, group=group)
        count = stats[-1]
        if count.item() < 2:
            raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got {int(count)}")
        mean = stats[:-1] / count
        centered = xc - mean.to(compute).view(shape)
        m2 = centered.square().sum(dims, dtype=torch.float64)
        dist.all_reduce(m2, group=group)
        var = m2 / count
        invstd = torch.rsqrt(var + eps).to(compute)
        out = centered * invstd.view(shape)
        if weight is not None:
            out = out * weight.to(compute).view(shape) + bias.to(compute).view(shape)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean.to(compute), invstd)
        ctx.count, ctx.group = count, group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        compute = invstd.dtype
        dy = grad_out.to(compute)
        xhat = (x.to(compute) - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy = (sums[:channels] / ctx.count).to(compute).view(shape)
            mean_dy_xhat = (sums[channels:] / ctx.count).to(compute).view(shape)
            scale = invstd if weight is None else invstd * weight.to(compute)
            grad_x = ((dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm with statistics over all processes' samples via `all_reduce`, on any device (gloo too).

    Examples:
        >>> bn = CPUSyncBatchNorm(8)
        >>> bn(torch.randn(4, 8)).shape  # no process group: a plain BatchNorm
        torch.Size([4, 8])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        group = self.process_group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if bn_training and self.training and group is not None and dist.get_world_size(group) > 1:
            return _SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group
            )
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    original: _BatchNorm
    synced: _BatchNorm


def convert_batchnorm(model: nn.Module, device: torch.device | str = "cpu") -> list[_Swap]:
    """Replace every BatchNorm in `model` by a synchronized one sharing its state, in place.

    `SyncBatchNorm` where torch supports `device`, else `CPUSyncBatchNorm`; returns what
    `restore_batchnorm` needs. Raises `ValueError` if `model` itself is a BatchNorm.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> swaps = convert_batchnorm(model)
        >>> type(model[1]).__name__
        'CPUSyncBatchNorm'
        >>> restore_batchnorm(swaps)
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    torch_syncs = torch.device(device).type in (*_TORCH_SYNC_DEVICES, torch._C._get_privateuse1_backend_name())
    kind = nn.SyncBatchNorm if torch_syncs else CPUSyncBatchNorm
    swaps = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm) or isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm)):
            continue
        if not name:
            raise ValueError(f"the model itself is a {type(module).__name__}; use sync_bn=False")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        synced = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        synced._parameters.update(module._parameters)
        synced._buffers.update(module._buffers)
        synced.train(module.training)
        setattr(parent, attr, synced)
        swaps.append(_Swap(parent, attr, module, synced))
    return swaps


def restore_batchnorm(swaps: list[_Swap]) -> None:
    """Undo `convert_batchnorm`: the original layers, holding the current state.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> restore_batchnorm(convert_batchnorm(model))
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    for swap in reversed(swaps):
        swap.original._parameters.update(swap.synced._parameters)
        swap.original._buffers.update(swap.synced._buffers)
        swap.original.train(swap.synced.training)
        setattr(swap.parent, swap.name, swap.original)


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Synchronize `model`'s BatchNorms (if `enabled`) inside the block, restoring them after.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> with synced_batchnorm(model, enabled=True, device="cpu"):
        ...     type(model[1]).__name__
        'CPUSyncBatchNorm'
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    swaps = convert_batchnorm(model, device) if enabled else []
    try:
        yield model
    finally:
        restore_batchnorm(swaps)


def token_norm(kind: str, dim: int) -> nn.Module:
    """A normalization of the last axis of a token tensor: `"ln"` (LayerNorm) or `"bn"`.

    Examples:
        >>> type(token_norm("bn", 64)).__name__, type(token_norm("ln", 64)).__name__
        ('TokenBatchNorm', 'LayerNorm')
    """
    _checks.choice("token norm", kind, ("ln", "bn"))
    return nn.LayerNorm(dim) if kind == "ln" else TokenBatchNorm(dim)
