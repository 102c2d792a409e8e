"""The one builder behind every bnvit entry point: timm's `build_model_with_cfg`, the weights read once, first."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features

from .._util import checks as _checks
from ..models.features import feature_take_indices, input_cfg
from ..weights.convert import checkpoint_filter_fn
from ..weights.loading import locate_shipped, read_state_dict

__all__ = ["build_with_weights", "fitted_cfg", "pretrained_cfg", "pretrained_state_dict"]

MNIST_LABELS = tuple(str(digit) for digit in range(10))
MNIST_INPUT = dict(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,), num_classes=10, label_names=MNIST_LABELS)
"""The pretrained-cfg fields of a 28x28 MNIST model: one channel in [0, 1], ten classes named "0" to "9"."""

Infer = Callable[[dict[str, torch.Tensor], str, str, Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]


def pretrained_cfg(*, first_conv: str, **fields: Any) -> dict[str, Any]:
    """A pretrained cfg for a bnvit model: the fields every bnvit cfg shares, then `fields`.

    Examples:
        >>> cfg = pretrained_cfg(first_conv="layers.0", **MNIST_INPUT)
        >>> cfg["classifier"], cfg["input_size"], cfg["crop_pct"]
        ('head', (1, 28, 28), 1.0)
    """
    shared = dict(
        num_classes=10,
        interpolation="bilinear",
        crop_pct=1.0,
        fixed_input_size=True,
        classifier="head",
        paper_name="Vision Transformer with BatchNorm",
        license="mit",
    )
    return {**shared, "first_conv": first_conv, **fields}


def fitted_cfg(cfg: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A model's pretrained cfg for what it was built as (`config`: its `in_chans`, `img_size`, ...).

    Examples:
        >>> cfg = fitted_cfg(pretrained_cfg(first_conv="x", **MNIST_INPUT), dict(in_chans=1, img_size=(56, 56),
        ...                  num_classes=3, dynamic_img_size=True))
        >>> cfg["input_size"], cfg["fixed_input_size"], "label_names" in cfg
        ((1, 56, 56), False, False)
    """
    out = input_cfg(dict(cfg), config["in_chans"], config["img_size"])
    if config.get("dynamic_img_size"):
        out["fixed_input_size"] = False
    if config.get("num_classes") != cfg.get("num_classes"):
        out.pop("label_names", None)
    return out


def pretrained_state_dict(
    variant: str, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The weights `timm.create_model(variant, pretrained=True, ...)` loads, found in timm's order.

    Returns:
        The state dict and a description of its source, for error messages.

    Raises:
        ValueError: If the cfg points at no weights, or at shipped weights absent from this build.
        FileNotFoundError: If a `local-dir:` folder holds no weight file.

    Examples:
        >>> state_dict, source = pretrained_state_dict("vitbnffn_mnist")
        >>> source.endswith("vitbnffn_mnist.safetensors"), "head.weight" in state_dict
        (True, True)
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.source != "local-dir" and cfg.state_dict is not None:
        return dict(cfg.state_dict), "the state dict in pretrained_cfg"
    if cfg.source == "local-dir":
        return read_state_dict(cfg.file), str(cfg.file)
    if cfg.source == "hf-hub" or (cfg.hf_hub_id and not cfg.file):
        from timm.models._hub import load_state_dict_from_hf  # needs huggingface_hub: only for hub loads

        args = (cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_filename else (cfg.hf_hub_id,)
        return load_state_dict_from_hf(*args), f"hf-hub:{cfg.hf_hub_id}"
    if cfg.file:
        return read_state_dict(locate_shipped(variant, cfg)), str(cfg.file)
    if cfg.url:
        sd = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
        return checkpoint_filter_fn(sd), cfg.url
    raise ValueError(
        f"no published weights for {variant}; load a file with "
        f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    )


def _locate_shipped(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with the package's own weights, if the cfg names them, located in `WEIGHTS_DIR` (or a clear error)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    if cfg.source == "local-dir" or cfg.state_dict is not None or not cfg.file:
        return kwargs
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "file": locate_shipped(variant, cfg)}}


def _feature_cfg(variant: str, depth: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's `feature_cfg` for `features_only=True`: the getter wrapper over `forward_intermediates`."""
    out_indices = kwargs.pop("out_indices", min(3, depth))
    try:
        feature_take_indices(depth, out_indices)
    except ValueError as err:
        raise ValueError(f"{variant}: bad out_indices {out_indices!r}: {err}") from None
    return dict(out_indices=out_indices, feature_cls=kwargs.pop("feature_cls", "getter"))


@contextlib.contextmanager
def _quiet_adapted_stem() -> Iterator[None]:
    """Hide timm's warning that the stem 'already matches': `checkpoint_filter_fn` adapted its channels."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Pretrained patch_embed.proj weights already match")

    logger = logging.getLogger("timm.models._builder")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def build_with_weights(
    model_cls: type,
    variant: str,
    pretrained: bool,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
    *,
    infer: Infer,
    num_blocks: Callable[[dict[str, Any]], int],
    **build: Any,
) -> Any:
    """timm's `build_model_with_cfg`, with the architecture read from the weights when `pretrained`.

    `infer(state_dict, source, variant, defaults, kwargs)` returns the arguments the weights fix,
    recorded as reconstruction arguments for `save_for_hf`; `num_blocks(model_args)` counts feature levels.

    Examples:
        >>> from bnvit import ViT
        >>> model = build_with_weights(ViT, "vitbnffn_mnist", False, dict(norm="bn_ffn"), dict(depth=2),
        ...                            infer=None, num_blocks=lambda args: args["depth"])
        >>> model.cfg.depth, model.pretrained_cfg["architecture"]
        (2, 'vitbnffn_mnist')
    """
    from_weights: dict[str, Any] = {}
    if pretrained:
        kwargs = _locate_shipped(variant, kwargs)
        sources = {k: kwargs.pop(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay") if k in kwargs}
        cfg = resolve_pretrained_cfg(variant, **sources).to_dict()
        state_dict, source = pretrained_state_dict(variant, **sources)
        from_weights = infer(state_dict, source, variant, defaults, kwargs)
        # timm loads the state dict read above (its highest-priority source) instead of reading the weights again
        kwargs["pretrained_cfg"] = {**cfg, "source": None, "state_dict": state_dict}
    model_args = {**defaults, **from_weights, **kwargs}
    feature_cfg = None
    if model_args.pop("features_only", False):
        feature_cfg = _feature_cfg(variant, num_blocks(model_args), model_args)
        model_args["features_only"] = True
    with _quiet_adapted_stem():
        model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **build, **model_args)
    if pretrained:  # whatever source timm loaded (a file, a hub repository, a state dict in the cfg)
        _checks.check_bn_statistics(model, f"the checkpoint timm loaded for {variant}")
    for module in model.modules():  # a features_only wrapper keeps the model it wraps
        if isinstance(getattr(module, "pretrained_cfg", None), dict) and hasattr(module, "config"):
            # pretrained: the cfg says where the weights came from and holds no copy of them; and
            # it describes the images the model takes (`in_chans`, `img_size`), for timm's data config
            base = cfg if pretrained else module.pretrained_cfg
            fitted = fitted_cfg(base, module.config)
            module.pretrained_cfg = module.default_cfg = fitted
            if feature_cfg:
                model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(fitted)
    if pretrained:
        model.pretrained_model_args = {**getattr(model, "pretrained_model_args", {}), **from_weights}
        model._model_args = {**getattr(model, "_model_args", {}), **from_weights}
    return model
