"""Attention in factored form: the same function as `Attention`'s, in fewer multiply-adds where `dim` is small.

Per head `h`, with `q | k | v = x W_qkv^T + b_qkv` (heads-major), the scores are
`q_i . k_j = x_i (W_q,h^T W_k,h) x_j + (b_q,h W_k,h) . x_j + c_i`, where `c_i` does not depend on
`j` and cancels in the softmax; and since each row of softmax weights sums to one,
`W_o,h (sum_j a_ij v_j) = (W_o,h W_v,h) (sum_j a_ij x_j) + W_o,h b_v,h`. So the keys and values
of every head are the normalized tokens `x` themselves, and only the `(dim, dim)` products
`W_k,h^T W_q,h` and `W_o,h W_v,h` of each head are formed (from the same parameters, so gradients
flow to them as before). Where `dim < 2 dim_head` or so, as in the article's model (`dim = dim_head
= 64`, 8 heads), this takes 0.56x the multiply-adds of the attention block, all heads go through
one batched product, and nothing is copied.

`Attention(attn_impl=...)` (a `ViTConfig` field, and a `timm.create_model` argument) says which
form runs: `"standard"` (the textbook form, always), `"factored"` (this one, always) or `"auto"`
(the default: this one where it takes fewer multiply-adds, `factored_pays`). `takes_factored` is
the one place that decides.

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

from .kernels import attend, attend_shared_kv

__all__ = [
    "ATTN_IMPLS",
    "factored_attention",
    "factored_pays",
    "self_attention",
    "standard_attention",
    "takes_factored",
]

ATTN_IMPLS = ("auto", "standard", "factored")
"""The valid values of `attn_impl` for `Attention`, `EncoderBlock` and `ViT`."""


def factored_pays(dim: int, heads: int, dim_head: int, tokens: int, seq: int) -> bool:
    """Whether the factored form takes fewer multiply-adds than the standard one.

    Per token and head, q, k, v and the output projection take `4 dim_head dim` and the two
    attention products `2 seq dim_head`; the factored form takes `2 dim^2` and `2 seq dim`, after
    forming its two `(dim, dim)` matrices per head once per call (`2 dim^2 dim_head`). `tokens <= 0`
    asks only whether it pays per token (the choice when tracing for export or compilation).

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
    """Whether attention over the normalized tokens `x (B, N, dim)` runs in factored form: the one place that decides.

    `"standard"` and `"factored"` say it; `"auto"` asks `factored_pays` for this batch, or per
    token under `torch.compile` / `torch.export` (the weight products are then constants an
    exporter folds). While `torch.fx` traces a model, `"auto"` answers yes: the traced graph
    calls `self_attention`, which asks again for every batch it runs.

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
    """Multi-head self-attention of normalized tokens `x (B, N, dim)`, projections included, in either form.

    `proj(softmax(q k^T / sqrt(dim_head)) v)` with `q | k | v = x W_qkv^T + b_qkv` (heads-major),
    by `factored_attention` or `standard_attention` as `takes_factored` decides.

    A leaf for `torch.fx` (registered with `torch.fx.wrap`), so a traced model keeps the runtime
    choice.
    """
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
