"""`ViTConfig`: every setting of bnvit's `ViT`, validated once.

Its own module so that `vit.py` holds the model alone; `bnvit.models.vit` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._util import checks as _checks
from .attention import ATTN_IMPLS
from .blocks import NORMS

__all__ = ["POOLS", "POS_EMBEDS", "WEIGHT_INITS", "ViTConfig"]

POOLS = ("cls", "avg", "mean", "")
"""`"cls"` (timm's `"token"`), `"avg"` (patch tokens), `"mean"` (every token, the article's), `""` (none)."""
POS_EMBEDS = ("learn", "sincos")
WEIGHT_INITS = ("reference", "timm")
_POOL_ALIASES = {"token": "cls"}


@dataclass(frozen=True)
class ViTConfig:
    """Every setting of a `ViT`, validated once (the single source of the model's settings).

    The defaults are the article's MNIST configuration: 28x28x1 input, patch 7 (16 patches
    plus a CLS token), dim 64, depth 6, 8 heads of width 64, MLP width 128, 10 classes,
    CLS pooling, a learnable positional embedding and no dropout. `dataclasses.asdict(cfg)`
    is what checkpoints and the timm builders store; `ViTConfig(**that_dict)` rebuilds it.

    Args:
        img_size: Input side, or `(height, width)` (stored as a pair).
        patch_size: Patch side; must divide the image sides.
        in_chans: Input channels.
        num_classes: Output classes; 0 gives a model without a head (features only).
        dim: Token width.
        depth: Number of encoder blocks.
        heads: Attention heads per block.
        dim_head: Width of each attention head (independent of `dim`).
        mlp_dim: Hidden width of the feed-forward networks.
        norm: `"ln"`, `"bn_ffn"` or `"bn"`; see `EncoderBlock`.
        pool: The pooling before the head (timm's `global_pool`, accepted as a synonym):
            `"cls"` (the CLS token; timm's `"token"`, accepted too), `"avg"` (the mean of the
            patch tokens, the CLS token excluded, as timm's `"avg"`), `"mean"` (the mean of
            every token, the CLS token included: the article's `pool="mean"`) or `""` (none:
            the head is applied to every token, as in timm).
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
        attn_impl: How attention is computed, never what: `"auto"` (the factored form where it
            takes fewer multiply-adds), `"standard"` (the textbook form) or `"factored"`; see
            `bnvit.models.attention.Attention`.
        bn_momentum: Momentum of every BatchNorm's running statistics, in (0, 1] (PyTorch's 0.1
            by default; a LayerNorm model has none to apply it to).
        bn_eps: The `eps` of every BatchNorm, a finite number > 0 (PyTorch's 1e-5 by default).
        dynamic_img_size: Take images of any size the patch size divides, the positional
            embedding resampled to their patch grid on the fly (as timm's `dynamic_img_size`).

    Raises:
        ValueError: A value out of range or an unknown choice; the message names the value and
            what is valid.
        TypeError: A value of the wrong type.

    Examples:
        >>> cfg = ViTConfig(norm="bn_ffn", depth=4)
        >>> cfg.img_size, cfg.num_tokens
        ((28, 28), 17)
        >>> dataclasses.replace(cfg, depth=0)
        Traceback (most recent call last):
        ...
        ValueError: depth must be an int >= 1, got 0
    """

    img_size: int | tuple[int, int] = 28
    patch_size: int = 7
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    norm: str = "ln"
    pool: str = "cls"
    pos_embed: str = "learn"
    qkv_bias: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    weight_init: str = "reference"
    attn_impl: str = "auto"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    dynamic_img_size: bool = False

    def __post_init__(self) -> None:
        img_size = _checks.pair("img_size", self.img_size)
        object.__setattr__(self, "img_size", img_size)
        patch_size = _checks.positive_int("patch_size", self.patch_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}; "
                f"choose a patch size that divides both sides"
            )
        for name in ("in_chans", "dim", "depth", "heads", "dim_head", "mlp_dim"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("num_classes", self.num_classes, minimum=0)
        object.__setattr__(self, "pool", _POOL_ALIASES.get(self.pool, self.pool))
        for name, choices in (("norm", NORMS), ("pool", POOLS), ("pos_embed", POS_EMBEDS)):
            _checks.choice(name, getattr(self, name), choices)
        _checks.choice("weight_init", self.weight_init, WEIGHT_INITS)
        _checks.choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        for name in ("drop_rate", "pos_drop_rate", "attn_drop_rate", "drop_path_rate"):
            _checks.rate(name, getattr(self, name))
        if self.pos_embed == "sincos" and self.dim % 2:
            raise ValueError(f"pos_embed='sincos' needs an even dim, got dim={self.dim}")
        for name in ("qkv_bias", "dynamic_img_size"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _checks.positive_float("bn_eps", self.bn_eps)
        if isinstance(self.bn_momentum, bool) or not isinstance(self.bn_momentum, (int, float)):
            raise TypeError(f"bn_momentum must be a number in (0, 1], got {self.bn_momentum!r}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image, including the CLS token."""
        return self.grid_size[0] * self.grid_size[1] + 1

    @property
    def block_norm(self) -> str:
        """The kind of the token norms outside the FFNs: `"bn"` for `norm="bn"`, else `"ln"`."""
        return "bn" if self.norm == "bn" else "ln"

    @classmethod
    def from_kwargs(cls, cfg: ViTConfig | None = None, **kwargs: Any) -> ViTConfig:
        """`cfg` (default: the defaults) with `kwargs` replacing fields; unknown names raise `TypeError`.

        timm's name `global_pool` is accepted for `pool`.
        """
        if "global_pool" in kwargs:
            pool = kwargs.pop("global_pool")
            if "pool" in kwargs and kwargs["pool"] != pool:
                raise ValueError(f"pool={kwargs['pool']!r} and global_pool={pool!r} disagree; give one of them")
            kwargs["pool"] = pool
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(f"unknown ViT argument(s) {', '.join(unknown)}; valid ones: {', '.join(fields)}")
        if cfg is None:
            return cls(**kwargs)
        if not isinstance(cfg, cls):
            raise TypeError(f"cfg must be a ViTConfig, got {type(cfg).__name__}")
        return dataclasses.replace(cfg, **kwargs)
