"""Transformer blocks with a choice of norm; `BatchNormFFN` is the article's idea (docs/models-and-norms.md)."""

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
    """Patches of `p x p` pixels, flattened (row, column, channel) as the reference, embedded: `norm -> Linear -> norm`.

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
    """The standard ViT FFN: `LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout`.

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
    """FFN with BatchNorm inside and no LayerNorm in front: `Linear -> BatchNorm -> GELU -> Linear` (ViTBNFFN).

    Args:
        dropout: After the activation and after `fc2`, or a pair of the two.
        out_dim: Output width (default: `dim`).
        bias: For `fc1` and `fc2`, or a pair.
        act_layer: The activation's class.

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
        """Fold the BatchNorm into `fc1`, in place (eval mode only); returns `self` for `reparameterize_model`."""
        if isinstance(self.norm, TokenBatchNorm):
            self.fc1 = fold_bn_after_linear(self.fc1, self.norm.bn)
            self.norm = nn.Identity()
        return self


class EncoderBlock(nn.Module):
    """One pre-norm encoder block, `norm` `"ln"`, `"bn_ffn"` or `"bn"`; other arguments as `ViTConfig`'s.

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
