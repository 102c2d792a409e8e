"""The article's Vision Transformer, with the normalization as one argument and timm's model API."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._util import checks as _checks
from .batchnorm import TORCHSCRIPT_REFUSAL, TokenBatchNorm, bn_safe_context_fn, token_norm
from .blocks import EncoderBlock, PatchEmbed, sincos_pos_embed
from .config import _POOL_ALIASES, POOLS, POS_EMBEDS, WEIGHT_INITS, ViTConfig  # noqa: F401
from .features import check_images, feature_take_indices, forward_blocks, input_cfg, resample_pos_embed
from .fold import fold_bn_before_linear

__all__ = [
    "POOLS",
    "POS_EMBEDS",
    "PatchEmbed",
    "ViT",
    "ViTBN",
    "ViTBNFFN",
    "ViTConfig",
    "feature_take_indices",
    "sincos_pos_embed",
]

# A leaf for torch.fx where `ViT._embed` calls it, so a traced model keeps the input check.
torch.fx.wrap("check_images")


class ViT(nn.Module):
    """Vision Transformer with a choice of normalization (the article's ViT, ViTBNFFN, ViTBN).

    Has timm's model API and traces with `torch.fx`; `model.config` is `dataclasses.asdict(model.cfg)`.

    Args:
        cfg: The configuration; default `ViTConfig()`.
        **kwargs: `ViTConfig` fields, replacing those of `cfg`.

    Examples:
        >>> model = ViT(norm="bn_ffn", depth=4)
        >>> model(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 10])
        >>> sum(p.numel() for p in ViT(norm="ln").parameters())
        893164
    """

    num_prefix_tokens = 1  # the CLS token, as timm's VisionTransformer calls it

    def __init__(self, cfg: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.cfg = cfg = ViTConfig.from_kwargs(cfg, **kwargs)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, norm=cfg.block_norm)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(cfg.num_tokens, cfg.dim), persistent=False)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                cfg.dim,
                cfg.heads,
                cfg.dim_head,
                cfg.mlp_dim,
                norm=cfg.norm,
                dropout=cfg.drop_rate,
                attn_dropout=cfg.attn_drop_rate,
                qkv_bias=cfg.qkv_bias,
                drop_path=rate,
                attn_impl=cfg.attn_impl,
            )
            for rate in torch.linspace(
                0, cfg.drop_path_rate, cfg.depth, device="cpu"
            ).tolist()  # also under a meta device
        )
        self.norm = token_norm(cfg.block_norm, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.feature_info = [
            dict(num_chs=cfg.dim, reduction=cfg.patch_size, module=f"blocks.{i}") for i in range(cfg.depth)
        ]
        if cfg.weight_init == "timm":
            self._init_timm()
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum, module.eps = cfg.bn_momentum, cfg.bn_eps

    def _init_timm(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ settings, read from cfg

    @property
    def config(self) -> dict[str, Any]:
        """The settings as a plain dict (`dataclasses.asdict(self.cfg)`), as checkpoints store them."""
        return dataclasses.asdict(self.cfg)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def in_chans(self) -> int:
        return self.cfg.in_chans

    @property
    def pool(self) -> str:
        return self.cfg.pool

    @property
    def num_features(self) -> int:
        """Width of the tokens and of the pooled features (timm's `num_features`)."""
        return self.cfg.dim

    head_hidden_size = embed_dim = num_features

    @property
    def num_tokens(self) -> int:
        """Tokens per image, including the CLS token."""
        return self.cfg.num_tokens

    # ------------------------------------------------------------------ forward

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens with the CLS token and the positional embedding, before the blocks."""
        c = self.cfg
        if not c.dynamic_img_size:
            x = self.patch_embed(check_images(x, c.in_chans, c.img_size))
            return self.pos_drop(torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed)
        grid = (x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size)
        x = self.patch_embed(check_images(x, c.in_chans, c.img_size, c.patch_size))
        pos_embed = self._pos_embed_for(grid)
        return self.pos_drop(torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + pos_embed)

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding for a `grid` of patches: resampled (learnable) or recomputed (sincos)."""
        if self.cfg.pos_embed == "sincos":
            if grid == self.cfg.grid_size:
                return self.pos_embed
            return sincos_pos_embed(grid[0] * grid[1] + 1, self.cfg.dim).to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, self.cfg.grid_size)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, context_fn=bn_safe_context_fn)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` -> normalized tokens `(B, num_patches + 1, dim)`."""
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (`pre_logits=True`) or class logits."""
        pool = self.cfg.pool
        if pool == "cls":
            x = x[:, 0]
        elif pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif pool == "mean":
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """The outputs of chosen blocks, as timm's `VisionTransformer.forward_intermediates`.

        Args:
            x: Images `(B, C, H, W)`.
            indices: `None` (every block), an int `n` (the last `n`) or block indices.
            return_prefix_tokens: Return `(patch tokens, CLS token)` pairs.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last block asked for.
            output_fmt: `"NCHW"` or `"NLC"`.
            intermediates_only: Return only the intermediates.

        Returns:
            `(final normalized tokens, intermediates)`, or the intermediates alone.

        Examples:
            >>> model = ViT(depth=3).eval()
            >>> final, feats = model.forward_intermediates(torch.rand(2, 1, 28, 28), indices=2)
            >>> final.shape, [f.shape for f in feats]
            (torch.Size([2, 17, 64]), [torch.Size([2, 64, 4, 4]), torch.Size([2, 64, 4, 4])])
        """
        p = self.cfg.patch_size
        h, w = (x.shape[-2] // p, x.shape[-1] // p) if self.cfg.dynamic_img_size else self.cfg.grid_size
        x, intermediates = forward_blocks(
            x,
            stem=self._embed,
            blocks=self.blocks,
            indices=indices,
            stop_early=stop_early,
            output_fmt=output_fmt,
            keep=self.norm if norm else lambda y: y,
            run=self._run_block,
        )
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one in `indices` (and the final norm, the head); returns the indices kept."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        self.cfg = dataclasses.replace(self.cfg, depth=last + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    # ------------------------------------------------------------------ timm model API

    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for `num_classes` (0: no head), optionally with a new `global_pool`."""
        pool = self.cfg.pool
        if global_pool is not None:
            pool = _checks.choice("global_pool", _POOL_ALIASES.get(global_pool, global_pool), POOLS)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes, pool=pool)
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
        """Recompute block activations in backward to save memory; BatchNorm statistics stay exact."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """Take images of another size from now on (timm's `set_input_size`); the patch size cannot change.

        Examples:
            >>> model = ViT(depth=1)
            >>> model.set_input_size(img_size=56)
            >>> model(torch.rand(2, 1, 56, 56)).shape, model.num_tokens
            (torch.Size([2, 10]), 65)
        """
        if patch_size is not None and patch_size != self.cfg.patch_size:
            raise ValueError(
                f"patch_size={patch_size!r} asked, the model has patch_size={self.cfg.patch_size}; "
                f"its patch norms are learned per value of a patch, so only img_size can change"
            )
        if img_size is None:
            return
        old = self.cfg.grid_size
        self.cfg = dataclasses.replace(self.cfg, img_size=img_size)
        if self.cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(resample_pos_embed(self.pos_embed.detach(), self.cfg.grid_size, old))
        else:
            self.pos_embed = sincos_pos_embed(self.cfg.num_tokens, self.cfg.dim).to(self.pos_embed)
        embed = self.patch_embed
        embed.img_size, embed.grid_size = self.cfg.img_size, self.cfg.grid_size
        embed.num_patches = embed.grid_size[0] * embed.grid_size[1]
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg = self.default_cfg = input_cfg(self.pretrained_cfg, self.in_chans, self.cfg.img_size)

    @torch.no_grad()
    def fuse(self) -> ViT:
        """Fold a BatchNorm final norm into the head, in place (eval mode only); returns `self`."""
        if isinstance(self.norm, TokenBatchNorm) and isinstance(self.head, nn.Linear):
            self.head = fold_bn_before_linear(self.norm.bn, self.head)
            self.norm = nn.Identity()
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(TORCHSCRIPT_REFUSAL)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"norm={c.norm!r}, depth={c.depth}, dim={c.dim}, tokens={c.num_tokens}"


class ViTBNFFN(ViT):
    """The article's model: `ViT` with `Linear -> BatchNorm -> GELU -> Linear` FFNs (`norm="bn_ffn"`).

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
