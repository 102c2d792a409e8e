"""The front of the `bnvit` command: parse the arguments first, import bnvit only for the work.

`import bnvit` imports timm (to register the models in its registry), and timm imports torch and
torchvision: several seconds and hundreds of MB before anything else happens. Any import of a
module inside the `bnvit` package runs `bnvit/__init__.py` first, so the console script's entry
point lives here, in a top-level module of the same distribution that imports only the standard
library. `bnvit --help`, `bnvit reproduce --help`, `bnvit list --help` and every argument error
are answered by argparse alone; `bnvit.app.cli` (the work: predict, list, demo, calibrate,
reproduce) is imported once the arguments are known to be valid.

`python -m bnvit` runs the same `main` (`bnvit/__main__.py`). The import runs one way: this front
imports `bnvit.app.cli`, which never imports this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["NOT_ONE_DIGIT", "REPRODUCE", "USAGE_ERROR", "build_parser", "main"]

USAGE_ERROR = 2
"""Exit status for bad input: unreadable images, wrong checkpoints, invalid options."""
NOT_ONE_DIGIT = 3
"""Exit status of `bnvit predict` when every file was classified but some picture holds no single digit."""

REPRODUCE = {
    "depths": "ViT vs ViTBNFFN at several depths, the article's depth figures (examples/compare_depths.py)",
    "lr": "ViT vs ViTBNFFN at two learning rates, the article's learning-rate figure (examples/compare_lr.py)",
    "mlp": "a 3-layer sigmoid MLP with and without BatchNorm, the article's first section (examples/dnn_batchnorm.py)",
    "lr-window": "beyond the article: the window of learning rates each model tolerates (examples/lr_window.py)",
    "all": "the seed study: every claim's cells over several seeds, three folders, one command (examples/reproduce.py)",
}
"""`bnvit reproduce WHAT`: each experiment, with the line `bnvit reproduce --help` shows for it."""


_MODEL_HELP = (
    "weights shipped with bnvit, by name: vitbnffn_mnist (the default) or vitln_mnist; instead of --checkpoint"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 to 65535, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _slice(text: str) -> tuple[int, int]:
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = (int(start), int(stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 50000:60000), got {text!r}") from None
    if not 0 <= bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP, got {text!r}")
    return bounds


class _Version(argparse.Action):
    """`--version`: the installed version, looked up only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("bnvit")
        except PackageNotFoundError:  # a source tree on sys.path, not installed
            found = "0.0.0+unknown"
        parser.exit(message=f"bnvit {found}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `bnvit` command (all subcommands); it imports nothing from bnvit.

    Examples:
        >>> args = build_parser().parse_args(["predict", "digit.png", "--checkpoint", "model.pth", "--top-k", "2"])
        >>> args.command, args.images, args.checkpoint, args.top_k, args.device, args.json
        ('predict', ['digit.png'], 'model.pth', 2, 'cpu', False)
    """
    parser = argparse.ArgumentParser(prog="bnvit", description="Vision Transformers with BatchNorm: command line.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(commands)
    _add_calibrate(commands)
    experiments = "\n".join(f"  {name:<10} {line}" for name, line in REPRODUCE.items())
    reproduce_parser = commands.add_parser(
        "reproduce",
        help="run the article's experiments and write their reports",
        description=(
            "Run one of the article's experiments, or the seed study (all), resumably, and write reports "
            f"and figures.\n\nexperiments:\n{experiments}\n\n`bnvit reproduce WHAT --help` lists the flags of one."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reproduce_parser.add_argument("what", choices=tuple(REPRODUCE), metavar="WHAT", help=", ".join(REPRODUCE))
    flags = reproduce_parser.add_argument("flags", nargs=argparse.REMAINDER, metavar="FLAGS", help="its flags")
    flags.required = False  # argparse marks a REMAINDER required; an experiment without flags is a whole command
    list_parser = commands.add_parser(
        "list",
        help="the models bnvit registers in timm",
        description="The models bnvit registers in timm: parameters, input, configuration, and trained weights.",
    )
    list_parser.add_argument("--json", action="store_true", help="print the list as JSON")
    _add_demo(commands)
    return parser


def _add_predict(commands) -> None:
    parser = commands.add_parser(
        "predict",
        help="classify pictures of handwritten digits",
        description=(
            "Classify pictures of handwritten digits (PNG, JPEG, GIF, BMP, TIFF, WebP and other raster formats; "
            "never EPS, PostScript or PDF; dark on light or light on dark) with "
            "a bnvit checkpoint or one of the article's reference checkpoints. Each picture is prepared like an "
            "MNIST digit: inverted if needed, cropped, scaled to 20 pixels and centred in 28x28. Probabilities "
            "are calibrated: the logits are divided by the checkpoint's temperature (`bnvit calibrate`). A file "
            "that cannot be used is reported on its own line; the others are classified, and the exit status is 2. "
            "A picture that does not hold one digit (several marks side by side, like a number; noise; a texture) "
            "is answered with the model's guess, marked as such, and the exit status is 3 (when no file failed)."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a bnvit or reference ViT checkpoint (.pth/.pt), or the name of weights shipped with bnvit; "
        "default: the vitbnffn_mnist weights shipped with bnvit",
    )
    parser.add_argument("--model", metavar="NAME", help=_MODEL_HELP)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument(
        "--top-k", type=_positive_int, default=3, metavar="K", help="how many classes to list per image (default 3)"
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        metavar="T",
        help="divide the logits by T before the softmax (default: the checkpoint's calibrated temperature, "
        "else 1; 1 gives the raw softmax)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="how many images are prepared and classified at once (default 256); memory does not grow "
        "with the number of files",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_calibrate(commands) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="fit a checkpoint's temperature, so that its probabilities mean what they say",
        description=(
            "Fit the temperature T that makes softmax(logits / T) calibrated (the negative log-likelihood "
            "minimized over T) on MNIST training images the checkpoint was not trained on, and write it beside "
            "the checkpoint as CHECKPOINT.calibration.json, which `bnvit predict` and `bnvit demo` then apply. "
            "Never fitted on the test set."
        ),
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a bnvit or reference ViT checkpoint (.pth/.pt), or the name of weights shipped with bnvit "
        "(vitbnffn_mnist, vitln_mnist: the fit is shown, not written; they carry their own temperature)",
    )
    parser.add_argument(
        "--images",
        type=_slice,
        default=(50_000, 60_000),
        metavar="START:STOP",
        help="the MNIST training images to fit on, held out from the checkpoint's training "
        "(default 50000:60000, the last 10,000)",
    )
    parser.add_argument("--data-dir", help="folder with MNIST/raw/ (default: $BNVIT_DATA, else the cache folder)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--json", action="store_true", help="print the calibration as JSON")


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="draw digits in the browser and watch a model classify them",
        description=(
            "Serve a web page where you draw a digit with the mouse or a finger and see the model's ten class "
            "probabilities as you draw. Without --checkpoint it shows the weights shipped with bnvit."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a bnvit or reference ViT checkpoint (.pth/.pt), or the name of weights shipped with bnvit",
    )
    parser.add_argument("--model", metavar="NAME", help=_MODEL_HELP)
    parser.add_argument(
        "--compare", metavar="PATH", help="a second checkpoint (or shipped weights' name), shown side by side"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=_port, default=7860, help="TCP port (default 7860; 0: any free port)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `bnvit` command; returns the exit status (0; 2 for bad input; 3 when `predict` saw no single digit).

    Examples:
        >>> main(["predict", "digit.png", "--checkpoint", "FinOptAug1_ViT_30.pth"])  # doctest: +SKIP
        digit.png: 7  (top 3: 7 99.9%, 2 0.0%, 3 0.0%)
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "reproduce" and argv[1] in REPRODUCE:
        # The experiment's own parser reads every flag, --help included; it lives with the harness.
        from bnvit.app.cli import reproduce

        return reproduce(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    # Deferred on purpose: the arguments are valid, now the work may import torch and timm.
    from bnvit.app.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
