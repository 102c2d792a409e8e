"""Transformer building blocks with a choice of normalization.

The one idea of this library lives here: `BatchNormFFN`, a feed-forward network with a
BatchNorm between its two Linear layers and no LayerNorm in front of it. `EncoderBlock`
takes the normalization as one argument:

| `norm`     | attention pre-norm | feed-forward                      |
|------------|--------------------|-----------------------------------|
| `"ln"`     | LayerNorm          | `FeedForward` (LayerNorm first)   |
| `"bn_ffn"` | LayerNorm          | `BatchNormFFN`                    |
| `"bn"`     | `TokenBatchNorm`   | `BatchNormFFN`                    |

BatchNorm on tokens (`TokenBatchNorm`, in `bnvit.batchnorm` with the rest of the BatchNorm
code) normalizes each feature over the batch *and* the token axis: a `(B, N, C)` tensor is
normalized as its `(B * N, C)` view, with no copy to a channels-first layout.

`Attention` is the textbook pre-norm multi-head self-attention; the same function in fewer
multiply-adds (`bnvit.factored`) runs where it pays, as `attn_impl` says, and the choice of
kernel by device and precision is `bnvit.kernels`'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from einops import rearrange
from timm.layers import DropPath
from torch import nn

from . import _checks
from .batchnorm import TokenBatchNorm, bn_safe_context_fn, in_recomputation
from .factored import ATTN_IMPLS, self_attention, takes_factored
from .fuse import fold_bn_after_linear, fold_bn_before_linear
from .kernels import attend

__all__ = [
    "ATTN_IMPLS",
    "NORMS",
    "Attention",
    "BatchNormFFN",
    "EncoderBlock",
    "FeedForward",
    "PatchEmbed",
    "TokenBatchNorm",
    "attend",
    "bn_safe_context_fn",
    "in_recomputation",
    "patchify",
    "self_attention",
    "sincos_pos_embed",
    "token_norm",
]

NORMS = ("ln", "bn_ffn", "bn")
"""The valid values of `norm` for `EncoderBlock` and `ViT`."""


def token_norm(kind: str, dim: int) -> nn.Module:
    """A normalization of the last axis of a token tensor: `"ln"` (LayerNorm) or `"bn"`.

    Examples:
        >>> type(token_norm("bn", 64)).__name__, type(token_norm("ln", 64)).__name__
        ('TokenBatchNorm', 'LayerNorm')
    """
    _checks.choice("token norm", kind, ("ln", "bn"))
    return nn.LayerNorm(dim) if kind == "ln" else TokenBatchNorm(dim)


def sincos_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """The article's fixed sine-cosine positional embedding, shape `(1, num_tokens, dim)`.

    For token position `t` and `i = 1 .. dim/2`, `w_i = 10000 ** (-i / (dim/2))` and the
    embedding is `[sin(t w_1), ..., sin(t w_{dim/2}), cos(t w_1), ..., cos(t w_{dim/2})]`.

    Examples:
        >>> sincos_pos_embed(17, 64).shape
        torch.Size([1, 17, 64])
    """
    if dim % 2:
        raise ValueError(f"the sincos positional embedding needs an even dim, got dim={dim}")
    half = dim // 2
    omega = 10000.0 ** (-torch.arange(1, half + 1, dtype=torch.float64) / half)
    angles = torch.arange(num_tokens, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Split an image into `p x p` patches and embed each: `norm -> Linear -> norm`.

    Each patch is flattened in (row, column, channel) order, as in the reference
    implementation's `Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)")`.

    Args:
        img_size: Input height and width.
        patch_size: Patch side `p`; must divide both image sides.
        in_chans: Input channels.
        dim: Embedding width.
        norm: `"ln"` or `"bn"` for both norms.

    Examples:
        >>> embed = PatchEmbed((28, 28), 7, 1, 64)
        >>> embed(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int, norm: str = "ln") -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_dim = patch_size * patch_size * in_chans
        self.pre_norm = token_norm(norm, patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm = token_norm(norm, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.pre_norm(patchify(x, self.patch_size))))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BatchNorm norms into the projection, in place (eval mode only)."""
        if isinstance(self.norm, TokenBatchNorm):
            self.proj = fold_bn_after_linear(self.proj, self.norm.bn)
            self.norm = nn.Identity()
        if isinstance(self.pre_norm, TokenBatchNorm):
            self.proj = fold_bn_before_linear(self.pre_norm.bn, self.proj)
            self.pre_norm = nn.Identity()


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images `(B, C, H, W)` -> patches `(B, (H/p)(W/p), p * p * C)`, in (row, column, channel) order.

    A leaf for `torch.fx` (registered with `torch.fx.wrap`): tracing records one call instead
    of following einops' Python code.

    Examples:
        >>> patchify(torch.rand(2, 3, 8, 8), 4).shape
        torch.Size([2, 4, 48])
    """
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


# A leaf for torch.fx where `PatchEmbed.forward` calls it: tracing records one call, not einops' code.
torch.fx.wrap("patchify")


class Attention(nn.Module):
    """Pre-norm multi-head self-attention: `norm -> qkv -> heads -> scaled dot-product attention -> proj`.

    `norm(x) -> Linear(dim, 3 * heads * dim_head) -> q, k, v -> softmax(q k^T / sqrt(dim_head)) v
    -> Linear(heads * dim_head, dim) -> Dropout`. The qkv projection is laid out `q | k | v`,
    each heads-major `(heads, dim_head)`, as in the article's reference implementation.

    `attn_impl` says how it is computed, never what: `"standard"` is the `forward` you read here;
    `"factored"` is the same function in fewer multiply-adds for a small `dim` (`bnvit.factored`);
    `"auto"` (the default) takes the factored form where it takes fewer multiply-adds. The two
    agree to float rounding, and share the parameters (the state dict is the same).

    Args:
        dim: Token width.
        heads: Number of attention heads.
        dim_head: Width of each head; independent of `dim`.
        norm: Pre-norm kind, `"ln"` or `"bn"`.
        qkv_bias: Give the qkv projection a bias.
        dropout: Dropout after the output projection.
        attn_dropout: Dropout on the attention weights.
        attn_impl: `"auto"`, `"standard"` or `"factored"`.

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
    def fuse(self) -> None:
        """Fold a BatchNorm pre-norm into the qkv projection, in place (eval mode only).

        The shift becomes a bias of the projection; in the factored form (`bnvit.factored`) that is
        a `heads * dim`-wide bias inside one matrix product. Keeping the shift on the `dim`-wide
        input instead (scale into the weight, `x + t / s`) measured no faster (docs/benchmarks.md).
        """
        if isinstance(self.norm, TokenBatchNorm):
            self.qkv = fold_bn_before_linear(self.norm.bn, self.qkv)
            self.norm = nn.Identity()


# Leaves for torch.fx where `Attention.forward` calls them: a traced model keeps their runtime choices.
torch.fx.wrap("self_attention")
torch.fx.wrap("attend")


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
        attn_impl: How attention is computed: `"auto"`, `"standard"` or `"factored"` (see `Attention`).

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
        attn_impl: str = "auto",
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
            attn_impl=attn_impl,
        )
        ffn = FeedForward if norm == "ln" else BatchNormFFN
        self.ffn = ffn(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.ffn(x))
