"""Turn a picture of a handwritten digit into an MNIST-style 28x28 image (docs/deployment.md)."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MNIST_BOX",
    "MNIST_SIZE",
    "RASTER_FORMATS",
    "load_image",
    "open_raster",
    "prepare_digit",
    "printable",
]

MNIST_SIZE = 28
"""Side of an MNIST image."""
MNIST_BOX = 20
"""Side of the box an MNIST digit is scaled into (its longer side)."""
MAX_IMAGE_PIXELS = 50_000_000
"""The most pixels `load_image` decodes (50 megapixels: a phone's photo at full resolution is 12 to 50)."""
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO")
"""The image formats bnvit opens (PIL's names): raster formats PIL decodes itself. PostScript, EPS
and PDF are never opened: PIL hands them to Ghostscript, an interpreter of the file's program."""
ACCEPTED_FORMATS = "PNG, JPEG, GIF, BMP, TIFF, WebP, PBM/PGM/PPM, TGA or ICO"
"""`RASTER_FORMATS` as an error message names them."""
_INTERPRETED = {b"%!PS-Adobe-3.0 EPSF": "EPS", b"%!": "PostScript", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF"}
_FLOAT_PEAK = 1e6  # float pictures with larger values are divided by their peak first (float32 overflows near 3.4e38)
_CENTRE = 14.0  # MNIST's centre of mass, in pixel-index coordinates (measured: 13.99 / 14.01 on the test set)
_WORK_SIDE = 512  # larger pictures are first reduced to this longer side (plenty for a 20-pixel digit)
_BACKGROUND_SIDE = 64  # the background (uneven light) is estimated at this longer side at most

ImageLike = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
"""What `prepare_digit` accepts."""


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open an image file with PIL and decode it fully, EXIF orientation applied, checking its size first.

    Args:
        path: The image file, in one of `RASTER_FORMATS`.
        max_pixels: The most pixels accepted; default `MAX_IMAGE_PIXELS`.

    Returns:
        The decoded image, in its own mode.

    Raises:
        FileNotFoundError: If `path` does not exist.
        IsADirectoryError: If `path` is a folder.
        ValueError: Not a regular file, not a raster image, truncated, corrupt, or over `max_pixels`.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "blank.png"
        >>> Image.new("L", (40, 30), 255).save(path)
        >>> load_image(path).size
        (40, 30)
        >>> load_image(path, max_pixels=1000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../blank.png is 40x30 pixels (1,200); at most 1,000 are read
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    with _open_regular(path) as handle:
        try:
            with warnings.catch_warnings():  # PIL's own bomb warning: the size is checked below, against `limit`
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = open_raster(handle, str(path))
        except Image.DecompressionBombError as err:
            raise ValueError(f"{path} has too many pixels to read ({err})") from err
        with image:
            width, height = image.size
            if width * height > limit:
                raise ValueError(f"{path} is {width}x{height} pixels ({width * height:,}); at most {limit:,} are read")
            try:
                image.load()
                return ImageOps.exif_transpose(image)
            except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
                raise ValueError(f"cannot read the image {path}: {err}") from err


def open_raster(source: BinaryIO, name: str) -> Image.Image:
    """Open an image's header if it is in `RASTER_FORMATS`; PostScript, EPS and PDF (Ghostscript input) are refused.

    Args:
        source: A binary file object at the image's start.
        name: What to call the image in an error message.

    Returns:
        The opened, not yet decoded image.

    Raises:
        ValueError: Another format, no image, or a header PIL cannot parse (one line naming `name`).
        PIL.Image.DecompressionBombError: From PIL, for a header announcing far too many pixels.

    Examples:
        >>> open_raster(io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\\n"), "drawing.eps")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: drawing.eps is an EPS file, read by an interpreter, not a raster image; not opened: use PNG, ...
    """
    start = source.tell()
    head = source.read(32)
    source.seek(start)
    kind = next((kind for magic, kind in _INTERPRETED.items() if head.lstrip(b"\r\n\t ").startswith(magic)), None)
    if kind is not None:
        raise ValueError(
            f"{name} is a{'n' if kind[0] in 'AEIOU' else ''} {kind} file, read by an interpreter, not a raster image; "
            f"not opened: use {ACCEPTED_FORMATS}"
        )
    try:
        return Image.open(source, formats=RASTER_FORMATS)
    except UnidentifiedImageError:  # PIL's own message names only the open file object
        raise ValueError(f"{name} is not an image file in a format bnvit reads ({ACCEPTED_FORMATS})") from None
    except (OSError, SyntaxError, ValueError) as err:  # a header PIL cannot parse
        raise ValueError(f"cannot read the image {name}: {err}") from None


def printable(text: str) -> str:
    """`text` with each character that would break a line or a terminal escaped (`\\n`, `\\x1b`, ...).

    Examples:
        >>> printable("two\\nlines.png")
        'two\\\\nlines.png'
        >>> printable("chiffre_sept.png")
        'chiffre_sept.png'
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


def _open_regular(path: Path) -> io.BufferedReader:
    """`path` opened for reading if it is a regular file; never blocks (a FIFO is refused, not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"expected an image file, {path} is a folder") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"expected an image file, {path} is a folder")
        raise ValueError(f"{path} is not a regular file ({_file_kind(mode)}); expected an image file")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def prepare_digit(image: ImageLike) -> torch.Tensor:
    """Prepare a picture of one handwritten digit the way MNIST digits were prepared (docs/deployment.md).

    Grayscale, uneven light taken out, light ink on black, cropped, longer side scaled to 20 pixels
    and centred by centre of mass in 28x28. An MNIST-like digit comes out nearly unchanged.

    Args:
        image: A PIL image, a file path, or a 2-D array or tensor (a singleton channel axis allowed).

    Returns:
        A float32 `(1, 28, 28)` tensor in [0, 1]: `model(prepare_digit(img)[None])`.

    Raises:
        TypeError: If `image` is none of the accepted types.
        ValueError: A bad shape, non-finite values, an unreadable file, or a blank image.

    Examples:
        >>> from PIL import Image, ImageDraw
        >>> photo = Image.new("RGB", (120, 90), (235, 235, 225))  # a dark "1" on light paper
        >>> ImageDraw.Draw(photo).line([(70, 15), (66, 75)], fill=(30, 30, 40), width=7)
        >>> x = prepare_digit(photo)
        >>> x.shape, x.dtype, float(x.min()), float(x.max())
        (torch.Size([1, 28, 28]), torch.float32, 0.0, 1.0)
        >>> rows = (x[0] > 0).any(1).nonzero()
        >>> int(rows.max() - rows.min() + 1)  # the longer side is 20 pixels
        20
    """
    gray = _to_gray(image)
    return _prepare(gray)[None]


# ---------------------------------------------------------------------- grayscale


def _to_gray(image: ImageLike) -> torch.Tensor:
    """A float32 `(H, W)` tensor, larger values brighter, in the input's own scale."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return _within_float32(_pil_to_gray(image))
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _within_float32(_array_to_gray(image))
    raise TypeError(
        f"prepare_digit needs a PIL image, a file path, or a 2-D array or tensor, got {type(image).__name__}"
    )


def _pil_to_gray(image: Image.Image) -> torch.Tensor:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"the image is empty ({image.width}x{image.height} pixels)")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):  # 16/32-bit integer or float images
        return torch.from_numpy(np.array(image, dtype=np.float32))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = torch.from_numpy(np.array(rgba.getchannel("A"), dtype=np.float32) / 255.0)
        luma = torch.from_numpy(np.array(rgba.convert("L"), dtype=np.float32) / 255.0)
        if float(alpha.min()) < 1.0:
            # Lay the picture on the background that contrasts with its visible ink.
            visible = alpha.sum()
            ink = float((luma * alpha).sum() / visible) if visible > 0 else 0.0
            background = 0.0 if ink > 0.5 else 1.0
            luma = luma * alpha + background * (1 - alpha)
        return luma
    return torch.from_numpy(np.array(image.convert("L"), dtype=np.float32) / 255.0)


def _within_float32(gray: torch.Tensor) -> torch.Tensor:
    """A float32 image divided by its peak if over `_FLOAT_PEAK`, so that its differences cannot overflow."""
    if not torch.isfinite(gray).all():
        raise ValueError("the image has NaN or infinite values")
    peak = float(gray.abs().max().double()) if gray.numel() else 0.0
    if peak > _FLOAT_PEAK:
        gray = (gray.double() / peak).float()
    return gray.float()


def _array_to_gray(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array.detach().cpu())
    shape = tuple(tensor.shape)
    if tensor.ndim == 3 and shape[0] == 1:
        tensor = tensor[0]
    elif tensor.ndim == 3 and shape[-1] == 1:
        tensor = tensor[..., 0]
    if tensor.ndim != 2 or tensor.numel() == 0:
        raise ValueError(f"expected a 2-D grayscale image (H, W), or (1, H, W) / (H, W, 1); got shape {shape}")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.is_complex():
        raise TypeError(f"expected a real-valued image, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.double()  # int64 beyond float32's range is scaled down before the cast
    if not torch.isfinite(tensor).all():
        raise ValueError("the image has NaN or infinite values")
    return tensor


# ---------------------------------------------------------------------- MNIST steps


def _median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter of an `(H, W)` tensor (borders replicated)."""
    padded = F.pad(x[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    return padded.unfold(0, 3, 1).unfold(1, 3, 1).reshape(*x.shape, 9).median(dim=-1).values


def _otsu(x: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist = torch.histc(x.double(), bins=bins, min=0.0, max=1.0)
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    omega = p.cumsum(0)
    mu = (p * centres).cumsum(0)
    between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    between = torch.nan_to_num(between, nan=0.0, posinf=0.0)
    return float((int(between.argmax()) + 1) / bins)


def _border(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape
    band = max(1, round(0.04 * min(h, w)))
    return torch.cat([x[:band].flatten(), x[-band:].flatten(), x[:, :band].flatten(), x[:, -band:].flatten()])


def _robust_background(values: torch.Tensor) -> float:
    """Median + 3 robust standard deviations (1.4826 MAD) of the background pixels."""
    if values.numel() == 0:
        return 0.0
    median = values.median()
    mad = (values - median).abs().median()
    return float(median + 3 * 1.4826 * mad)


def _background(x: torch.Tensor, ink_dark: bool, rounds: int = 10) -> tuple[torch.Tensor, float]:
    """The light falling on `x` (a quadratic fitted robustly to the non-ink pixels), and the noise around it."""
    h, w = x.shape
    scale = min(1.0, _BACKGROUND_SIDE / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(x[None, None].double(), size=size, mode="area")[0, 0] if scale < 1 else x.double()
    basis, values = _quadratic_basis(*size), small.flatten()
    middle = values.median()  # to start, the half of the pixels on the background's side (ink is the smaller part)
    keep = values >= middle if ink_dark else values <= middle
    coef = torch.zeros(6, 1, dtype=torch.float64)
    coef[0] = middle  # too few pixels for a surface (a tiny picture): a flat background at the median
    for _ in range(rounds):
        if int(keep.sum()) < 12:
            break
        coef = torch.linalg.lstsq(basis[keep], values[keep, None]).solution
        residual = values - (basis @ coef)[:, 0]
        centre = residual[keep].median()
        spread = float(1.4826 * (residual[keep] - centre).abs().median())
        kept = residual >= centre - 2.5 * spread if ink_dark else residual <= centre + 2.5 * spread
        if torch.equal(kept, keep):
            break
        keep = kept
    surface = (_quadratic_basis(h, w) @ coef)[:, 0].reshape(h, w).float()
    # The noise at full size, from the side of the surface away from the ink (ink never lies there).
    away = (x - surface) if ink_dark else (surface - x)
    away = away[away > 0]
    return surface, 1.4826 * float(away.median()) if away.numel() else 0.0


def _quadratic_basis(rows: int, cols: int) -> torch.Tensor:
    """`(rows * cols, 6)`: 1, x, y, x², xy, y² at every pixel, with x and y from -1 to 1."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, rows, dtype=torch.float64),
        torch.linspace(-1, 1, cols, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack([torch.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], dim=-1).reshape(-1, 6)


def _flatten(norm: torch.Tensor, paper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm` with its uneven light taken out (divided on paper, subtracted on dark), and its per-pixel noise."""
    background, noise = _background(norm, ink_dark=paper)
    if paper:
        background = background.clamp_min(1e-3)
        return (1 - norm / background).clamp(0, 1), noise / background
    return (norm - background).clamp(0, 1), torch.full_like(norm, noise)


def _prepare(gray: torch.Tensor) -> torch.Tensor:
    h, w = gray.shape
    if not torch.isfinite(gray).all():
        raise ValueError("the image has NaN or infinite values")
    if max(h, w) > _WORK_SIDE:
        scale = _WORK_SIDE / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        gray = F.interpolate(gray[None, None], size=size, mode="area")[0, 0]
        h, w = size

    # Contrast: stretch to [0, 1] using the extremes of the median-filtered image (robust to noise).
    smooth = _median3(gray)
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi), abs(lo)):
        raise ValueError(f"the image is blank (all pixels about {hi:.3g}): there is no digit to find")
    norm = ((gray - lo) / (hi - lo)).clamp(0, 1)
    smooth = ((smooth - lo) / (hi - lo)).clamp(0, 1)

    # MNIST digits are light on dark: invert a light background. Uneven light (a shadow across the
    # paper) is taken out first, so that the dark side of the background is not mistaken for ink.
    paper = float(_border(smooth).median()) > 0.5
    norm, noise = _flatten(norm, paper)
    smooth = _median3(norm)
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi - lo <= 1e-6:
        raise ValueError("the image is blank once its uneven light is taken out: there is no digit to find")
    norm = ((norm - lo) / (hi - lo)).clamp(0, 1)
    smooth = ((smooth - lo) / (hi - lo)).clamp(0, 1)
    noise = noise / (hi - lo)

    # Ink against background: background to 0 (with its noise), ink to 1.
    threshold = _otsu(smooth)
    ink = smooth > threshold
    # In a shadow the division amplified the noise too: there, ink must also stand out from the
    # noise (twice its standard deviation, on the median-filtered picture where it is less than half).
    ink &= smooth > 2 * noise
    if not bool(ink.any()):
        raise ValueError("no digit found in the image (nothing stands out from the background)")
    # The cut: 3 standard deviations of the background noise, measured before the clamp at 0 (`noise`,
    # larger in a shadow) or around the background's median, whichever is higher.
    cut = (3 * noise).clamp_min(_robust_background(norm[~ink])).clamp_max(0.9 * threshold)
    top = float(torch.quantile(norm[ink].double(), 0.9))
    if top <= float(cut.max()):
        top = 1.0
    digit = ((norm - cut) / (top - cut)).clamp(0, 1)

    # Bounding box: the ink (found on the filtered image) with a margin, then tight on what is left.
    margin = max(2, round(0.03 * max(h, w)))
    rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    r0, r1 = max(0, int(rows.min()) - margin), min(h, int(rows.max()) + margin + 1)
    c0, c1 = max(0, int(cols.min()) - margin), min(w, int(cols.max()) + margin + 1)
    region = digit[r0:r1, c0:c1]
    mask = region > 0
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    crop = region[int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]

    # Longer side to 20 pixels, keeping the aspect ratio, with anti-aliasing.
    ch, cw = crop.shape
    scale = MNIST_BOX / max(ch, cw)
    size = (max(1, round(ch * scale)), max(1, round(cw * scale)))
    small = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    small = small.clamp(0, 1)
    small = small / small.max().clamp_min(1e-12)  # strokes at full brightness again after the averaging

    # Centre of mass to the centre of the 28x28 field.
    mass = small.sum()
    if float(mass) <= 0:
        raise ValueError("no digit found in the image (nothing stands out from the background)")
    com_y = float((small.sum(1) * torch.arange(size[0])).sum() / mass)
    com_x = float((small.sum(0) * torch.arange(size[1])).sum() / mass)
    top_row = min(max(round(_CENTRE - com_y), 0), MNIST_SIZE - size[0])
    left_col = min(max(round(_CENTRE - com_x), 0), MNIST_SIZE - size[1])
    canvas = torch.zeros(MNIST_SIZE, MNIST_SIZE)
    canvas[top_row : top_row + size[0], left_col : left_col + size[1]] = small
    return canvas
