"""How often the shipped `vitbnffn_mnist` weights read photos of digits under uneven light, after `prepare_digit`.

MNIST test digits are rendered as dark ink on light paper (200x200, noisy) and lit unevenly
(`shadowed_photo`): the light falls from 1 on one side to `dark` on the other, in a random
direction, and multiplies what the paper and the ink reflect. Also: the whole MNIST test set
through `prepare_digit` against the digits as they are.

    python benchmarks/digit_photos.py            # 100 photos per kind of light, and the 10,000 test digits
    python benchmarks/digit_photos.py --photos 30 --no-mnist

Needs MNIST in `BNVIT_DATA`. Prints one line per kind of light and one for the test set.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

LIGHT = {"even": 1.0, "moderate shadow": 0.6, "strong shadow": 0.2, "very strong shadow": 0.1}
"""The light on the darkest side of the picture, as a share of the lightest side."""


def shadowed_photo(digit: torch.Tensor, rng: np.random.Generator, dark: float, size: int = 200) -> Image.Image:
    """`digit` (28x28, light on dark) as dark ink on paper, enlarged, off-centre, noisy, lit from 1 down to `dark`."""
    side = int(rng.integers(110, 150))
    ink = np.asarray(Image.fromarray(digit.numpy()).resize((side, side), Image.BILINEAR), np.float32) / 255
    coverage = np.zeros((size, size), np.float32)
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    coverage[top : top + side, left : left + side] = ink
    paper, pen = rng.uniform(0.78, 0.9), rng.uniform(0.1, 0.25)
    reflected = paper - coverage * (paper - pen)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    along = np.cos(angle) * xx + np.sin(angle) * yy
    light = dark + (1 - dark) * (along - along.min()) / (along.max() - along.min())
    gray = 255 * reflected * light + rng.normal(0, 6, (size, size))
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L")


def main() -> None:
    import timm

    from bnvit.data import load_mnist, prepare_digit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=100, help="test digits per kind of light")
    parser.add_argument("--no-mnist", action="store_true", help="skip the 10,000 test digits")
    args = parser.parse_args()
    images, labels = load_mnist(os.environ.get("BNVIT_DATA"), train=False)
    model = timm.create_model("vitbnffn_mnist", pretrained=True).eval()
    index = torch.from_numpy(np.random.default_rng(0).choice(len(images), args.photos, replace=False))
    with torch.inference_mode():
        for kind, dark in LIGHT.items():
            rng = np.random.default_rng(1)  # the same placement, paper and pen for every kind of light
            x = torch.stack([prepare_digit(shadowed_photo(d, rng, dark)) for d in images[index]])
            print(f"{kind:20} {int((model(x).argmax(1) == labels[index]).sum())}/{args.photos}", flush=True)
        if not args.no_mnist:
            prepared = torch.stack([prepare_digit(d) for d in images])
            as_is = images.float().div(255).unsqueeze(1)
            for name, x in (("prepare_digit", prepared), ("as they are", as_is)):
                right = sum(
                    int((model(b).argmax(1) == y).sum()) for b, y in zip(x.split(1000), labels.split(1000), strict=True)
                )
                print(f"MNIST test digits, {name:14} {right}/{len(labels)}", flush=True)


if __name__ == "__main__":
    main()
