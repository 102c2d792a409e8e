"""Transformer building blocks with a choice of normalization.

The one idea of this library lives here: `BatchNormFFN`, a feed-forward network with a
BatchNorm between its two Linear layers and no LayerNorm in front of it. `EncoderBlock`
takes the normalization as one argument:

| `norm`     | attention pre-norm | feed-forward                      |
|------------|--------------------|-----------------------------------|
| `"ln"`     | LayerNorm          | `FeedForward` (LayerNorm first)   |
| `"bn_ffn"` | LayerNorm          | `BatchNormFFN`                    |
| `"bn"`     | `TokenBatchNorm`   | `BatchNormFFN`                    |

BatchNorm on tokens normalizes each feature over the batch *and* the token axis: a
`(B, N, C)` tensor is normalized as its `(B * N, C)` view, with no copy to a
channels-first layout.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from . import _checks
from .fuse import fold_bn_after_linear, fold_bn_before_linear

__all__ = [
    "NORMS",
    "Attention",
    "BatchNormFFN",
    "EncoderBlock",
    "FeedForward",
    "TokenBatchNorm",
    "attend",
    "bn_safe_context_fn",
    "in_recomputation",
    "self_attention",
    "token_norm",
]

NORMS = ("ln", "bn_ffn", "bn")
"""The valid values of `norm` for `EncoderBlock` and `ViT`."""

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
    """`context_fn` for `torch.utils.checkpoint.checkpoint` that keeps BatchNorm exact.

    Activation checkpointing runs a block's forward twice. A BatchNorm in training mode would
    then update its running statistics twice per step; during the recomputation this context
    makes every `TokenBatchNorm` restore its statistics after the pass, so a model
    trained with checkpointing ends with the same running statistics as one trained without.
    `TokenBatchNorm` also recognises a recomputation without it (see `in_recomputation`), so
    timm's `checkpoint` / `checkpoint_seq`, which take no `context_fn`, are exact too.
    """
    return contextlib.nullcontext(), _recomputing()


def in_recomputation() -> bool:
    """Whether the forward pass running now is activation checkpointing's recomputation.

    True inside `bn_safe_context_fn`'s recomputation context, and for any forward pass run by the
    autograd engine during a backward pass: that is where `torch.utils.checkpoint` recomputes
    (reentrant or not, whoever calls it: bnvit's ViT, timm's `checkpoint` and `checkpoint_seq`).
    Under `torch.compile` / `torch.export` it is False: a compiled graph applies the running-statistics
    update of its forward once.

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


class TokenBatchNorm(nn.Module):
    """BatchNorm of the last (feature) axis, with statistics over every other axis.

    A `(B, N, C)` token tensor is normalized as its `(B * N, C)` view: each feature gets one
    mean and variance computed over the batch and the tokens. The wrapped
    `torch.nn.BatchNorm1d` is kept as `self.bn` so that
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm` converts it correctly.

    In training mode under activation checkpointing, the recomputation of the forward pass
    leaves the running statistics as the first pass left them (`in_recomputation`): they are
    updated once per step, as without checkpointing.

    Args:
        num_features: Size `C` of the last axis.
        eps: Added to the variance for numerical stability.
        momentum: Momentum of the running statistics.
        device: Device of the parameters and statistics.
        dtype: Floating-point type of the parameters and statistics.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and in_recomputation():
            with _scratch_running_stats(self.bn):
                out = self.bn(flat)
        else:
            out = self.bn(flat)
        return out.view(x.shape)


@contextlib.contextmanager
def _scratch_running_stats(bn: nn.modules.batchnorm._BatchNorm) -> Iterator[None]:
    """Let `bn` update copies of its running statistics, dropped after: the originals are not touched.

    Not even their version counter moves, so a graph that saved them (the recomputation of a
    reentrant checkpoint backpropagates through it right after) stays valid.
    """
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


def token_norm(kind: str, dim: int) -> nn.Module:
    """A normalization of the last axis of a token tensor: `"ln"` (LayerNorm) or `"bn"`.

    Examples:
        >>> type(token_norm("bn", 64)).__name__, type(token_norm("ln", 64)).__name__
        ('TokenBatchNorm', 'LayerNorm')
    """
    _checks.choice("token norm", kind, ("ln", "bn"))
    return nn.LayerNorm(dim) if kind == "ln" else TokenBatchNorm(dim)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with torch's fused `scaled_dot_product_attention`.

    `norm(x) -> Linear(dim, 3 * heads * dim_head) -> q, k, v -> softmax(q k^T / sqrt(dim_head)) v
    -> Linear(heads * dim_head, dim) -> Dropout`. The qkv projection is laid out `q | k | v`,
    each heads-major `(heads, dim_head)`, as in the article's reference implementation.

    Args:
        dim: Token width.
        heads: Number of attention heads.
        dim_head: Width of each head; independent of `dim`.
        norm: Pre-norm kind, `"ln"` or `"bn"`.
        qkv_bias: Give the qkv projection a bias.
        dropout: Dropout after the output projection.
        attn_dropout: Dropout on the attention weights.

    Examples:
        >>> attn = Attention(64, heads=8, dim_head=64)
        >>> attn(torch.randn(2, 17, 64)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        *,
        norm: str = "ln",
        qkv_bias: bool = False,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.attn_dropout = attn_dropout
        inner = heads * dim_head
        self.norm = token_norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self_attention(
            self.norm(x),
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            self.heads,
            self.attn_dropout if self.training else 0.0,
        )
        return self.proj_drop(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold a BatchNorm pre-norm into the qkv projection, in place (eval mode only).

        The shift becomes a bias of the projection; in the factored form (`self_attention`) that is
        a `heads * dim`-wide bias inside one matrix product. Keeping the shift on the `dim`-wide
        input instead (scale into the weight, `x + t / s`) measured no faster (docs/benchmarks.md).
        """
        if isinstance(self.norm, TokenBatchNorm):
            self.qkv = fold_bn_before_linear(self.norm.bn, self.qkv)
            self.norm = nn.Identity()


def _factored_pays(dim: int, heads: int, dim_head: int, tokens: int, seq: int) -> bool:
    """Whether the factored attention of `self_attention` takes fewer multiply-adds than q, k, v.

    Per token and head, q, k, v and the output projection take `4 dim_head dim` and the two
    attention products `2 seq dim_head`; the factored form takes `2 dim^2` and `2 seq dim`, after
    forming its two `(dim, dim)` matrices per head once per call (`2 dim^2 dim_head`). `tokens <= 0`
    asks only whether it pays per token (the choice when tracing for export or compilation).
    """
    saved = 4 * dim_head * dim + 2 * seq * dim_head - 2 * dim * dim - 2 * seq * dim
    if tokens <= 0:
        return saved > 0
    return tokens * saved > 2 * dim * dim * dim_head


def self_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head self-attention of normalized tokens `x (B, N, dim)`, projections included.

    `proj(softmax(q k^T / sqrt(dim_head)) v)` with `q | k | v = x W_qkv^T + b_qkv` (heads-major),
    computed in whichever of two exactly equivalent forms takes fewer multiply-adds:

    * **standard**: the qkv projection, attention per head (`attend`), the output projection;
    * **factored** (when `dim < 2 dim_head` or so, as in the article's model: `dim = dim_head =
      64`, 8 heads): per head, `q_i . k_j = x_i (W_q^T W_k) x_j + (b_q W_k) . x_j + c_i`, where
      `c_i` does not depend on `j` and cancels in the softmax, and since each row of softmax
      weights sums to one, `W_o (sum_j a_ij v_j) = (W_o W_v) (sum_j a_ij x_j) + W_o b_v`. So the
      keys and values of every head are `x` itself; only the `(dim, dim)` products
      `W_k^T W_q` and `W_o W_v` of each head are formed (from the same parameters, so gradients
      flow to them as before). For the article's model this is 0.56x the multiply-adds of the
      attention block, all heads go through one batched product, and nothing is copied.

    A leaf for `torch.fx` (registered with `torch.fx.wrap`), so a traced model keeps the runtime
    choice. Under `torch.compile` / `torch.export` the choice is made per token (the weight
    products are then constants an exporter folds).
    """
    B, N, C = x.shape
    dim_head = qkv_weight.shape[0] // (3 * heads)
    tokens = 0 if torch.compiler.is_compiling() else B * N
    attention = _factored_attention if _factored_pays(C, heads, dim_head, tokens, N) else _standard_attention
    return attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, dropout_p)


torch.fx.wrap("self_attention")


def _standard_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float,
) -> torch.Tensor:
    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    # (B, N, 3 * heads * dim_head) -> q | k | v, each (B, heads, N, dim_head), as strided views.
    qkv = F.linear(x, qkv_weight, qkv_bias).view(B, N, 3, heads, inner // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = attend(q, k, v, dropout_p).transpose(1, 2).reshape(B, N, inner)
    return F.linear(out, proj_weight, proj_bias)


def _factored_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float,
) -> torch.Tensor:
    B, N, C = x.shape
    inner = qkv_weight.shape[0] // 3
    dim_head = inner // heads
    wq, wk, wv = qkv_weight.view(3, heads, dim_head, C).unbind(0)  # (heads, dim_head, dim)
    # Row h * dim + c of `w_scores` is column c of W_q,h^T W_k,h: t = x w_scores^T gives t_h = x W_q,h^T W_k,h.
    w_scores = (wk.transpose(1, 2) @ wq).mul(dim_head**-0.5).reshape(heads * C, C)
    wo = proj_weight.view(C, heads, dim_head).transpose(0, 1)  # (heads, dim, dim_head)
    w_out = (wo @ wv).transpose(0, 1).reshape(C, heads * C)  # column h * dim + c: (W_o,h W_v,h)[:, c]
    b_scores = b_out = None
    if qkv_bias is not None:
        bq, _, bv = qkv_bias.view(3, heads, 1, dim_head).unbind(0)
        b_scores = (bq @ wk).mul(dim_head**-0.5).reshape(heads * C)
        b_out = proj_weight @ bv.reshape(inner)
        b_out = b_out if proj_bias is None else b_out + proj_bias
    else:
        b_out = proj_bias
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # One fused attention for all heads, keys and values `x` shared by the heads (as in multi-query attention).
        # Tokens as one (B * N, dim) matrix: the bias of each projection is part of its product
        # (an ONNX Gemm) instead of a separate pass over the output.
        q = F.linear(x.reshape(B * N, C), w_scores, b_scores).view(B, N, heads, C).transpose(1, 2)
        kv = x.unsqueeze(1).expand(B, heads, N, C)
        mixed = attend(q, kv, kv, dropout_p, scale=1.0).transpose(1, 2).reshape(B, N, heads * C)
        return F.linear(mixed.view(B * N, heads * C), w_out, b_out).view(B, N, C)
    # Eager CPU: two batched products, no copy (a few dozen tokens are too few for the fused kernel).
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))  # cast once for the three products that read it
    t = F.linear(x.reshape(B * N, C), w_scores, b_scores)  # (B * N, heads * dim) = (B, N * heads, dim)
    scores = t.view(B, N * heads, C) @ x.transpose(1, 2)  # (B, N * heads, N): scores[b, i * heads + h, j]
    weights = F.dropout(scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)), dropout_p)
    weights = weights.to(x.dtype)
    mixed = weights @ x  # (B, N * heads, dim) = (B, N, heads * dim): sum_j a_ij x_j for every head
    return F.linear(mixed.view(B * N, heads * C), w_out, b_out).view(B, N, C)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """`softmax(scale q k^T) v` with torch's fused kernel, or a faster path under CPU autocast.

    `scale` defaults to `1 / sqrt(d)`, `d = q.shape[-1]`.

    A leaf for `torch.fx` (registered with `torch.fx.wrap`): a traced model keeps this runtime
    choice of kernel instead of freezing the one seen while tracing.
    """
    if torch.is_autocast_enabled("cpu") and q.device.type == "cpu":
        return _cpu_autocast_attention(q, k, v, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


torch.fx.wrap("attend")


def _cpu_autocast_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v under CPU autocast: bf16 batched products around an fp32 softmax.

    At a few dozen tokens the CPU's fused attention kernel is about 4x slower in bf16 than in
    fp32, and in fp32 still about 2x slower than this (measured in benchmarks/, see
    docs/benchmarks.md); on CUDA the fused kernel is used in every precision.
    """
    scores = (q @ k.transpose(-2, -1)).float().mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    weights = F.dropout(scores.softmax(-1), dropout_p)
    return weights.to(v.dtype) @ v


class FeedForward(nn.Module):
    """The standard ViT feed-forward network, pre-normed with LayerNorm.

    `LayerNorm(dim) -> Linear(dim, mlp_dim) -> GELU -> Dropout -> Linear(mlp_dim, dim) -> Dropout`.

    Examples:
        >>> ffn = FeedForward(64, 128)
        >>> ffn(torch.randn(2, 17, 64)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(self.norm(x))))
        return self.drop2(self.fc2(x))


class BatchNormFFN(nn.Module):
    """Feed-forward network with BatchNorm inside and no LayerNorm in front (ViTBNFFN).

    `Linear(dim, mlp_dim) -> BatchNorm(mlp_dim) -> GELU -> Dropout -> Linear(mlp_dim, dim) -> Dropout`.
    The BatchNorm normalizes each of the `mlp_dim` features over batch x tokens. In eval mode
    it is a fixed affine map that `bnvit.fold_batchnorm` folds into `fc1`.

    The keyword-only arguments generalise it to any FFN of this form (`bnvit.BatchNormMlp`
    builds it from timm's `Mlp` arguments).

    Args:
        dim: Token width.
        mlp_dim: Hidden width.
        dropout: Dropout after the activation and after `fc2`, or a pair `(after act, after fc2)`.
        out_dim: Output width (default: `dim`).
        bias: Give `fc1` and `fc2` a bias, or a pair `(fc1, fc2)`.
        act_layer: The activation's class (called without arguments).
        device: Device of the parameters.
        dtype: Floating-point type of the parameters.

    Examples:
        >>> ffn = BatchNormFFN(64, 128)
        >>> ffn(torch.randn(2, 17, 64)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        dropout: float | tuple[float, float] = 0.0,
        *,
        out_dim: int | None = None,
        bias: bool | tuple[bool, bool] = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        drop1, drop2 = dropout if isinstance(dropout, tuple) else (dropout, dropout)
        bias1, bias2 = bias if isinstance(bias, tuple) else (bias, bias)
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, mlp_dim, bias=bias1, **dd)
        self.norm = TokenBatchNorm(mlp_dim, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.fc2 = nn.Linear(mlp_dim, dim if out_dim is None else out_dim, bias=bias2, **dd)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.norm(self.fc1(x))))
        return self.drop2(self.fc2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into `fc1`, in place (eval mode only): `fc1` then does both."""
        if isinstance(self.norm, TokenBatchNorm):
            self.fc1 = fold_bn_after_linear(self.fc1, self.norm.bn)
            self.norm = nn.Identity()


class EncoderBlock(nn.Module):
    """One transformer encoder block: `x = x + attn(x)`, then `x = x + ffn(x)`.

    Args:
        dim: Token width.
        heads: Number of attention heads.
        dim_head: Width of each head.
        mlp_dim: Hidden width of the feed-forward network.
        norm: `"ln"` (standard ViT), `"bn_ffn"` (BatchNorm inside the FFN, LayerNorm before
            attention; the article's ViTBNFFN) or `"bn"` (BatchNorm everywhere; ViTBN).
        dropout: Dropout after the attention projection and inside the FFN.
        attn_dropout: Dropout on the attention weights.
        qkv_bias: Give the qkv projection a bias.
        drop_path: Stochastic-depth rate of both residual branches.

    Examples:
        >>> block = EncoderBlock(64, heads=8, dim_head=64, mlp_dim=128, norm="bn_ffn")
        >>> block(torch.randn(2, 17, 64)).shape
        torch.Size([2, 17, 64])
        >>> type(block.ffn).__name__
        'BatchNormFFN'
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        norm: str = "ln",
        dropout: float = 0.0,
        *,
        attn_dropout: float = 0.0,
        qkv_bias: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        _checks.choice("norm", norm, NORMS)
        self.attn = Attention(
            dim,
            heads,
            dim_head,
            norm="bn" if norm == "bn" else "ln",
            qkv_bias=qkv_bias,
            dropout=dropout,
            attn_dropout=attn_dropout,
        )
        ffn = FeedForward if norm == "ln" else BatchNormFFN
        self.ffn = ffn(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.ffn(x))
