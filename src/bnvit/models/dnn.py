"""The article's opening experiment: a sigmoid MLP with (DNNBN) and without (DNN) BatchNorm, in timm's API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from .._util import checks as _checks
from .batchnorm import set_bn_hyperparameters
from .features import feature_take_indices, forward_blocks
from .fold import FoldingSequential

__all__ = ["MLP"]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def check_flat_inputs(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """`x` flattened to `(B, in_features)`, or a clear error; a `torch.fx` leaf."""
    x = x.flatten(1)
    if x.shape[1] != in_features:
        raise ValueError(f"expected inputs with {in_features} values per sample, got shape {tuple(x.shape)}")
    return x


torch.fx.wrap("check_flat_inputs")


class MLP(nn.Module):
    """A fully connected classifier on flattened images: `[Linear -> (BatchNorm) -> act] x depth -> head`.

    Args:
        depth: Number of hidden layers.
        hidden: Width of each hidden layer.
        norm: `None` (the article's DNN) or `"bn"` (DNNBN).
        activation: `"sigmoid"` (the article's), `"relu"`, `"gelu"` or `"tanh"`.
        num_classes: 0 gives a model without a head.
        bn_momentum: BatchNorm momentum, in (0, 1].
        bn_eps: BatchNorm eps, finite and > 0.

    Examples:
        >>> model = MLP(depth=3, norm="bn")
        >>> model(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
        >>> [type(m).__name__ for m in model.layers[:3]]
        ['Linear', 'BatchNorm1d', 'Sigmoid']
    """

    def __init__(
        self,
        depth: int = 3,
        hidden: int = 100,
        norm: str | None = None,
        activation: str = "sigmoid",
        img_size: int | tuple[int, int] = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        depth = _checks.positive_int("depth", depth)
        hidden = _checks.positive_int("hidden", hidden)
        height, width = _checks.pair("img_size", img_size)
        in_features = _checks.positive_int("in_chans", in_chans) * height * width
        num_classes = _checks.positive_int("num_classes", num_classes, minimum=0)
        if norm is not None:
            _checks.choice("norm", norm, ("bn",))
        _checks.choice("activation", activation, tuple(_ACTIVATIONS))
        self.config: dict[str, Any] = dict(
            depth=depth,
            hidden=hidden,
            norm=norm,
            activation=activation,
            img_size=(height, width),
            in_chans=in_chans,
            num_classes=num_classes,
        )
        self.in_features = in_features
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else hidden, hidden))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(hidden))
                set_bn_hyperparameters(layers[-1], bn_momentum, bn_eps)
            layers.append(_ACTIVATIONS[activation]())
        self.layers = FoldingSequential(*layers)  # its fuse() folds the BatchNorms (timm's --reparam)
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        per_layer = len(layers) // depth
        self.feature_info = [
            dict(num_chs=hidden, reduction=max(height, width), module=f"layers.{(i + 1) * per_layer - 1}")
            for i in range(depth)
        ]
        self._register_load_state_dict_pre_hook(self._head_from_old_layout)

    def _head_from_old_layout(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before `head` existed kept the classifier as the last entry of `layers`."""
        old = f"{prefix}layers.{len(self.layers)}."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}head.{key[len(old) :]}"] = state_dict.pop(key)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def in_chans(self) -> int:
        return self.config["in_chans"]

    @property
    def num_features(self) -> int:
        """Width of the last hidden layer (timm's `num_features`)."""
        return self.config["hidden"]

    head_hidden_size = num_features

    def _hidden_layers(self) -> list[nn.Sequential]:
        """The hidden layers, one `Linear -> (BatchNorm) -> act` group each."""
        step = len(self.layers) // len(self.feature_info)
        return [self.layers[i : i + step] for i in range(0, len(self.layers), step)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (or any tensor with `in_features` values per sample) -> the last hidden layer `(B, hidden)`."""
        return self.layers(check_flat_inputs(x, self.in_features))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Hidden features -> themselves (`pre_logits=True`) or class logits."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's `forward_intermediates`; each intermediate is one location (`(B, hidden, 1, 1)` in NCHW).

        Examples:
            >>> final, feats = MLP(depth=3).forward_intermediates(torch.rand(2, 1, 28, 28))
            >>> final.shape, [tuple(f.shape) for f in feats]
            (torch.Size([2, 100]), [(2, 100, 1, 1), (2, 100, 1, 1), (2, 100, 1, 1)])
        """
        x, intermediates = forward_blocks(
            x,
            stem=lambda images: check_flat_inputs(images, self.in_features),
            blocks=self._hidden_layers(),
            indices=indices,
            stop_early=stop_early,
            output_fmt=output_fmt,
            keep=lambda y: y[:, :, None, None] if output_fmt == "NCHW" else y[:, None, :],
        )
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the hidden layers after the last one in `indices` (and the head), as timm's models do."""
        groups = self._hidden_layers()
        take, last = feature_take_indices(len(groups), indices)
        self.layers = FoldingSequential(*[m for group in groups[: last + 1] for m in group])
        self.feature_info = self.feature_info[: last + 1]
        self.config["depth"] = last + 1
        if prune_head:
            self.reset_classifier(0)
        return take

    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for `num_classes` (0: no head). An MLP does not pool."""
        if global_pool not in (None, ""):
            raise ValueError(f"an MLP has no pooling; global_pool must be None or '', got {global_pool!r}")
        self.config["num_classes"] = _checks.positive_int("num_classes", num_classes, minimum=0)
        device = self.layers[0].weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def fuse(self) -> MLP:
        """Fold each BatchNorm into the Linear before it, in place (eval mode only); returns `self`."""
        self.layers.fuse()
        return self
