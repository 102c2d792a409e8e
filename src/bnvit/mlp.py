"""The article's opening experiment: a sigmoid MLP with and without BatchNorm.

`MLP(depth=3)` is the article's DNN_d3 (3 hidden layers of 100 sigmoid units);
`MLP(depth=3, norm="bn")` is DNNBN_d3, with a BatchNorm between each Linear and its sigmoid.
Both are registered in timm as `dnn_mnist` and `dnnbn_mnist`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from . import _checks

__all__ = ["MLP", "dnn_mnist", "dnnbn_mnist"]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """A fully connected classifier on flattened images: `[Linear -> (BatchNorm) -> act] x depth -> Linear`.

    Args:
        depth: Number of hidden layers.
        hidden: Width of each hidden layer.
        norm: `None` (the article's DNN) or `"bn"` (DNNBN: BatchNorm before each activation).
        activation: `"sigmoid"` (the article's), `"relu"`, `"gelu"` or `"tanh"`.
        img_size: Input side, or `(height, width)`.
        in_chans: Input channels; the input is flattened to `in_chans * height * width` values.
        num_classes: Output classes.

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
    ) -> None:
        super().__init__()
        depth = _checks.positive_int("depth", depth)
        hidden = _checks.positive_int("hidden", hidden)
        height, width = _checks.pair("img_size", img_size)
        in_features = _checks.positive_int("in_chans", in_chans) * height * width
        num_classes = _checks.positive_int("num_classes", num_classes)
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
        self.num_classes = num_classes
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(_ACTIVATIONS[activation]())
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} values per sample, got shape {tuple(x.shape)}")
        return self.layers(x)


default_cfgs = generate_default_cfgs(
    {
        name: dict(
            input_size=(1, 28, 28),
            mean=(0.0,),
            std=(1.0,),
            num_classes=10,
            fixed_input_size=True,
            interpolation="bilinear",
            crop_pct=1.0,
            classifier="layers.{}".format(6 if name == "dnnbn_mnist" else 3),  # the last Linear at depth 3
            paper_name="Vision Transformer with BatchNorm",
        )
        for name in ("dnn_mnist", "dnnbn_mnist")
    }
)


def _create_mlp(variant: str, pretrained: bool, norm: str | None, **kwargs: Any) -> MLP:
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {variant}")
    return build_model_with_cfg(MLP, variant, pretrained, norm=norm, **kwargs)


@register_model
def dnn_mnist(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The article's DNN_d3: 3 hidden layers of 100 sigmoid units (`depth=` to change)."""
    return _create_mlp("dnn_mnist", pretrained, None, **kwargs)


@register_model
def dnnbn_mnist(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The article's DNNBN_d3: DNN_d3 with a BatchNorm before each sigmoid."""
    return _create_mlp("dnnbn_mnist", pretrained, "bn", **kwargs)
