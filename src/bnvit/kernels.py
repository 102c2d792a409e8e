"""The attention kernels: `softmax(scale q k^T) v`, and the only code that looks at the device and autocast.

`attend` is what `Attention` calls per head: torch's fused `scaled_dot_product_attention`,
except under CPU autocast, where a few dozen tokens go faster as two bf16 batched products
around an fp32 softmax (measured in benchmarks/, see docs/benchmarks.md). `attend_shared_kv` is
the kernel of the factored form (`bnvit.factored`), whose heads share their keys and values: the
fused kernel on GPUs and while compiling or exporting, two batched products in eager CPU code.
Every choice of kernel by device or precision is made here, so the layers above have none.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["attend", "attend_shared_kv"]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """`softmax(scale q k^T) v` with torch's fused kernel, or a faster path under CPU autocast.

    `scale` defaults to `1 / sqrt(d)`, `d = q.shape[-1]`.

    A leaf for `torch.fx` (registered with `torch.fx.wrap`): a traced model keeps this runtime
    choice of kernel instead of freezing the one seen while tracing.

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
    """softmax(q k^T / sqrt(d)) v under CPU autocast: bf16 batched products around an fp32 softmax.

    At a few dozen tokens the CPU's fused attention kernel is about 4x slower in bf16 than in
    fp32, and in fp32 still about 2x slower than this (measured in benchmarks/, see
    docs/benchmarks.md); on CUDA the fused kernel is used in every precision.
    """
    scores = (q @ k.transpose(-2, -1)).float().mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    weights = F.dropout(scores.softmax(-1), dropout_p)
    return weights.to(v.dtype) @ v


def attend_shared_kv(
    x: torch.Tensor, w_query: torch.Tensor, b_query: torch.Tensor | None, heads: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """`softmax(q_h x^T) x` for every head `h`: queries `q = x w_query^T + b_query`, keys and values `x (B, N, C)`.

    The heads share their keys and values, the tokens themselves, as in multi-query attention;
    `w_query` is `(heads * C, C)`, the scale already in it. On GPUs, and while compiling or
    exporting, one fused attention runs over all heads (the keys and values expanded as a view);
    in eager CPU code, two batched products with no copy (a few dozen tokens are too few for the
    fused kernel), the softmax in float32 or wider. Under CPU autocast `x` is cast once, for the
    three products that read it. The tokens are one `(B * N, C)` matrix for the query projection,
    so its bias is part of the product (an ONNX `Gemm`).

    Returns:
        `(B, N, heads * C)`: for each token, the mixed tokens of every head.

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
