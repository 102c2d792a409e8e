"""The Vision Transformer of the article, with the normalization as one argument.

`ViT(norm="ln")` is the standard ViT of the article's reference implementation,
`ViT(norm="bn_ffn")` (alias `ViTBNFFN`) puts a BatchNorm inside every feed-forward network,
and `ViT(norm="bn")` (alias `ViTBN`) replaces every LayerNorm with a BatchNorm over
batch x tokens. The model follows timm's model API (`forward_features`, `forward_head`,
`reset_classifier`, ...), so it plugs into timm's optimizers, schedulers and scripts.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _checks
from .layers import NORMS, EncoderBlock, bn_safe_context_fn, token_norm

__all__ = ["POOLS", "POS_EMBEDS", "PatchEmbed", "ViT", "ViTBN", "ViTBNFFN", "sincos_pos_embed"]

POOLS = ("cls", "mean")
POS_EMBEDS = ("learn", "sincos")
WEIGHT_INITS = ("reference", "timm")
_TIMM_POOL_NAMES = {"token": "cls", "avg": "mean"}


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
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return self.norm(self.proj(self.pre_norm(x)))


class ViT(nn.Module):
    """Vision Transformer with a choice of normalization (the article's ViT, ViTBNFFN, ViTBN).

    The defaults are the article's MNIST configuration: 28x28x1 input, patch 7 (16 patches
    plus a CLS token), dim 64, depth 6, 8 heads of width 64, MLP width 128, 10 classes,
    CLS pooling, a learnable positional embedding and no dropout.

    Initialization follows the reference implementation: PyTorch's default init for Linear,
    LayerNorm and BatchNorm; the CLS token and the learnable positional embedding are drawn
    from a standard normal distribution.

    Args:
        img_size: Input side, or `(height, width)`.
        patch_size: Patch side; must divide the image sides.
        in_chans: Input channels.
        num_classes: Output classes; 0 gives a model without a head (features only).
        dim: Token width.
        depth: Number of encoder blocks.
        heads: Attention heads per block.
        dim_head: Width of each attention head (independent of `dim`).
        mlp_dim: Hidden width of the feed-forward networks.
        norm: `"ln"`, `"bn_ffn"` or `"bn"`; see `EncoderBlock`.
        pool: `"cls"` (token 0) or `"mean"` (all tokens) before the head.
        pos_embed: `"learn"` (learnable) or `"sincos"` (fixed).
        qkv_bias: Give the qkv projections a bias.
        drop_rate: Dropout inside the blocks (after attention and in the FFN); the
            reference implementation's `dropout`.
        pos_drop_rate: Dropout after adding the positional embedding (the reference's
            `emb_dropout`).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, increasing linearly over the blocks up to this rate.
        weight_init: `"reference"` (the article's: PyTorch defaults, CLS token and positional
            embedding from N(0, 1)) or `"timm"` (truncated normal, std 0.02, for Linear
            weights and the positional embedding, zero biases, a near-zero CLS token; what
            large ViTs are usually trained with).

    Examples:
        >>> model = ViT(norm="bn_ffn", depth=4)
        >>> model(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 10])
        >>> sum(p.numel() for p in ViT(norm="ln").parameters())
        893164
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 28,
        patch_size: int = 7,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 128,
        norm: str = "ln",
        pool: str = "cls",
        pos_embed: str = "learn",
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "reference",
    ) -> None:
        super().__init__()
        img_size = _checks.pair("img_size", img_size)
        patch_size = _checks.positive_int("patch_size", patch_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}; "
                f"choose a patch size that divides both sides"
            )
        for name, value in (("in_chans", in_chans), ("dim", dim), ("depth", depth), ("heads", heads)):
            _checks.positive_int(name, value)
        _checks.positive_int("dim_head", dim_head)
        _checks.positive_int("mlp_dim", mlp_dim)
        _checks.positive_int("num_classes", num_classes, minimum=0)
        _checks.choice("norm", norm, NORMS)
        _checks.choice("pool", pool, POOLS)
        _checks.choice("pos_embed", pos_embed, POS_EMBEDS)
        _checks.choice("weight_init", weight_init, WEIGHT_INITS)
        for name, value in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            _checks.rate(name, value)
        if pos_embed == "sincos" and dim % 2:
            raise ValueError(f"pos_embed='sincos' needs an even dim, got dim={dim}")
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool, got {qkv_bias!r}")

        self.config: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            norm=norm,
            pool=pool,
            pos_embed=pos_embed,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            weight_init=weight_init,
        )
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.norm_kind = norm
        self.pool = pool
        self.grad_checkpointing = False
        self.in_chans = in_chans

        block_norm = "bn" if norm == "bn" else "ln"
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim, norm=block_norm)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(num_tokens, dim), persistent=False)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            EncoderBlock(
                dim,
                heads,
                dim_head,
                mlp_dim,
                norm=norm,
                dropout=drop_rate,
                attn_dropout=attn_drop_rate,
                qkv_bias=qkv_bias,
                drop_path=dp,
            )
            for dp in drop_paths
        )
        self.norm = token_norm(block_norm, dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if weight_init == "timm":
            self._init_timm()

    def _init_timm(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
        expected = (self.in_chans, *self.patch_embed.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images (uint8 ones divided by 255), got dtype {x.dtype}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` -> normalized tokens `(B, num_patches + 1, dim)`."""
        self._check_input(x)
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, x), dim=1) + self.pos_embed)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, context_fn=bn_safe_context_fn)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (`pre_logits=True`) or class logits."""
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm model API

    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for `num_classes` (0: no head).

        Args:
            num_classes: New number of classes.
            global_pool: Optionally a new pooling, `"cls"` or `"mean"` (timm's `"token"` and
                `"avg"` are accepted too).
        """
        _checks.positive_int("num_classes", num_classes, minimum=0)
        if global_pool is not None:
            self.pool = _checks.choice("global_pool", _TIMM_POOL_NAMES.get(global_pool, global_pool), POOLS)
            self.config["pool"] = self.pool
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (timm convention)."""
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory.

        BatchNorm running statistics are updated once per step, as without checkpointing.
        """
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ conveniences

    @property
    def num_tokens(self) -> int:
        """Tokens per image, including the CLS token."""
        return self.patch_embed.num_patches + 1

    def extra_repr(self) -> str:
        c = self.config
        return f"norm={c['norm']!r}, depth={c['depth']}, dim={c['dim']}, tokens={self.num_tokens}"


class ViTBNFFN(ViT):
    """`ViT` with a BatchNorm inside every feed-forward network (`norm="bn_ffn"`).

    This is the article's model: `Linear -> BatchNorm -> GELU -> Linear` in each FFN, no
    LayerNorm before the FFN, the attention keeping its LayerNorm. Takes every argument of
    `ViT` but `norm`.

    Examples:
        >>> model = ViTBNFFN(depth=6)
        >>> sum(p.numel() for p in model.parameters())
        893932
    """

    def __init__(self, **kwargs: Any) -> None:
        _fixed_norm(kwargs, "bn_ffn")
        super().__init__(norm="bn_ffn", **kwargs)


class ViTBN(ViT):
    """`ViT` with every LayerNorm replaced by a BatchNorm over batch x tokens (`norm="bn"`).

    Takes every argument of `ViT` but `norm`.

    Examples:
        >>> model = ViTBN(depth=2).eval()
        >>> model(torch.rand(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """

    def __init__(self, **kwargs: Any) -> None:
        _fixed_norm(kwargs, "bn")
        super().__init__(norm="bn", **kwargs)


def _fixed_norm(kwargs: dict[str, Any], norm: str) -> None:
    given = kwargs.pop("norm", norm)
    if given != norm:
        raise ValueError(f"this model class fixes norm={norm!r}, got norm={given!r}; use ViT(norm=...) instead")
