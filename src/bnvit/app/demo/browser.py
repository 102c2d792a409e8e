"""Drive the demo page in headless Chromium: draw an MNIST digit as pointer strokes, read the answer.

The tests use it to check the page in a real browser, and it regenerates the screenshot in
the documentation (docs/images/demo.png):

```bash
python -m bnvit.app.demo.browser --checkpoint "$BNVIT_REFERENCE"/VITBNFFN_d5_15.pth \\
    --compare "$BNVIT_REFERENCE"/FinOptAug1_ViT_30.pth --out docs/images/demo.png
```

Needs selenium (in bnvit's `test` extra) and Chromium with its chromedriver (Debian:
`apt-get install chromium chromium-driver`), found on the PATH or through `BNVIT_CHROMIUM` and
`BNVIT_CHROMEDRIVER`. Nothing is downloaded: Selenium Manager is bypassed by naming both files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data.digits import prepare_digit
from .server import DemoModel, make_server

__all__ = [
    "draw_strokes",
    "find_chromium",
    "first_confident_digit",
    "start_chromium",
    "strokes_from_digit",
    "wait_for_answer",
]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> tuple[str, str] | None:
    """`(browser, chromedriver)`: `$BNVIT_CHROMIUM`, `$BNVIT_CHROMEDRIVER` or the PATH; None if one is missing."""
    browser = os.environ.get("BNVIT_CHROMIUM") or next(filter(None, map(shutil.which, _BROWSERS)), None)
    driver = os.environ.get("BNVIT_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver or not Path(browser).is_file() or not Path(driver).is_file():
        return None
    return browser, driver


def start_chromium(width: int = 1200, height: int = 700) -> Any:
    """A headless Chromium under selenium, with a `width` x `height` window.

    Raises:
        RuntimeError: If Chromium or chromedriver is not installed (the message says how to get them).
        ImportError: If selenium is not installed.
    """
    from selenium import webdriver  # deferred: selenium is a test and docs tool, not a dependency of bnvit

    found = find_chromium()
    if found is None:
        raise RuntimeError(
            "Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver; "
            "or set BNVIT_CHROMIUM and BNVIT_CHROMEDRIVER to their paths)"
        )
    browser, driver = found
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument("--force-device-scale-factor=1")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def strokes_from_digit(image: np.ndarray | torch.Tensor, threshold: int = 128, fill: float = 0.75) -> list[list]:
    """An MNIST digit as pen strokes: one horizontal stroke per run of ink pixels in each row.

    Args:
        image: A `(28, 28)` uint8 digit, light on dark (an MNIST image).
        threshold: Pixels at least this bright are ink.
        fill: The longer side of the digit's bounding box, as a fraction of the canvas side.

    Returns:
        Strokes, each a list of `(x, y)` points in canvas sides from the canvas centre
        (`(0, 0)` is the centre, `(0.5, 0.5)` the bottom-right corner).

    Examples:
        >>> one = np.zeros((28, 28), np.uint8)
        >>> one[4:24, 14] = 255  # a vertical bar, one pixel wide
        >>> strokes = strokes_from_digit(one)
        >>> len(strokes), strokes[0], strokes[-1]
        (20, [(0.0, -0.35625)], [(0.0, 0.35625)])
    """
    ink = np.asarray(image) >= threshold
    if ink.ndim != 2 or not ink.any():
        raise ValueError(f"expected a 2-D digit with ink at or above {threshold}, got shape {ink.shape}")
    rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
    top, left = rows.min(), cols.min()
    height, width = rows.max() - top + 1, cols.max() - left + 1
    scale = fill / max(height, width)

    def at(r: int, c: int) -> tuple[float, float]:
        return (float((c - left + 0.5 - width / 2) * scale), float((r - top + 0.5 - height / 2) * scale))

    strokes = []
    for r in range(ink.shape[0]):
        padded = np.concatenate([[False], ink[r], [False]]).astype(np.int8)
        starts, ends = np.nonzero(np.diff(padded) == 1)[0], np.nonzero(np.diff(padded) == -1)[0] - 1
        strokes += [[at(r, s)] if s == e else [at(r, s), at(r, e)] for s, e in zip(starts, ends, strict=True)]
    return strokes


def draw_strokes(driver: Any, strokes: Sequence[Sequence[tuple[float, float]]], pointer: str = "mouse") -> None:
    """Draw `strokes` (from `strokes_from_digit`) on the page's canvas as pointer down-move-up actions.

    Args:
        driver: A selenium driver showing the demo page.
        strokes: Lists of `(x, y)` points in canvas sides from the canvas centre.
        pointer: `"mouse"`, `"touch"` or `"pen"`: the kind of pointer events the page receives.
    """
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    kinds = {"mouse": interaction.POINTER_MOUSE, "touch": interaction.POINTER_TOUCH, "pen": interaction.POINTER_PEN}
    canvas = driver.find_element(By.ID, "canvas")
    side = min(canvas.size["width"], canvas.size["height"])
    builder = ActionBuilder(driver, mouse=PointerInput(kinds[pointer], pointer), duration=0)
    actions = builder.pointer_action
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        actions.move_to(canvas, round(x * side), round(y * side)).pointer_down()
        for x, y in rest:
            actions.move_to(canvas, round(x * side), round(y * side))
        actions.pointer_up()
    builder.perform()


def wait_for_answer(driver: Any, timeout: float = 10.0) -> list[str]:
    """Wait until the page shows the answer to its current drawing; returns each model's digit (`""` if none).

    Raises:
        TimeoutError: If no answer comes within `timeout` seconds (the status line is in the message).
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d: Any) -> bool:
        status, canvas = d.find_element(By.ID, "status"), d.find_element(By.ID, "canvas")
        return status.get_attribute("data-state") != "busy" and status.get_attribute(
            "data-version"
        ) == canvas.get_attribute("data-version")

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(settled)
    except TimeoutException:
        raise TimeoutError(
            f"the page showed no answer within {timeout} s: {driver.find_element(By.ID, 'status').text!r}"
        ) from None
    return [e.get_attribute("data-digit") for e in driver.find_elements(By.CSS_SELECTOR, ".model .digit")]


def first_confident_digit(
    models: Sequence[torch.nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    min_probability: float = 0.99,
    limit: int = 100,
) -> int:
    """Index of the first digit every model classifies correctly, with `min_probability`, after `prepare_digit`.

    Args:
        models: Inference-ready classifiers.
        images: uint8 `(N, 28, 28)` MNIST digits.
        labels: Their labels.
        min_probability: The least probability of the right digit, for every model.
        limit: How many digits to try, from the first.

    Raises:
        ValueError: If no digit among the first `limit` qualifies.
    """
    batch = torch.stack([prepare_digit(image.numpy()) for image in images[:limit]])
    ok = torch.ones(len(batch), dtype=torch.bool)
    with torch.inference_mode():
        for model in models:
            p = model(batch).float().softmax(dim=1)
            ok &= p[torch.arange(len(batch)), labels[: len(batch)]] >= min_probability
    if not ok.any():
        raise ValueError(f"no digit among the first {len(batch)} is classified right with p >= {min_probability}")
    return int(ok.nonzero()[0, 0])


def screenshot(models: Sequence[DemoModel], digit: np.ndarray, out: Path, width: int = 1280, height: int = 900) -> list:
    """Serve `models`, draw `digit` on the page in headless Chromium, save a screenshot to `out`; the page's answers."""
    server = make_server(models, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = start_chromium(width, height)
    try:
        driver.get(server.url)
        from selenium.webdriver.support.ui import WebDriverWait  # deferred: see start_chromium

        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        draw_strokes(driver, strokes_from_digit(digit))
        answers = wait_for_answer(driver)
        out.parent.mkdir(parents=True, exist_ok=True)
        from selenium.webdriver.common.by import By

        out.write_bytes(driver.find_element(By.TAG_NAME, "body").screenshot_as_png)  # the page, without the empty rest
        return answers
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the documentation's screenshot: `python -m bnvit.app.demo.browser --checkpoint PATH --out PNG`."""
    # Deferred: only this command loads checkpoints and MNIST; the test imports the functions above.
    from ...data.mnist import load_mnist
    from ...inference.deploy import for_inference
    from ...weights.loading import load_model

    parser = argparse.ArgumentParser(prog="python -m bnvit.app.demo.browser", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="the model to show")
    parser.add_argument("--compare", help="a second model, side by side")
    parser.add_argument("--index", type=int, help="MNIST test digit to draw (default: the first all models get right)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/demo.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    paths = [p for p in (args.checkpoint, args.compare) if p]
    models = [DemoModel(Path(p).name, for_inference(load_model(p))) for p in paths]
    images, labels = load_mnist(train=False)
    index = args.index if args.index is not None else first_confident_digit([m.model for m in models], images, labels)
    answers = screenshot(models, images[index].numpy(), args.out)
    print(f"{args.out}: drew MNIST test digit {index} (a {int(labels[index])}); the page answered {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
