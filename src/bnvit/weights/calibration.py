"""Calibrated probabilities: temperature scaling, its fit, and the expected calibration error (docs/weights.md).

T is fitted on held-out labelled images, never the test set; dividing the logits by it keeps every prediction.

Examples:
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> labels = torch.tensor([0, 1, 1, 1])  # right 3 times out of 4, at 98% confidence each
    >>> t = fit_temperature(logits, labels)
    >>> round(t, 3), round(float((logits / t).softmax(1).max(1).values[0]), 3)
    (3.641, 0.75)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util.io import atomic_write_text, tensors_sha256
from .loading import read_state_dict, shipped_record

__all__ = [
    "ECE_BINS",
    "MIN_ERRORS",
    "Calibration",
    "calibrate",
    "calibration_path",
    "expected_calibration_error",
    "fit_temperature",
    "model_logits",
    "read_calibration",
    "reliability",
    "shipped_temperature",
    "write_calibration",
]

ECE_BINS = 15
"""Confidence bins of the expected calibration error (the usual choice since Guo et al., 2017)."""
_BETA_RANGE = (1e-3, 1e3)  # 1 / T searched in here: T from 0.001 to 1000
MIN_ERRORS = 10
"""Wrong answers `calibrate` needs among the images it fits on: T is set by how confident the model
is when it is wrong, and with no wrong answer the fit sharpens without limit."""


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"expected tensors, got {type(logits).__name__} and {type(labels).__name__}")
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(
            f"expected logits (N, classes) and labels (N,) with N >= 1, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the logits hold NaN or infinite values")
    if labels.dtype.is_floating_point or int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must be integers in 0..{logits.shape[1] - 1}")
    return logits.detach().double().cpu(), labels.detach().long().cpu()


def _nll_slope(beta: float, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """d/d(beta) of the mean NLL of softmax(beta * logits): mean of E_p[z] - z_label (increasing in beta)."""
    p = (beta * logits).softmax(dim=1)
    return float(((p * logits).sum(1) - logits.gather(1, labels[:, None])[:, 0]).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimizing the mean NLL of `softmax(logits / T)`, found exactly by bisection.

    Args:
        logits: `(N, classes)` logits of held-out images (never the test set's).

    Returns:
        T in [0.001, 1000]; the bounds only for degenerate data.

    Raises:
        TypeError, ValueError: For anything but finite `(N, C)` logits and `(N,)` labels in range.

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> labels = torch.randint(0, 10, (2000,))
        >>> true = torch.nn.functional.one_hot(labels, 10).double() * 3 + torch.randn(2000, 10)
        >>> round(fit_temperature(true * 5, labels) / fit_temperature(true, labels), 6)  # 5x the logits, 5x T
        5.0
    """
    logits, labels = _check_logits(logits, labels)
    lo, hi = (math.log(b) for b in _BETA_RANGE)
    if _nll_slope(math.exp(lo), logits, labels) >= 0:
        return 1 / _BETA_RANGE[0]
    if _nll_slope(math.exp(hi), logits, labels) <= 0:
        return 1 / _BETA_RANGE[1]
    for _ in range(100):  # bisection in log(beta): 2**-100 of the range, far below float64's resolution of T
        mid = (lo + hi) / 2
        if _nll_slope(math.exp(mid), logits, labels) < 0:
            lo = mid
        else:
            hi = mid
    return 1 / math.exp((lo + hi) / 2)


def reliability(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> list[dict[str, float | int]]:
    """The bins of a reliability diagram: images grouped by confidence (their top probability).

    Args:
        probabilities: `(N, classes)`, rows summing to 1.
        bins: Number of equal-width confidence bins over [0, 1].

    Returns:
        Per non-empty bin a dict of `lower`, `upper`, `count`, `confidence` and `accuracy`.

    Examples:
        >>> p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
        >>> [(b["count"], round(b["confidence"], 2), b["accuracy"]) for b in reliability(p, torch.tensor([0, 1, 1]), 5)]
        [(1, 0.6, 1.0), (2, 0.9, 0.5)]
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    probabilities, labels = _check_logits(probabilities, labels)
    confidence, predicted = probabilities.max(dim=1)
    right = (predicted == labels).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    out = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        if count:
            out.append(
                dict(
                    lower=i / bins,
                    upper=(i + 1) / bins,
                    count=count,
                    confidence=float(confidence[members].mean()),
                    accuracy=float(right[members].mean()),
                )
            )
    return out


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The expected calibration error: the count-weighted mean of |accuracy - confidence| over the bins.

    Examples:
        >>> p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
        >>> round(expected_calibration_error(p, torch.tensor([0, 1, 1]), bins=5), 4)  # (1 * 0.4 + 2 * 0.4) / 3
        0.4
    """
    table = reliability(probabilities, labels, bins)
    total = sum(b["count"] for b in table)
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / total


def model_logits(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A model's float32 logits `(N, classes)` on the CPU, in eval mode without gradients.

    Args:
        model: A classifier of `(B, 1, 28, 28)` images in [0, 1].
        images: uint8 `(N, 28, 28)` (as `bnvit.data.load_mnist` returns) or float `(N, 1, 28, 28)` in [0, 1].
    """
    if images.dtype == torch.uint8:
        images = images.float().div(255).unsqueeze(1) if images.ndim == 3 else images.float().div(255)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [
                model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and its effect on the images held out of its fit.

    Attributes:
        temperature: Divide the logits by it before the softmax.
        images: Images given: `images - held_out` fitted T, `held_out` checked it.
        source: Which images (a sentence).
        nll_before: Held-out mean negative log-likelihood at T = 1.
        nll_after: The same at the fitted T.
        ece_before: Held-out expected calibration error at T = 1.
        ece_after: The same at the fitted T.
        held_out: Images that checked the fit (every other one).
        errors: Fitting images the model gets wrong.
    """

    temperature: float
    images: int
    source: str
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    held_out: int
    errors: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    source: str = "held-out images",
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> Calibration:
    """Fit a model's temperature on even-position images and check it on the odd ones (never the test set).

    Args:
        model: The classifier (eval mode for the fit, then restored).
        images: Held-out images (forms as for `model_logits`).
        source: Which images these are, recorded with the result.

    Returns:
        The `Calibration`, with NLL and ECE on the checking images before and after.

    Raises:
        ValueError: Fewer than `MIN_ERRORS` errors to fit on, T at a search bound, or ECE rising.

    Examples:
        >>> import bnvit
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
        >>> calibrate(bnvit.ViTBNFFN(depth=1), images, labels, source="random pixels")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: refusing the temperature fit on random pixels: it ended at T = 1000, ...
    """
    logits = model_logits(model, images, batch_size=batch_size, device=device)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} images but {len(labels)} labels")
    labels = labels.long().cpu()
    fit_logits, fit_labels, check_logits, check_labels = logits[0::2], labels[0::2], logits[1::2], labels[1::2]
    errors = int((fit_logits.argmax(1) != fit_labels).sum()) if len(fit_labels) else 0
    if errors < MIN_ERRORS:
        raise ValueError(
            f"too few errors to fit a temperature on {source}: the model is wrong on {errors} of the "
            f"{len(fit_labels):,} images it would be fitted on, and needs at least {MIN_ERRORS} (T is set by how "
            "confident it is when wrong); calibrate on more images, or on images it finds harder"
        )
    temperature = fit_temperature(fit_logits, fit_labels)
    result = _measured(temperature, check_logits, check_labels, images=len(labels), source=source, errors=errors)
    low, high = 1 / _BETA_RANGE[1], 1 / _BETA_RANGE[0]
    if not low * (1 + 1e-9) < temperature < high * (1 - 1e-9):
        accuracy = 1 - errors / len(fit_labels)
        why = "sharpen without limit" if temperature < 1 else f"be flattened to chance (accuracy {accuracy:.1%})"
        raise ValueError(
            f"refusing the temperature fit on {source}: it ended at T = {temperature:g}, a bound of its search "
            f"({low:g} to {high:g}), with {errors} of {len(fit_labels):,} images wrong: the probabilities would {why}"
        )
    if result.ece_after > result.ece_before:
        raise ValueError(
            f"refusing the temperature fit on {source}: T = {temperature:.4f} raises the expected calibration "
            f"error on the {result.held_out:,} held-out images from {result.ece_before:.2%} to {result.ece_after:.2%} "
            f"(negative log-likelihood {result.nll_before:.4f} -> {result.nll_after:.4f}): the raw softmax is "
            "better calibrated there"
        )
    return result


def _measured(
    temperature: float, logits: torch.Tensor, labels: torch.Tensor, *, images: int, source: str, errors: int
) -> Calibration:
    """`temperature` with the NLL and ECE before and after on the checking images `logits`, `labels`."""

    def nll(t: float) -> float:
        return float(nn.functional.cross_entropy(logits.double() / t, labels))

    return Calibration(
        temperature=temperature,
        images=images,
        source=source,
        nll_before=nll(1.0),
        nll_after=nll(temperature),
        ece_before=expected_calibration_error(logits.softmax(1), labels),
        ece_after=expected_calibration_error((logits.double() / temperature).softmax(1), labels),
        held_out=len(labels),
        errors=errors,
    )


# ----------------------------------------------------------------------------- where temperatures live


def shipped_temperature(name: str) -> float | None:
    """The calibrated temperature of `name`'s shipped weights (old names accepted), or None.

    Examples:
        >>> 0.1 < shipped_temperature("vitbnffn_mnist") < 1.0  # label smoothing made the logits timid
        True
        >>> shipped_temperature("vitln_cifar") is None
        True
    """
    record = shipped_record(name)
    return None if record is None else float(record["calibration"]["temperature"])


def calibration_path(checkpoint: str | os.PathLike) -> Path:
    """Where `write_calibration` puts a checkpoint's temperature: `<checkpoint>.calibration.json`."""
    path = Path(checkpoint)
    return path.with_name(path.name + ".calibration.json")


def write_calibration(checkpoint: str | os.PathLike, calibration: Calibration) -> Path:
    """Write `calibration` atomically beside `checkpoint`, tied to its tensors by sha256; returns the file."""
    sha256 = tensors_sha256(read_state_dict(checkpoint))
    path = calibration_path(checkpoint)
    atomic_write_text(path, json.dumps(dict(calibration.to_dict(), sha256=sha256), indent=2) + "\n")
    return path


def read_calibration(checkpoint: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> float | None:
    """The temperature `write_calibration` stored beside `checkpoint`, or None if there is none.

    Args:
        state_dict: Its tensors if already read; else read here.

    Raises:
        ValueError: If the file is unreadable or was written for other weights (stale: refused).
    """
    path = calibration_path(checkpoint)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        temperature, sha256 = float(stored["temperature"]), str(stored["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a calibration file bnvit wrote ({type(err).__name__}: {err})") from err
    if not 0 < temperature < math.inf:
        raise ValueError(f"{path}: temperature {temperature} is not a positive finite number")
    tensors = state_dict if state_dict is not None else read_state_dict(checkpoint)
    if tensors_sha256(tensors) != sha256:
        raise ValueError(
            f"{path} was fitted for other weights than those now in {checkpoint}; run `bnvit calibrate "
            f"{checkpoint}` again, or delete it"
        )
    return temperature
