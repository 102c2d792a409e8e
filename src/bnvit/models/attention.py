"""Multi-head self-attention: the textbook `Attention`, its factored form, and the choice of kernel.

Examples:
    >>> x = torch.randn(4, 17, 64, dtype=torch.float64)
    >>> qkv, proj = torch.nn.Linear(64, 3 * 512).double(), torch.nn.Linear(512, 64).double()
    >>> params = (qkv.weight, qkv.bias, proj.weight, proj.bias)
    >>> torch.allclose(factored_attention(x, *params, heads=8), standard_attention(x, *params, heads=8))
    True
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .._util import checks as _checks
from .batchnorm import TokenBatchNorm, token_norm
from .fold import fold_bn_before_linear

__all__ = [
    "ATTN_IMPLS",
    "Attention",
    "attend",
    "attend_shared_kv",
    "factored_attention",
    "factored_pays",
    "self_attention",
    "standard_attention",
    "takes_factored",
]

ATTN_IMPLS = ("auto", "standard", "factored")
"""The valid values of `attn_impl` for `Attention`, `EncoderBlock` and `ViT`."""


class Attention(nn.Module):
    """Pre-norm multi-head self-attention; `attn_impl` changes the computation, never the result.

    The qkv projection is laid out `q | k | v`, heads-major, as in the reference code.

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
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.attn_dropout = attn_dropout
        self.attn_impl = _checks.choice("attn_impl", attn_impl, ATTN_IMPLS)
        inner = heads * dim_head
        self.norm = token_norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        dropout_p = self.attn_dropout if self.training else 0.0
        if takes_factored(self.attn_impl, x, self.heads, self.dim_head):
            qkv, proj = self.qkv, self.proj
            x = self_attention(x, qkv.weight, qkv.bias, proj.weight, proj.bias, self.heads, dropout_p, self.attn_impl)
            return self.proj_drop(x)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, dim_head)
        x = attend(q, k, v, dropout_p)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))

    @torch.no_grad()
    def fuse(self) -> Attention:
        """Fold a BatchNorm pre-norm into the qkv projection, in place (eval mode only); returns `self`."""
        if isinstance(self.norm, TokenBatchNorm):
            self.qkv = fold_bn_before_linear(self.norm.bn, self.qkv)
            self.norm = nn.Identity()
        return self


# The kernels.


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """`softmax(scale q k^T) v` (a `torch.fx` leaf, so traced models keep the runtime kernel choice).

    Examples:
        >>> q = k = v = torch.randn(2, 8, 17, 64)  # (batch, heads, tokens, dim_head)
        >>> attend(q, k, v).shape
        torch.Size([2, 8, 17, 64])
    """
    if torch.is_autocast_enabled("cpu") and q.device.type == "cpu":
        return _cpu_autocast_attention(q, k, v, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


torch.fx.wrap("attend")


def _cpu_autocast_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float | None = None
) -> torch.Tensor:
    """`softmax(q k^T / sqrt(d)) v` under CPU autocast: bf16 batched products around an fp32 softmax."""
    scores = (q @ k.transpose(-2, -1)).float().mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    weights = F.dropout(scores.softmax(-1), dropout_p)
    return weights.to(v.dtype) @ v


def attend_shared_kv(
    x: torch.Tensor, w_query: torch.Tensor, b_query: torch.Tensor | None, heads: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """`softmax(q_h x^T) x` per head, keys and values being `x (B, N, C)`; `w_query` `(heads * C, C)` holds the scale.

    Examples:
        >>> attend_shared_kv(torch.randn(2, 17, 64), torch.randn(8 * 64, 64), None, heads=8).shape
        torch.Size([2, 17, 512])
    """
    B, N, C = x.shape
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        q = F.linear(x.reshape(B * N, C), w_query, b_query).view(B, N, heads, C).transpose(1, 2)
        kv = x.unsqueeze(1).expand(B, heads, N, C)
        return attend(q, kv, kv, dropout_p, scale=1.0).transpose(1, 2).reshape(B, N, heads * C)
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    q = F.linear(x.reshape(B * N, C), w_query, b_query)  # (B * N, heads * C) = (B, N * heads, C)
    scores = q.view(B, N * heads, C) @ x.transpose(1, 2)  # (B, N * heads, N): scores[b, i * heads + h, j]
    weights = F.dropout(scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)), dropout_p)
    return (weights.to(x.dtype) @ x).view(B, N, heads * C)  # sum_j a_ij x_j for every token and head


# The factored form.


def factored_pays(dim: int, heads: int, dim_head: int, tokens: int, seq: int) -> bool:
    """Whether the factored form takes fewer multiply-adds; `tokens <= 0` asks per token only.

    Examples:
        >>> factored_pays(64, 8, 64, tokens=100 * 17, seq=17)  # the article's model, batch 100
        True
        >>> factored_pays(64, 8, 64, tokens=17, seq=17)  # one image: forming the weights costs more
        False
    """
    saved = 4 * dim_head * dim + 2 * seq * dim_head - 2 * dim * dim - 2 * seq * dim
    if tokens <= 0:
        return saved > 0
    return tokens * saved > 2 * dim * dim * dim_head


def takes_factored(attn_impl: str, x: torch.Tensor, heads: int, dim_head: int) -> bool:
    """Whether attention over `x (B, N, dim)` runs in factored form: the one place that decides.

    Examples:
        >>> x = torch.randn(1, 17, 64)
        >>> takes_factored("auto", x, 8, 64), takes_factored("auto", x.expand(100, -1, -1), 8, 64)
        (False, True)
    """
    if attn_impl != "auto":
        return attn_impl == "factored"
    if isinstance(x, torch.fx.Proxy):
        return True
    B, N, C = x.shape
    tokens = 0 if torch.compiler.is_compiling() else B * N
    return factored_pays(C, heads, dim_head, tokens, N)


def self_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float = 0.0,
    attn_impl: str = "auto",
) -> torch.Tensor:
    """Self-attention of normalized tokens `x (B, N, dim)`, in the form `takes_factored` picks; a `torch.fx` leaf."""
    dim_head = qkv_weight.shape[0] // (3 * heads)
    form = factored_attention if takes_factored(attn_impl, x, heads, dim_head) else standard_attention
    return form(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, dropout_p)


torch.fx.wrap("self_attention")


def standard_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The textbook form of `Attention.forward` on its weights, for `self_attention` (traced graphs, tests)."""
    B, N, _ = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias).view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = attend(q, k, v, dropout_p).transpose(1, 2).reshape(B, N, -1)
    return F.linear(out, proj_weight, proj_bias)


def factored_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head self-attention in factored form (see the module's docstring): keys and values are `x`."""
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
    mixed = attend_shared_kv(x, w_scores, b_scores, heads, dropout_p)  # (B, N, heads * dim)
    # Tokens as one (B * N, heads * dim) matrix: the bias is part of the product (an ONNX Gemm).
    return F.linear(mixed.view(B * N, heads * C), w_out, b_out).view(B, N, C)
