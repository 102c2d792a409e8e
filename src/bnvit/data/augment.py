"""The article's augmentation for a whole batch on its device, equal in distribution to torchvision's (docs/data.md)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AugmentParams", "apply_augment", "augment_batch", "augment_matrices", "sample_augment_params"]

DEGREES = 20.0
"""Rotation range of the article's `RandomRotation(20)`: uniform in `[-DEGREES, DEGREES]`."""
TRANSLATE = 0.2
"""Translation range of `RandomAffine(translate=(0.2, 0.2))`, as a fraction of the image side."""
ZOOM_P = 0.2
"""Probability of `v2.RandomZoomOut(p=0.2)`."""
SIDE_RANGE = (2.0, 3.0)
"""Canvas side range of `v2.RandomZoomOut(side_range=(2.0, 3.0))`, as a multiple of the image side."""
MAX_SIDE = 32
"""Largest image side `augment_batch` accepts; its zoom weight table grows as `side ** 4`."""

# On CPU a batch is sampled in chunks of 128 images and zoomed out in blocks of 512, sizes whose
# data stays in cache: 5,000 images in one pass are memory-bound and run at half the speed per
# image (measured on a 2-core x86 CPU). On other devices the whole batch is one pass.
_CPU_CHUNK = 128
_CPU_BLOCK = 512


class AugmentParams(NamedTuple):
    """Per-image random parameters of the article's augmentation; coordinates `(x, y)` = (column, row).

    Attributes:
        angle: `(B,)` rotation in degrees, counter-clockwise on screen.
        translate: `(B, 2)` whole pixels `(tx, ty)`; positive moves right and down.
        zoom: `(B,)` bool, whether the image is zoomed out.
        canvas: `(B, 2)` zoom-out canvas `(width, height)`.
        offset: `(B, 2)` `(left, top)` of the image on its canvas.
    """

    angle: torch.Tensor
    translate: torch.Tensor
    zoom: torch.Tensor
    canvas: torch.Tensor
    offset: torch.Tensor


def _device_of(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the images are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _check_side(height: int, width: int) -> None:
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
            raise ValueError(f"image {name} must be an int in [1, {MAX_SIDE}], got {side!r}")


def sample_augment_params(
    batch_size: int,
    *,
    height: int = 28,
    width: int = 28,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draw the augmentation parameters of `batch_size` `(height, width)` images with one `torch.rand`.

    Examples:
        >>> params = sample_augment_params(4, generator=torch.Generator().manual_seed(0))
        >>> params.angle.shape, params.translate.shape, params.zoom.dtype
        (torch.Size([4]), torch.Size([4, 2]), torch.bool)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    _check_side(height, width)
    device = _device_of(device, generator)
    _check_generator(generator, device)
    low, span, size = _param_constants(height, width, device)
    u = torch.rand(batch_size, 7, generator=generator, device=device)
    v = torch.addcmul(low, u, span)  # angle, tx, ty, zoom draw, r, left draw, top draw
    canvas = torch.floor(v[:, 4:5] * size).long()  # int(W * r), as torchvision: float32 product, truncated
    offset = torch.floor((canvas - size) * v[:, 5:7]).long()
    return AugmentParams(
        angle=v[:, 0], translate=torch.round(v[:, 1:3]), zoom=v[:, 3] < ZOOM_P, canvas=canvas, offset=offset
    )


_CONSTANTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _param_constants(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    key = ("params", height, width, device)
    if key not in _CONSTANTS:
        # float32, as torchvision computes the bounds of its translation draw (max_dx = 0.2 * W).
        mx, my = TRANSLATE * width, TRANSLATE * height
        low = torch.tensor([-DEGREES, -mx, -my, 0.0, SIDE_RANGE[0], 0.0, 0.0])
        span = torch.tensor([2 * DEGREES, 2 * mx, 2 * my, 1.0, SIDE_RANGE[1] - SIDE_RANGE[0], 1.0, 1.0])
        size = torch.tensor([width, height], dtype=torch.float32)
        _CONSTANTS[key] = (low.to(device), span.to(device), size.to(device))
    return _CONSTANTS[key]


def _rotation_features(params: AugmentParams) -> torch.Tensor:
    """`(B, 6)` products `[c, s, c tx, s tx, c ty, s ty]` that the affine matrix is linear in."""
    # [cos, sin] as sin(angle + [pi / 2, 0]): one op, and exactly [1, 0] at angle 0
    cos_sin = torch.sin(torch.add(_phase(params.angle.device), params.angle.unsqueeze(1), alpha=_DEG))  # (B, 2)
    one_t = F.pad(params.translate, (1, 0), value=1.0)  # (B, 3): 1, tx, ty
    return (one_t.unsqueeze(2) * cos_sin.unsqueeze(1)).flatten(1)


_DEG = math.pi / 180.0


def _phase(device: torch.device) -> torch.Tensor:
    key = ("phase", device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor([math.pi / 2, 0.0], device=device),)
    return _CONSTANTS[key][0]


def _feature_map(height: int, width: int, device: torch.device) -> torch.Tensor:
    """`(6, 6)` linear map from the rotation features to `affine_grid`'s flattened theta."""
    key = ("theta", height, width, device)
    if key not in _CONSTANTS:
        sx, sy = 2.0 / width, 2.0 / height
        m = np.zeros((6, 2, 3))  # rows: c, s, c tx, s tx, c ty, s ty
        m[0, 0, 0], m[1, 0, 1], m[2, 0, 2], m[5, 0, 2] = 1.0, -height / width, -sx, sx
        m[1, 1, 0], m[0, 1, 1], m[3, 1, 2], m[4, 1, 2] = width / height, 1.0, -sy, -sy
        _CONSTANTS[key] = (torch.as_tensor(m.reshape(6, 6), dtype=torch.float32, device=device),)
    return _CONSTANTS[key][0]


def augment_matrices(params: AugmentParams, height: int = 28, width: int = 28) -> torch.Tensor:
    """The per-image `(B, 2, 3)` `affine_grid` matrices of the rotation then the translation (no zoom-out).

    Each is `[[c, -s H / W, (s ty - c tx) 2 / W], [s W / H, c, -(s tx + c ty) 2 / H]]` (`align_corners=False`).

    Examples:
        >>> ids = AugmentParams(
        ...     angle=torch.zeros(1), translate=torch.zeros(1, 2), zoom=torch.zeros(1, dtype=torch.bool),
        ...     canvas=torch.full((1, 2), 56), offset=torch.zeros(1, 2, dtype=torch.long))
        >>> augment_matrices(ids)
        tensor([[[1., 0., 0.],
                 [0., 1., 0.]]])
    """
    _check_side(height, width)
    return (_rotation_features(params) @ _feature_map(height, width, params.angle.device)).view(-1, 2, 3)


def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """`(3, H * W)` homogeneous normalized coordinates `(x, y, 1)` of the output pixel centres."""
    key = ("base", height, width, device)
    if key not in _CONSTANTS:
        xs = (2 * np.arange(width) + 1) / width - 1
        ys = (2 * np.arange(height) + 1) / height - 1
        base = np.stack([np.tile(xs, height), np.repeat(ys, width), np.ones(height * width)])
        _CONSTANTS[key] = (torch.as_tensor(base, dtype=torch.float32, device=device),)
    return _CONSTANTS[key][0]


def _pil_bilinear_weights(n_out: int, n_in: int) -> np.ndarray:
    """PIL's antialiased bilinear resampling weights (`ImagingResample`), `(n_out, n_in)`."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle filter's support (1) times the filter scale
    weights = np.zeros((n_out, n_in))
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) / support), 0.0, None)
        weights[o, lo:hi] = w / w.sum()
    return weights


def _zoom_table(side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize weights of one axis for every (canvas, offset) a zoom-out can draw, as `(K, side)` bands."""
    key = ("zoom", side, device)
    if key not in _CONSTANTS:
        low, high = int(side * SIDE_RANGE[0]), int(side * SIDE_RANGE[1])
        mats, starts = [], []
        for canvas in range(low, high + 1):
            full = _pil_bilinear_weights(side, canvas)
            starts.append(len(mats))
            mats.extend(full[:, offset : offset + side] for offset in range(canvas - side + 1))
        rows = [np.flatnonzero(m.any(axis=1)) for m in mats]
        band = max(int(r[-1] - r[0] + 1) for r in rows)
        first = [min(int(r[0]), side - band) for r in rows]
        table = np.stack([m[f : f + band] for m, f in zip(mats, first, strict=True)])
        _CONSTANTS[key] = (
            torch.as_tensor(table, dtype=torch.float32, device=device),
            torch.as_tensor(starts, device=device),
            torch.as_tensor(first, device=device),
        )
    table, starts, first = _CONSTANTS[key]
    return table, starts, first


def _resize_zoomed(images: torch.Tensor, canvas: torch.Tensor, offset: torch.Tensor, quantized: bool) -> torch.Tensor:
    """Place each `(H, W)` image on its canvas and resize the canvas back; returns `(n, H * W)`."""
    n, height, width = images.shape
    if height == width:  # one table for both axes: gather x and y weights together
        table, starts, first = _zoom_table(width, images.device)
        combo = (starts[canvas - int(width * SIDE_RANGE[0])] + offset).view(-1)  # x0, y0, x1, y1, ...
        wx, wy = table.index_select(0, combo).view(n, 2, *table.shape[1:]).unbind(1)
        first_x, first_y = first.index_select(0, combo).view(n, 2).unbind(1)
    else:
        (table_x, starts_x, first_tx), (table_y, starts_y, first_ty) = (
            _zoom_table(width, images.device),
            _zoom_table(height, images.device),
        )
        combo_x = starts_x[canvas[:, 0] - int(width * SIDE_RANGE[0])] + offset[:, 0]
        combo_y = starts_y[canvas[:, 1] - int(height * SIDE_RANGE[0])] + offset[:, 1]
        wx, wy = table_x.index_select(0, combo_x), table_y.index_select(0, combo_y)
        first_x, first_y = first_tx.index_select(0, combo_x), first_ty.index_select(0, combo_y)
    if quantized:  # PIL resizes 8-bit images one axis at a time, rounding to 8 bits after each pass
        rows = torch.round(torch.matmul(images, wx.mT).mul_(255))
        band = torch.round(torch.matmul(wy, rows)).div_(255)
    else:
        band = torch.matmul(wy, torch.matmul(images, wx.mT))  # (n, Ky, Kx)
    position = (first_y * width + first_x).view(n, 1) + _band_positions(
        band.shape[1], band.shape[2], width, band.device
    )
    return images.new_zeros(n, height * width).scatter_(1, position, band.view(n, -1))


def _band_positions(rows: int, cols: int, width: int, device: torch.device) -> torch.Tensor:
    """`(1, rows * cols)` flat offsets of a `rows x cols` band in an image `width` wide."""
    key = ("band", rows, cols, width, device)
    if key not in _CONSTANTS:
        offsets = torch.arange(rows).view(rows, 1) * width + torch.arange(cols)
        _CONSTANTS[key] = (offsets.view(1, -1).to(device),)
    return _CONSTANTS[key][0]


def _zoom_out(out: torch.Tensor, params: AugmentParams, quantized: bool, *, subset: bool) -> None:
    """Replace the zoomed-out images of `out` in place; `subset` resizes only those (one host sync), else all."""
    batch, _, height, width = out.shape
    flat = out.view(batch, height * width)
    if not subset:
        resized = _resize_zoomed(out[:, 0], params.canvas, params.offset, quantized)
        flat.copy_(torch.where(params.zoom.view(-1, 1), resized, flat))
        return
    index = params.zoom.nonzero().squeeze(1)
    if index.numel():
        images = flat.index_select(0, index).view(-1, height, width)
        canvas, offset = params.canvas.index_select(0, index), params.offset.index_select(0, index)
        flat.index_copy_(0, index, _resize_zoomed(images, canvas, offset, quantized))


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0-255) or floating point (0-1), got dtype {images.dtype}")
    if images.dim() == 4 and images.shape[1] == 1:
        return images
    if images.dim() == 3:
        return images.unsqueeze(1)
    raise ValueError(f"images must have shape (B, H, W) or (B, 1, H, W), got {tuple(images.shape)}")


def apply_augment(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """`augment_batch` with given parameters: uint8 or float images in, `(B, 1, H, W)` float32 in [0, 1] out.

    Examples:
        >>> images = torch.zeros(2, 28, 28, dtype=torch.uint8)
        >>> images[:, 10:18, 12:16] = 255
        >>> params = sample_augment_params(2, generator=torch.Generator().manual_seed(0))
        >>> apply_augment(images, params).shape
        torch.Size([2, 1, 28, 28])
    """
    x = _as_batch(images)
    batch, _, height, width = x.shape
    _check_side(height, width)
    if params.angle.shape != (batch,):
        raise ValueError(f"params are for {tuple(params.angle.shape)} images, the batch has {batch}")
    if batch == 0:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    quantized = x.dtype == torch.uint8
    on_cpu = x.device.type == "cpu"
    theta = augment_matrices(params, height, width)
    base = _base_grid(height, width, x.device)
    if not on_cpu or batch <= _CPU_CHUNK:  # one pass
        out = _sample(x, theta, base, quantized)
        _zoom_out(out, params, quantized, subset=on_cpu)
        return out
    out = torch.empty((batch, 1, height, width), dtype=torch.float32, device=x.device)
    for start in range(0, batch, _CPU_BLOCK):
        stop = min(start + _CPU_BLOCK, batch)
        for first in range(start, stop, _CPU_CHUNK):
            last = min(first + _CPU_CHUNK, stop)
            out[first:last] = _sample(x[first:last], theta[first:last], base, quantized)
        _zoom_out(out[start:stop], AugmentParams(*(p[start:stop] for p in params)), quantized, subset=True)
    return out


def _sample(x: torch.Tensor, theta: torch.Tensor, base: torch.Tensor, quantized: bool) -> torch.Tensor:
    """Rotate and translate `x` `(n, 1, H, W)`: one nearest-neighbour `grid_sample`, zeros outside."""
    n, _, height, width = x.shape
    src = x / 255 if quantized else x.float()  # ToTensor: byte / 255 in float32
    # affine_grid(theta), computed as one (2n, 3) @ (3, HW) matmul: several times faster on CPU
    grid = (theta.reshape(-1, 3) @ base).view(n, 2, height, width).permute(0, 2, 3, 1)
    return F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the article's random augmentation to every image of a batch, on its device (docs/data.md).

    Args:
        images: `(B, H, W)` or `(B, 1, H, W)`; uint8 or float in [0, 1]; sides up to `MAX_SIDE`.
        generator: On the images' device; `None` uses the device's global one.

    Returns:
        `(B, 1, H, W)` float32 in [0, 1].

    Examples:
        >>> images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
        >>> out = augment_batch(images, torch.Generator().manual_seed(0))
        >>> out.shape, out.dtype
        (torch.Size([8, 1, 28, 28]), torch.float32)
        >>> torch.equal(out, augment_batch(images, torch.Generator().manual_seed(0)))
        True
    """
    x = _as_batch(images)
    batch, _, height, width = x.shape
    _check_generator(generator, x.device)
    params = sample_augment_params(batch, height=height, width=width, generator=generator, device=x.device)
    return apply_augment(x, params)
