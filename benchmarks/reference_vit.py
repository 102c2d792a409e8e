"""A straightforward ViT / ViTBNFFN written the way the article's reference code is.

This is the baseline that bnvit is measured and checked against, not part of the library:
einops rearranges, attention as an explicit softmax over `q k^T`, the CLS token repeated
per batch, and the feed-forward BatchNorm applied by permuting the tokens to a
channels-first tensor and back. Module names follow the reference repository, so its
published checkpoints load here with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, bias: bool, bn_ffn: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        # The reference names these differently in its two model files.
        qkv = nn.Linear(dim, inner * 3, bias=bias)
        out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))
        if bn_ffn:
            self.patch_emb, self.out_proj = qkv, out
        else:
            self.to_qkv, self.to_out = qkv, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        qkv_proj = self.patch_emb if hasattr(self, "patch_emb") else self.to_qkv
        out_proj = self.out_proj if hasattr(self, "out_proj") else self.to_out
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in qkv_proj(x).chunk(3, dim=-1))
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        out = rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)")
        return out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeedForwardBN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.Lin1 = nn.Linear(dim, hidden)
        self.BN = nn.BatchNorm1d(hidden)
        self.act = nn.GELU()
        self.Lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Lin1(x)
        x = rearrange(x, "b n d -> b d n")  # channels-first copy for BatchNorm1d
        x = self.BN(x)
        x = rearrange(x, "b d n -> b n d")
        return self.Lin2(self.act(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, bias: bool, bn_ffn: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        ffn = FeedForwardBN if bn_ffn else FeedForward
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, bias, bn_ffn), ffn(dim, mlp_dim)]) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ReferenceViT(nn.Module):
    """The reference implementation's ViT (`bn_ffn=False`) or ViTBNFFN (`bn_ffn=True`)."""

    def __init__(
        self,
        *,
        bn_ffn: bool,
        depth: int = 6,
        image_size: int = 28,
        patch_size: int = 7,
        channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 128,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size**2
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        pos = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        if bn_ffn:
            self.pos_embedding_random = pos
            self.linear_head = nn.Linear(dim, num_classes)
        else:
            self.pos_embedding = pos
            self.mlp_head = nn.Linear(dim, num_classes)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, qkv_bias, bn_ffn)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0])
        x = torch.cat((cls_tokens, x), dim=1)
        pos = self.pos_embedding_random if hasattr(self, "pos_embedding_random") else self.pos_embedding
        x = x + pos[:, : x.shape[1]]
        x = self.transformer(x)[:, 0]
        head = self.linear_head if hasattr(self, "linear_head") else self.mlp_head
        return head(x)
