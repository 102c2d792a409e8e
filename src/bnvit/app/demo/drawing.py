"""What the demo does with a drawing, apart from HTTP: decode it within bounds, prepare it, classify it.

`bnvit.app.demo.server` calls these from its request handler; they are plain functions, so
they are tested and used without a server.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn

from ..._util.checks import check_bn_statistics, first_line
from ...data.digits import open_raster, prepare_digit
from ...data.marks import one_digit_problem

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DRAWING_PIXELS",
    "MAX_IMAGE_SIDE",
    "DemoModel",
    "DrawingError",
    "classify_drawing",
    "decode_drawing",
    "describe",
    "prepare_drawing",
]

MAX_BODY_BYTES = 1 << 20
"""Largest request body `POST /api/predict` accepts (1 MiB; a drawn canvas is a few tens of kB)."""
MAX_DRAWING_SIDE = 1024
MAX_DRAWING_PIXELS = MAX_DRAWING_SIDE * MAX_DRAWING_SIDE
"""Most pixels of a drawing (1024x1024; the page's 280-pixel canvas at a screen's pixel ratio stays under it),
read from the image's header before any pixel is decoded: a 28 kB PNG can decode to 16 MB."""
MAX_IMAGE_SIDE = 2048
"""Largest width or height of a drawing, in pixels (checked with the pixel count, before decoding)."""

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")
_NORM_NAMES = {"ln": "ViT (LayerNorm)", "bn_ffn": "ViTBNFFN", "bn": "ViTBN"}


class DrawingError(ValueError):
    """A request the demo cannot classify; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DemoModel:
    """A model the demo serves.

    Args:
        name: Shown above its chart (a checkpoint's file name, say).
        model: An inference-ready classifier of `(B, 1, 28, 28)` images in [0, 1] into 10
            classes (`bnvit.for_inference(model)`).
        description: One line under the name; by default read from a bnvit `ViT`'s config
            (`"ViTBNFFN, depth 5"`).
        temperature: The probabilities shown are `softmax(logits / temperature)`: the model's
            calibrated temperature (`bnvit.weights.calibration`), or 1 for the raw softmax.

    Raises:
        ValueError: If a BatchNorm of `model` holds statistics no BatchNorm can have (a
            negative or non-finite running variance, a non-finite running mean).
    """

    name: str
    model: nn.Module
    description: str = field(default="")
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_bn_statistics(self.model, f"the demo's model {self.name!r}")
        if not self.description:
            object.__setattr__(self, "description", describe(self.model))
        if isinstance(self.temperature, bool) or not 0 < float(self.temperature) < float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")


def describe(model: nn.Module) -> str:
    """`"ViTBNFFN, depth 5"` for a bnvit `ViT`, else the class name of `model`."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "norm" in config and "depth" in config:
        return f"{_NORM_NAMES.get(config['norm'], config['norm'])}, depth {config['depth']}"
    return type(model).__name__


def decode_drawing(body: bytes) -> Image.Image:
    """The image in a `POST /api/predict` body, decoded; a `DrawingError` says what is wrong with it.

    Args:
        body: The request body: JSON `{"image": "<base64 PNG/JPEG/..., optionally as a data: URL>"}`.

    Returns:
        The decoded PIL image (EXIF orientation applied, as `bnvit.data.load_image` does for files).

    Raises:
        DrawingError: 400 for anything that is not such a JSON object with a readable image,
            413 for an image over `MAX_DRAWING_PIXELS` pixels or `MAX_IMAGE_SIDE` on a side (read from its header).

    Examples:
        >>> decode_drawing(b'{"image": 3}')
        Traceback (most recent call last):
        ...
        bnvit.app.demo.drawing.DrawingError: "image" must be a string (a base64 PNG or a data: URL), got int
    """
    try:
        payload = json.loads(body)
    except ValueError as err:  # not UTF-8, not JSON, or an integer too long for Python to read (4,300 digits)
        raise DrawingError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {first_line(err)}") from None
    except RecursionError:
        raise DrawingError(
            HTTPStatus.BAD_REQUEST, 'the request body nests JSON too deeply; expected {"image": "..."}'
        ) from None
    if not isinstance(payload, dict) or set(payload) != {"image"}:
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise DrawingError(
            HTTPStatus.BAD_REQUEST,
            f'expected a JSON object with one field, {{"image": "data:image/png;base64,..."}}; got {got}',
        )
    text = payload["image"]
    if not isinstance(text, str):
        raise DrawingError(
            HTTPStatus.BAD_REQUEST,
            f'"image" must be a string (a base64 PNG or a data: URL), got {type(text).__name__}',
        )
    try:
        data = base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError) as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, f'"image" is not valid base64: {err}') from None
    if not data:
        raise DrawingError(HTTPStatus.BAD_REQUEST, '"image" is empty')
    return _open_image(data)


def _open_image(data: bytes) -> Image.Image:
    try:
        image = open_raster(io.BytesIO(data), '"image"')
    except Image.DecompressionBombError as err:
        raise DrawingError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f'"image" has too many pixels: {err}') from None
    except ValueError as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, str(err)) from None
    width, height = image.size  # from the header: nothing is decoded yet
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_DRAWING_PIXELS:
        image.close()
        raise DrawingError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the drawing is {width}x{height} pixels; at most {MAX_DRAWING_PIXELS:,} pixels "
            f"({MAX_DRAWING_SIDE}x{MAX_DRAWING_SIDE}) and {MAX_IMAGE_SIDE} on a side",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DrawingError(HTTPStatus.BAD_REQUEST, f'"image" is truncated or corrupt: {err}') from None


def prepare_drawing(image: Image.Image) -> torch.Tensor:
    """The `(1, 28, 28)` model input of a drawing (`bnvit.data.prepare_digit`); a `DrawingError` 422 if blank."""
    try:
        return prepare_digit(image)
    except ValueError as err:
        raise DrawingError(HTTPStatus.UNPROCESSABLE_ENTITY, f"no digit to classify: {err}") from None


def classify_drawing(models: Sequence[DemoModel], image: Image.Image | torch.Tensor) -> dict[str, Any]:
    """Prepare a drawing like `bnvit predict` prepares a picture and classify it with each model.

    Each model's probabilities are `softmax(logits / temperature)`, with its `DemoModel.temperature`.

    Args:
        models: The models to ask.
        image: The drawing (any PIL image; dark on light or light on dark), or its model input
            as `prepare_drawing` returns it.

    Returns:
        `{"input": the 28x28 model input as rows of 0-255 ints, "models": [{"name", "digit",
        "probability", "probabilities"}, ...], "one_digit": bool, "not_one_digit": why not, or None}`:
        when `one_digit` is False (several marks side by side, or ink unlike a digit's,
        `bnvit.data.marks.one_digit_problem`), each model's digit is only its guess.

    Raises:
        DrawingError: 422 if there is no digit in the drawing (a blank canvas).
    """
    x = image if isinstance(image, torch.Tensor) else prepare_drawing(image)
    results = []
    for served in models:
        device = next(iter(served.model.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            p = (served.model(x[None].to(device)).float() / served.temperature).softmax(dim=1)[0].cpu()
        digit = int(p.argmax())
        results.append(
            dict(name=served.name, digit=digit, probability=float(p[digit]), probabilities=[float(v) for v in p])
        )
    pixels = (x[0] * 255).round().to(torch.uint8)  # (28, 28)
    problem = one_digit_problem(x)
    return dict(input=pixels.tolist(), models=results, one_digit=problem is None, not_one_digit=problem)
