"""`ViTConfig`: every setting of bnvit's `ViT`, validated once (re-exported by `bnvit.models.vit`)."""

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
    """Every setting of a `ViT`, validated once; the defaults are the article's MNIST model.

    `dataclasses.asdict(cfg)` is what checkpoints and timm builders store.

    Args:
        img_size: Input side, or `(height, width)`.
        patch_size: Patch side; must divide the image sides.
        num_classes: 0 gives a model without a head.
        dim_head: Width of each attention head (independent of `dim`).
        mlp_dim: Hidden width of the FFNs.
        norm: `"ln"`, `"bn_ffn"` or `"bn"`; see `EncoderBlock`.
        pool: `"cls"`, `"avg"` (patch tokens), `"mean"` (every token) or `""`; alias `global_pool`.
        pos_embed: `"learn"` or `"sincos"` (fixed).
        drop_rate: Dropout inside the blocks (the reference code's `dropout`).
        pos_drop_rate: Dropout after the positional embedding (`emb_dropout`).
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this rate.
        weight_init: `"reference"` (the article's) or `"timm"` (truncated normal, std 0.02).
        attn_impl: `"auto"`, `"standard"` or `"factored"`; see `Attention`.
        bn_momentum: Momentum of every BatchNorm, in (0, 1].
        bn_eps: `eps` of every BatchNorm, finite and > 0.
        dynamic_img_size: Accept any image size the patch size divides.

    Raises:
        ValueError: A value out of range or an unknown choice.
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
        """`cfg` (default: the defaults) with `kwargs` replacing fields; raises `TypeError` for an unknown one."""
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
