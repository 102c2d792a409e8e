"""Transformer building blocks with a choice of normalization.

The library's one idea lives here: `BatchNormFFN`, a feed-forward network with a BatchNorm
between its two Linear layers and no LayerNorm in front. `EncoderBlock` takes the norm as one
argument (`"ln"`, `"bn_ffn"`, `"bn"`; see docs/models-and-norms.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from einops import rearrange
from timm.layers import DropPath
from torch import nn

from .._util import checks as _checks
from .attention import Attention
from .batchnorm import TokenBatchNorm, token_norm
from .fold import fold_bn_after_linear, fold_bn_before_linear

__all__ = [
    "NORMS",
    "BatchNormFFN",
    "EncoderBlock",
    "FeedForward",
    "PatchEmbed",
    "patchify",
    "sincos_pos_embed",
]

NORMS = ("ln", "bn_ffn", "bn")
"""The valid values of `norm` for `EncoderBlock` and `ViT`."""


def sincos_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """The article's fixed sine-cosine positional embedding, shape `(1, num_tokens, dim)`.

    For position `t` and `i = 1 .. dim/2`, `w_i = 10000 ** (-i / (dim/2))` and the embedding is
    `[sin(t w_1), ..., sin(t w_{dim/2}), cos(t w_1), ..., cos(t w_{dim/2})]`.

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
    """Split an image into `p x p` patches and embed each: `norm -> Linear -> norm` (`"ln"` or `"bn"`).

    Patches are flattened in (row, column, channel) order, as the reference code's `Rearrange`.

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
    def fuse(self) -> PatchEmbed:
        """Fold BatchNorm norms into the projection, in place (eval mode only); returns `self`, as timm expects."""
        if isinstance(self.norm, TokenBatchNorm):
            self.proj = fold_bn_after_linear(self.proj, self.norm.bn)
            self.norm = nn.Identity()
        if isinstance(self.pre_norm, TokenBatchNorm):
            self.proj = fold_bn_before_linear(self.pre_norm.bn, self.proj)
            self.pre_norm = nn.Identity()
        return self


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images `(B, C, H, W)` -> patches `(B, (H/p)(W/p), p * p * C)`; a `torch.fx` leaf.

    Examples:
        >>> patchify(torch.rand(2, 3, 8, 8), 4).shape
        torch.Size([2, 4, 48])
    """
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


# A leaf for torch.fx where `PatchEmbed.forward` calls it: tracing records one call, not einops' code.
torch.fx.wrap("patchify")


class FeedForward(nn.Module):
    """The standard ViT feed-forward network: `LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout`.

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

    `Linear(dim, mlp_dim) -> BatchNorm -> GELU -> Dropout -> Linear -> Dropout`; the BatchNorm
    normalizes over batch x tokens and folds into `fc1` in eval mode. `bnvit.BatchNormMlp` builds it
    from timm's `Mlp` arguments.

    Args:
        dropout: Dropout after the activation and after `fc2`, or a pair of the two.
        out_dim: Output width (default: `dim`).
        bias: Give `fc1` and `fc2` a bias, or a pair `(fc1, fc2)`.
        act_layer: The activation's class (called without arguments).

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
    def fuse(self) -> BatchNormFFN:
        """Fold the BatchNorm into `fc1`, in place (eval mode only): `fc1` then does both.

        Returns `self`: timm's `reparameterize_model` replaces a module by what its `fuse()` returns.
        """
        if isinstance(self.norm, TokenBatchNorm):
            self.fc1 = fold_bn_after_linear(self.fc1, self.norm.bn)
            self.norm = nn.Identity()
        return self


class EncoderBlock(nn.Module):
    """One transformer encoder block: `x = x + attn(x)`, then `x = x + ffn(x)`.

    Arguments as `ViTConfig`'s (`dropout`, `attn_dropout` are its `drop_rate`, `attn_drop_rate`);
    `norm` is `"ln"`, `"bn_ffn"` (ViTBNFFN) or `"bn"` (ViTBN); `drop_path` is the
    stochastic-depth rate of both residual branches.

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
