"""Property-based tests: any valid ViT configuration trains; any invalid one is refused clearly.

Hypothesis draws small configurations (images up to 28 x 28, widths up to 24, depth 1-3) so
that each example takes milliseconds. Runs are derandomized, so CI sees the same examples every
time. No example has a deadline (a deadline is a timing assert, and fails on a busy machine); a
timeout for the whole test makes a hang fail instead of blocking the suite.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnvit import ViT
from bnvit.models.blocks import NORMS
from bnvit.models.vit import POOLS, POS_EMBEDS, WEIGHT_INITS

PROPERTY = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INT_ARGS = ("patch_size", "in_chans", "dim", "depth", "heads", "dim_head", "mlp_dim")
RATE_ARGS = ("drop_rate", "pos_drop_rate", "attn_drop_rate", "drop_path_rate")
CHOICES = {"norm": NORMS, "pool": POOLS, "pos_embed": POS_EMBEDS, "weight_init": WEIGHT_INITS}


@st.composite
def valid_configs(draw) -> tuple[dict[str, Any], int]:
    """A valid `ViT` configuration and a batch size that BatchNorm can train on."""
    patch = draw(st.integers(1, 7))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    sides = (patch * grid[0], patch * grid[1])
    square = sides[0] == sides[1] and draw(st.booleans())
    pos_embed = draw(st.sampled_from(POS_EMBEDS))
    width = draw(st.integers(1, 12))
    config = dict(
        img_size=sides[0] if square else sides,
        patch_size=patch,
        in_chans=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(0, 5)),
        dim=2 * width if pos_embed == "sincos" else width,
        depth=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        dim_head=draw(st.integers(1, 8)),
        mlp_dim=draw(st.integers(1, 16)),
        norm=draw(st.sampled_from(NORMS)),
        pool=draw(st.sampled_from(POOLS)),
        pos_embed=pos_embed,
        qkv_bias=draw(st.booleans()),
        weight_init=draw(st.sampled_from(WEIGHT_INITS)),
    )
    batch = draw(st.integers(1, 3))
    if config["norm"] == "bn" and grid == (1, 1):
        # The patch embedding's BatchNorm sees batch x patches values per feature before the CLS
        # token is added; training needs at least 2 (see the test of batch 1 with one patch).
        batch = max(batch, 2)
    return config, batch


def _images(config: dict[str, Any], batch: int) -> torch.Tensor:
    size = config["img_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, config["in_chans"], height, width)


@pytest.mark.timeout(120)
@PROPERTY
@given(valid_configs())
def test_valid_configurations_train_and_predict(drawn):
    config, batch = drawn
    model = ViT(**config)
    x = _images(config, batch)
    out = model.train()(x)
    tokens = () if config["pool"] else (model.num_tokens,)  # pool "": the head on every token
    expected = (batch, *tokens, config["num_classes"] or config["dim"])
    assert tuple(out.shape) == expected and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if config["num_classes"]:
        logits = out.reshape(-1, config["num_classes"])
        loss = F.cross_entropy(logits, torch.randint(0, config["num_classes"], (logits.shape[0],)))
    else:
        loss = out.square().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"  # DDP would need find_unused_parameters
        assert torch.isfinite(parameter.grad).all(), name
    with torch.no_grad():
        predicted = model.eval()(x)
    assert tuple(predicted.shape) == expected and torch.isfinite(predicted).all()


# ----------------------------------------------------------------------------- invalid configurations


@st.composite
def invalid_configs(draw) -> tuple[dict[str, Any], str, type]:
    """A valid configuration with one thing made invalid: `(config, name the message must show, error)`."""
    config, _ = draw(valid_configs())
    kind = draw(st.sampled_from(["patch", "non_positive", "choice", "odd_sincos", "type", "rate", "img_pair"]))
    if kind == "patch":
        patch = draw(st.integers(2, 7))
        config["patch_size"] = patch
        config["img_size"] = patch * draw(st.integers(1, 3)) + draw(st.integers(1, patch - 1))
        return config, "patch_size", ValueError
    if kind == "non_positive":
        name = draw(st.sampled_from([*INT_ARGS, "img_size", "num_classes"]))
        config[name] = draw(st.integers(-5, -1 if name == "num_classes" else 0))
        return config, name, ValueError
    if kind == "choice":
        name = draw(st.sampled_from(sorted(CHOICES)))
        config[name] = draw(st.one_of(st.text(max_size=6), st.none(), st.integers()).filter(_not_in(CHOICES[name])))
        return config, name, ValueError
    if kind == "odd_sincos":
        config.update(pos_embed="sincos", dim=2 * draw(st.integers(0, 10)) + 1)
        return config, "dim", ValueError
    if kind == "type":
        name = draw(st.sampled_from([*INT_ARGS, "img_size", "num_classes"]))
        config[name] = draw(st.sampled_from([2.0, "4", None, True, [3]]))
        return config, name, TypeError
    if kind == "rate":
        name = draw(st.sampled_from(RATE_ARGS))
        config[name] = draw(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(math.nan)))
        return config, name, ValueError
    config["img_size"] = (config["patch_size"], draw(st.integers(-3, 0)))
    return config, "img_size[1]", ValueError


def _not_in(valid: tuple[str, ...]):
    return lambda value: value not in valid


@pytest.mark.slow
@pytest.mark.timeout(120)
@PROPERTY
@given(invalid_configs())
def test_invalid_configurations_raise_a_clear_error(drawn):
    config, name, error = drawn
    with pytest.raises((ValueError, TypeError)) as info:
        ViT(**config)
    assert info.type is error, info.value
    assert name in str(info.value), info.value


@pytest.mark.timeout(120)
@PROPERTY
@given(invalid_configs(), st.sampled_from(["vitln_mnist", "vitbnffn_mnist", "vitbn_mnist"]))
def test_invalid_configurations_through_timm_raise_a_clear_error(drawn, builder):
    config, name, _ = drawn
    config.pop("norm", None)  # fixed by the builder
    if name == "norm" or config.get(name, "") is None:
        return  # timm.create_model drops None-valued keyword arguments: None means "the default" there
    with pytest.raises((ValueError, TypeError)) as info:
        timm.create_model(builder, **config)
    assert name in str(info.value), info.value


# ----------------------------------------------------------------------------- wrong inputs to forward


@st.composite
def wrong_inputs(draw) -> tuple[dict[str, Any], Any, type]:
    config, batch = draw(valid_configs())
    x = _images(config, batch)
    kind = draw(st.sampled_from(["ndim", "channels", "height", "width", "not_a_tensor", "integer"]))
    if kind == "ndim":
        # one image without its batch axis, an extra axis, no image axes, channels folded into the batch
        shape = draw(st.sampled_from([x.shape[1:], (1, *x.shape), x.shape[:2], (batch * x.shape[1], *x.shape[2:])]))
        return config, torch.rand(*shape), ValueError
    if kind in ("channels", "height", "width"):
        axis = {"channels": 1, "height": 2, "width": 3}[kind]
        shape = list(x.shape)
        shape[axis] = draw(st.integers(1, 30).filter(lambda n, old=shape[axis]: n != old))
        return config, torch.rand(*shape), ValueError
    if kind == "not_a_tensor":
        return config, draw(st.sampled_from([x.tolist(), x.numpy(), None, 1.0])), TypeError
    return config, (x * 255).to(draw(st.sampled_from([torch.uint8, torch.int64, torch.bool]))), TypeError


@pytest.mark.timeout(120)
@PROPERTY
@given(wrong_inputs())
def test_wrong_inputs_to_forward_raise_a_clear_error(drawn):
    config, x, error = drawn
    model = ViT(**config)
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises((ValueError, TypeError)) as info:
            model(x)
        assert info.type is error, info.value
        assert "expected" in str(info.value)


def test_batchnorm_training_on_a_single_value_per_feature_is_a_value_error():
    """ViTBN on one-patch images with a batch of 1: its patch BatchNorm would see one value per feature."""
    model = ViT(norm="bn", img_size=7, patch_size=7, dim=8, depth=1, heads=1, dim_head=4, mlp_dim=8)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.train()(torch.rand(1, 1, 7, 7))
    assert model.eval()(torch.rand(1, 1, 7, 7)).shape == (1, 10)  # fine with running statistics
    assert np.isfinite(model.train()(torch.rand(2, 1, 7, 7)).detach().numpy()).all()
