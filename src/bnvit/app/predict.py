"""`bnvit predict`: pictures of digits through a classifier, a batch at a time, each guess marked as one."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.digits import prepare_digit, printable
from ..data.marks import one_digit_problem
from ..inference.deploy import for_inference
from .loading import SHIPPED_MODEL, CommandError, _checkpoint_temperature, _device, _load_classifier, _source

__all__ = ["NOT_ONE_DIGIT", "PREDICT_BATCH", "iter_predict", "predict"]

NOT_ONE_DIGIT = 3
"""Exit status of `bnvit predict` when every file was classified but at least one does not hold one
digit (`bnvit.data.marks.one_digit_problem`): its answer is the model's guess. Bad input (2) wins."""

PREDICT_BATCH = 256
"""How many images `bnvit predict` prepares and classifies at once: its memory does not grow with the file count."""


def _prepare_each(paths: Sequence[str]) -> list[torch.Tensor | str]:
    """Each image prepared, or the one-line error that says why it cannot be."""
    prepared: list[torch.Tensor | str] = []
    for path in paths:
        try:
            prepared.append(prepare_digit(Path(path)))
        except (OSError, ValueError) as err:
            prepared.append(printable(f"image {path}: {err}"))  # a name with a newline stays on one line
    return prepared


def predict(
    images: Sequence[str],
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    top_k: int = 3,
    temperature: float | None = None,
    batch_size: int = PREDICT_BATCH,
    model: str | None = None,
) -> list[dict]:
    """Classify digit pictures with a checkpoint: the work of `bnvit predict`.

    An image that cannot be used does not stop the others; every image's problem and the
    checkpoint's are reported together. The images go through the model `batch_size` at a
    time (`iter_predict` yields the results as each batch is done).

    Args:
        images: Image files.
        checkpoint: A bnvit or reference ViT checkpoint for 28x28x1 images with 10 classes, or
            the name of weights shipped with bnvit (`vitln_mnist`); `None` uses the trained
            `vitbnffn_mnist` weights shipped with bnvit.
        device: Where to run the model (`"cpu"`, `"cuda"`, `"auto"`, ...).
        top_k: How many classes to list per image (at most 10).
        temperature: Divide the logits by it before the softmax; `None`: the checkpoint's
            calibrated temperature (the shipped weights' own, or the one `bnvit calibrate`
            wrote beside the checkpoint), else 1.
        batch_size: How many images are prepared and classified at once.
        model: The name of weights shipped with bnvit (`vitbnffn_mnist`, `vitln_mnist`),
            instead of `checkpoint`.

    Returns:
        One dict per image, in order. For an image classified: `file`, `digit` (the
        prediction), `probability`, `top_k` (a list of `{"digit", "probability"}`, most likely
        first), `probabilities` (all 10), `temperature`, `one_digit` (False when the picture
        does not hold one digit: several marks side by side, or ink unlike a digit's; `digit`
        is then only the model's guess) and `not_one_digit` (why, or None). For an image that
        could not be used: `file` and `error` (one line naming the file and what is wrong).

    Raises:
        CommandError: For an unsuitable checkpoint or an invalid option; the message names
            the file or value (one line each, after the lines of any image that could not be used).

    Examples:
        >>> predict(["seven.png"], "FinOptAug1_ViT_30.pth")[0]["digit"]  # doctest: +SKIP
        7
    """
    options = dict(device=device, top_k=top_k, temperature=temperature, batch_size=batch_size, model=model)
    return list(iter_predict(images, checkpoint, **options))


def iter_predict(
    images: Sequence[str],
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    top_k: int = 3,
    temperature: float | None = None,
    batch_size: int = PREDICT_BATCH,
    model: str | None = None,
) -> Iterator[dict]:
    """`predict`'s results one at a time, `batch_size` images in memory at once, whatever their number.

    The options and the checkpoint are checked, and the model loaded, before this returns: a
    `CommandError` is raised here, not while iterating. Arguments and results as in `predict`.
    """
    target = _device(device)
    if top_k > 10:
        raise CommandError(f"--top-k {top_k}: there are only 10 digits; use 1 to 10")
    if temperature is not None and not 0 < temperature < float("inf"):
        raise CommandError(f"--temperature {temperature}: use a positive finite number")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CommandError(f"--batch-size {batch_size!r}: use a positive integer")
    try:
        checkpoint = _source(checkpoint, model) or SHIPPED_MODEL
        classifier = _load_classifier(checkpoint, target)
        temperature = temperature or _checkpoint_temperature(checkpoint)
    except CommandError as err:  # every problem at once: the images' own errors first, then the checkpoint's
        problems = [x for x in _prepare_each(images) if isinstance(x, str)]
        raise CommandError("\n".join([*problems, str(err)])) from err
    return _stream(list(images), for_inference(classifier), target, top_k, float(temperature), batch_size)


def _stream(
    images: list[str], model: torch.nn.Module, target: torch.device, top_k: int, temperature: float, batch_size: int
) -> Iterator[dict]:
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        prepared = _prepare_each(paths)
        good = [x for x in prepared if isinstance(x, torch.Tensor)]
        probabilities = iter(())
        if good:
            with torch.inference_mode():
                logits = model(torch.stack(good).to(target)).float().cpu()
            probabilities = iter((logits / temperature).softmax(dim=1))
        for path, x in zip(paths, prepared, strict=True):
            if isinstance(x, str):
                yield dict(file=str(path), error=x)
            else:
                yield _result(str(path), next(probabilities), top_k, temperature, one_digit_problem(x))


def _result(path: str, p: torch.Tensor, top_k: int, temperature: float, problem: str | None) -> dict:
    values, digits = p.topk(top_k)
    return dict(
        file=path,
        digit=int(digits[0]),
        probability=float(values[0]),
        top_k=[dict(digit=int(d), probability=float(v)) for d, v in zip(digits, values, strict=True)],
        probabilities=[float(v) for v in p],
        temperature=temperature,
        one_digit=problem is None,
        not_one_digit=problem,
    )


def _print_predictions(results: Iterator[dict], as_json: bool) -> tuple[list[str], bool]:
    """Print each result as it comes (JSON: the list `json.dumps(results, indent=2)` prints).

    Returns the errors, and whether any picture was not one digit.
    """
    errors, first, flagged = [], True, False
    for r in results:
        if "error" in r:
            errors.append(r["error"])
        else:
            flagged = flagged or not r["one_digit"]
        if as_json:
            item = json.dumps(r, indent=2).replace("\n", "\n  ")
            print(f"[\n  {item}" if first else f",\n  {item}", end="")
        elif "error" not in r:
            ranked = ", ".join(f"{t['digit']} {100 * t['probability']:.1f}%" for t in r["top_k"])
            if r["one_digit"]:
                print(f"{printable(r['file'])}: {r['digit']}  (top {len(r['top_k'])}: {ranked})")
            else:
                print(
                    f"{printable(r['file'])}: not one digit ({r['not_one_digit']}); the model's guess: {r['digit']}  "
                    f"(top {len(r['top_k'])}: {ranked})"
                )
        first = False
    if as_json:
        print("[]" if first else "\n]")
    return errors, flagged
