"""Fit and measure the "not one digit" check (`bnvit.data.marks.one_digit_problem`).

Fit (`--fit`): over MNIST training images (never the test set), each as it is and enlarged to a
dark-on-light picture of 40-200 pixels (as a photo or a drawing arrives), prepared by
`prepare_digit`: each upper limit of `ONE_DIGIT_LIMITS` is the 99.9th percentile of its measure
(`ink_marks`), `edge`'s lower limit the 0.1th. The rule for a second digit (a second mark side by
side with the first, with at least `SECOND_MARK_SHARE` of the ink) is fixed, not fitted.

Measure: the share flagged among MNIST test digits (as they are, and enlarged as above) and
among generated pictures that are not one digit, each kind from its own seeded generator:
uniform noise, salt-and-pepper noise, textures (a pattern repeated at least 3 times across the
picture: stripes, checkerboards, blobs), and two-digit numbers made of two MNIST test digits
side by side. A picture that `prepare_digit` refuses (no digit found) is counted apart: it gets
an error, not an answer.

    python examples/one_digit_check.py --fit --fit-images 50000:51500
    python examples/one_digit_check.py --test 2000 --enlarged 1000 --per-kind 200
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bnvit.data import load_mnist, prepare_digit
from bnvit.data.marks import ink_marks, one_digit_problem

KINDS = ("uniform noise", "salt-and-pepper", "texture", "two-digit number")


def non_digit(kind: str, rng: np.random.Generator, digits: torch.Tensor) -> np.ndarray:
    """One generated grayscale picture (uint8) of `kind`."""
    side = int(rng.integers(40, 200))
    if kind == "uniform noise":
        return rng.integers(0, 256, (side, side)).astype(np.uint8)
    if kind == "salt-and-pepper":
        image = np.full((side, side), int(rng.integers(100, 220)), np.uint8)
        u, density = rng.random((side, side)), rng.uniform(0.05, 0.3)
        image[u < density / 2], image[u > 1 - density / 2] = 0, 255
        return image
    if kind == "texture":
        yy, xx = np.mgrid[0:side, 0:side]
        style = int(rng.integers(0, 3))
        if style == 0:  # stripes at any angle, at least 3 periods across
            angle, frequency = rng.uniform(0, np.pi), rng.uniform(3 / side, 0.4)
            v = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * frequency * 2 * np.pi)
        elif style == 1:  # a checkerboard of at least 3 cells across
            cell = int(rng.integers(3, max(4, side // 3)))
            v = ((xx // cell + yy // cell) % 2).astype(float)
        else:  # blobs: coarse noise of 6 to 12 cells across, upsampled
            coarse = torch.tensor(rng.random((int(rng.integers(6, 12)),) * 2))
            v = F.interpolate(coarse[None, None], size=(side, side), mode="bicubic", align_corners=False)[0, 0].numpy()
        v = (v - v.min()) / (v.max() - v.min() + 1e-9)
        return (v * 255).astype(np.uint8)
    i, j = rng.integers(0, len(digits), 2)
    gap = np.zeros((28, int(rng.integers(0, 8))), np.uint8)
    return np.concatenate([digits[i].numpy(), gap, digits[j].numpy()], axis=1)


def enlarged(digit: torch.Tensor, rng: np.random.Generator) -> Image.Image:
    """An MNIST digit as a picture arrives: dark on light, enlarged (bilinear) to 40-200 pixels."""
    side = int(rng.integers(40, 200))
    return Image.fromarray(255 - digit.numpy()).resize((side, side), Image.BILINEAR)


def fit(images: torch.Tensor, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    marks = [ink_marks(prepare_digit(image.numpy())) for image in images]
    marks += [ink_marks(prepare_digit(enlarged(image, rng))) for image in images]
    return dict(
        pictures=len(marks),
        cover=round(float(np.quantile([m.cover for m in marks], 0.999)), 3),
        gaps=int(np.quantile([m.gaps for m in marks], 0.999)),
        faint=round(float(np.quantile([m.faint for m in marks], 0.999)), 3),
        edge=round(float(np.quantile([m.edge for m in marks], 0.001)), 3),
    )


def measure(test: int, enlarged_test: int, per_kind: int, seed: int) -> dict:
    images, _ = load_mnist(None, train=False)
    sample = images[:: max(1, len(images) // test)][:test]  # spread over the test set, whose halves differ
    flagged = sum(one_digit_problem(prepare_digit(image.numpy())) is not None for image in sample)
    rows = {"MNIST test digits": dict(images=len(sample), flagged=round(flagged / len(sample), 4))}
    rng = np.random.default_rng([seed, 99])
    sample = images[1 :: max(1, len(images) // max(1, enlarged_test))][:enlarged_test]
    flagged = sum(one_digit_problem(prepare_digit(enlarged(image, rng))) is not None for image in sample)
    rows["MNIST test digits, enlarged"] = dict(images=len(sample), flagged=round(flagged / max(1, len(sample)), 4))
    for k, kind in enumerate(KINDS):
        rng = np.random.default_rng([seed, k])
        counts = dict(flagged=0, refused=0)
        for _ in range(per_kind):
            try:
                counts["flagged"] += one_digit_problem(prepare_digit(non_digit(kind, rng, images))) is not None
            except ValueError:  # "no digit found": an error, not an answer
                counts["refused"] += 1
        answered = per_kind - counts["refused"]
        rows[kind] = dict(
            images=per_kind,
            refused=round(counts["refused"] / per_kind, 4),
            flagged=round(counts["flagged"] / per_kind, 4),
            flagged_of_answered=round(counts["flagged"] / max(1, answered), 4),
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="fit the limits instead of measuring")
    parser.add_argument("--fit-images", default="50000:60000", help="MNIST training images to fit on (START:STOP)")
    parser.add_argument("--test", type=int, default=10_000, help="MNIST test digits to measure on")
    parser.add_argument("--enlarged", type=int, default=2_000, help="MNIST test digits to measure on, enlarged")
    parser.add_argument("--per-kind", type=int, default=500, help="generated pictures of each kind")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated and enlarged pictures")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.fit:
        start, stop = map(int, args.fit_images.split(":"))
        print(json.dumps(fit(load_mnist(None, train=True)[0][start:stop], args.seed)))
    else:
        print(json.dumps(measure(args.test, args.enlarged, args.per_kind, args.seed), indent=2))


if __name__ == "__main__":
    main()
