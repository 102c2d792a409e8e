"""The `bnvit` command line.

Commands:
    predict: classify pictures of handwritten digits with a bnvit or reference checkpoint.
    reproduce: run the article's experiments (`depths`, `lr`, `mlp`) or its three-seed study (`all`).
    demo: a web page to draw digits on and watch a model classify them (docs/demo.md).

Usage:

```bash
bnvit predict IMAGE... [--checkpoint PATH] [--device cpu] [--top-k 3] [--json]
python -m bnvit predict IMAGE... --checkpoint PATH
bnvit reproduce all --seeds 3 --out docs/results/article
bnvit reproduce depths --quick
bnvit demo --checkpoint PATH [--compare PATH] [--host 127.0.0.1] [--port 7860]
```

Each picture is prepared the way MNIST digits were (`bnvit.data.prepare_digit`: inverted if
the digit is dark on light, cropped, scaled to a 20-pixel box and centred by its centre of
mass in 28x28), and the model's prediction and probabilities are printed per file. Errors
(an unreadable image, a file that is not a suitable checkpoint, a bad option) are printed
with the file they concern and end the command with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from . import __version__
from .data.digits import MNIST_SIZE, prepare_digit
from .deploy import for_inference
from .device import resolve_device
from .loading import SHIPPED_TAG, WEIGHTS_DIR, load_model
from .timm_blocks import BNFFNBlock
from .vit import ViT

__all__ = ["build_parser", "demo", "list_models", "main", "predict", "reproduce"]

USAGE_ERROR = 2
"""Exit status for bad input: unreadable images, wrong checkpoints, invalid options."""


class CommandError(Exception):
    """A user error to report in one message (exit status 2), without a traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `bnvit` command (all subcommands).

    Examples:
        >>> args = build_parser().parse_args(["predict", "digit.png", "--checkpoint", "model.pth", "--top-k", "2"])
        >>> args.command, args.images, args.checkpoint, args.top_k, args.device, args.json
        ('predict', ['digit.png'], 'model.pth', 2, 'cpu', False)
    """
    parser = argparse.ArgumentParser(prog="bnvit", description="Vision Transformers with BatchNorm: command line.")
    parser.add_argument("--version", action="version", version=f"bnvit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict_parser = commands.add_parser(
        "predict",
        help="classify pictures of handwritten digits",
        description=(
            "Classify pictures of handwritten digits (any format PIL reads; dark on light or light on dark) with "
            "a bnvit checkpoint or one of the article's reference checkpoints. Each picture is prepared like an "
            "MNIST digit: inverted if needed, cropped, scaled to 20 pixels and centred in 28x28."
        ),
    )
    predict_parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict_parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a bnvit or reference ViT checkpoint (.pth/.pt); default: the vitbnffn_mnist weights shipped with bnvit",
    )
    predict_parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    predict_parser.add_argument(
        "--top-k", type=_positive_int, default=3, metavar="K", help="how many classes to list per image (default 3)"
    )
    predict_parser.add_argument("--json", action="store_true", help="print the results as JSON")
    reproduce_parser = commands.add_parser(
        "reproduce",
        help="run the article's experiments and write their reports",
        description=(
            "Run one of the article's experiments (depths, lr, mlp, and lr-window beyond it: the examples' "
            "command line) or the whole "
            "three-seed study (all), resumably, and write reports and figures. `bnvit reproduce WHAT --help` "
            "lists the flags."
        ),
        add_help=False,
    )
    reproduce_parser.add_argument("what", choices=REPRODUCE, help="depths, lr, mlp, lr-window or all")
    reproduce_parser.add_argument("flags", nargs=argparse.REMAINDER, help="the experiment's flags")
    list_parser = commands.add_parser(
        "list",
        help="the models bnvit registers in timm",
        description="The models bnvit registers in timm: parameters, input, configuration, and trained weights.",
    )
    list_parser.add_argument("--json", action="store_true", help="print the list as JSON")
    demo_parser = commands.add_parser(
        "demo",
        help="draw digits in the browser and watch a model classify them",
        description=(
            "Serve a web page where you draw a digit with the mouse or a finger and see the model's ten class "
            "probabilities as you draw. Without --checkpoint it shows the weights shipped with bnvit."
        ),
    )
    demo_parser.add_argument("--checkpoint", metavar="PATH", help="a bnvit or reference ViT checkpoint (.pth/.pt)")
    demo_parser.add_argument("--compare", metavar="PATH", help="a second checkpoint, shown side by side")
    demo_parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    demo_parser.add_argument("--port", type=_port, default=7860, help="TCP port (default 7860; 0: any free port)")
    demo_parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 to 65535, got {value}")
    return value


REPRODUCE = ("depths", "lr", "mlp", "lr-window", "all")


def reproduce(what: str, flags: Sequence[str]) -> int:
    """`bnvit reproduce WHAT FLAGS...`: an article experiment, or the three-seed study for `all`."""
    # Deferred: the article harness imports the training loop, which `bnvit predict` must not load.
    from .article import COMPARE_DEPTHS, COMPARE_LR, DNN_BATCHNORM, LR_WINDOW, run_cli, study

    if what == "all":
        return study.main(flags, prog="bnvit reproduce all")
    experiment = {"depths": COMPARE_DEPTHS, "lr": COMPARE_LR, "mlp": DNN_BATCHNORM, "lr-window": LR_WINDOW}[what]
    return run_cli(experiment, flags, prog=f"bnvit reproduce {what}")


def demo(
    checkpoint: str | None,
    compare: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
) -> int:
    """`bnvit demo`: serve the digit-drawing page (`bnvit.demo`) until Ctrl+C."""
    # Deferred: the web server is this command's alone; `bnvit predict` need not load it.
    from .demo import DemoModel, make_server, serve, shipped_model

    try:
        target = resolve_device(device)
    except ValueError as err:
        raise CommandError(f"--device: {err}") from err
    if checkpoint is None:
        try:
            models = [DemoModel("vitbnffn_mnist", for_inference(shipped_model().to(target)))]
        except ValueError as err:
            raise CommandError(str(err)) from err
    else:
        models = [DemoModel(Path(checkpoint).name, for_inference(_load_classifier(checkpoint, target)))]
    if compare is not None:
        models.append(DemoModel(Path(compare).name, for_inference(_load_classifier(compare, target))))
    try:
        server = make_server(models, host, port)
    except OSError as err:
        raise CommandError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bnvit demo: warning: listening on {host}: others on the network can reach the page", file=sys.stderr)
    print(f"bnvit demo: open {server.url} in a browser (Ctrl+C to stop)", flush=True)
    serve(server)
    return 0


def _load_classifier(path: str, device: torch.device) -> ViT:
    try:
        model = load_model(path, map_location=device)
    except FileNotFoundError as err:
        raise CommandError(f"checkpoint {path}: file not found") from err
    except IsADirectoryError as err:
        raise CommandError(f"checkpoint {path}: is a folder, not a checkpoint file") from err
    except (ValueError, RuntimeError, OSError) as err:
        if "as a PyTorch checkpoint" in str(err):  # torch.load itself failed: not a checkpoint at all
            raise CommandError(
                f"checkpoint {path}: not a PyTorch checkpoint file (torch.load with weights_only=True cannot read it)"
            ) from err
        raise CommandError(f"checkpoint {path}: not a bnvit or reference ViT checkpoint: {err}") from err
    c = model.config
    if c["in_chans"] != 1 or tuple(c["img_size"]) != (MNIST_SIZE, MNIST_SIZE) or c["num_classes"] != 10:
        h, w = c["img_size"]
        raise CommandError(
            f"checkpoint {path}: holds a model for {h}x{w}x{c['in_chans']} images with {c['num_classes']} classes; "
            f"bnvit predict classifies digits and needs a {MNIST_SIZE}x{MNIST_SIZE}x1 model with 10 classes"
        )
    return model


def _load_shipped(device: torch.device) -> ViT:
    try:
        return timm.create_model("vitbnffn_mnist", pretrained=True).to(device).eval()
    except (ValueError, OSError) as err:
        raise CommandError(f"no --checkpoint given, and the shipped weights cannot be used: {err}") from err


def _prepare_all(paths: Sequence[str]) -> torch.Tensor:
    images, errors = [], []
    for path in paths:
        try:
            images.append(prepare_digit(Path(path)))
        except (OSError, ValueError) as err:
            errors.append(f"image {path}: {err}")
    if errors:
        raise CommandError("\n".join(errors))
    return torch.stack(images)


def predict(
    images: Sequence[str],
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    top_k: int = 3,
) -> list[dict]:
    """Classify digit pictures with a checkpoint: the work of `bnvit predict`.

    Args:
        images: Image files.
        checkpoint: A bnvit or reference ViT checkpoint for 28x28x1 images with 10 classes;
            `None` uses the trained `vitbnffn_mnist` weights shipped with bnvit.
        device: Where to run the model (`"cpu"`, `"cuda"`, `"auto"`, ...).
        top_k: How many classes to list per image (at most 10).

    Returns:
        One dict per image, in order: `file`, `digit` (the prediction), `probability`,
        `top_k` (a list of `{"digit", "probability"}`, most likely first) and
        `probabilities` (all 10).

    Raises:
        CommandError: For an unreadable image, an unsuitable checkpoint or an invalid
            option; the message names the file or value.

    Examples:
        >>> predict(["seven.png"], "FinOptAug1_ViT_30.pth")[0]["digit"]  # doctest: +SKIP
        7
    """
    try:
        target = resolve_device(device)
    except ValueError as err:
        raise CommandError(f"--device: {err}") from err
    if top_k > 10:
        raise CommandError(f"--top-k {top_k}: there are only 10 digits; use 1 to 10")
    model = for_inference(_load_shipped(target) if checkpoint is None else _load_classifier(checkpoint, target))
    batch = _prepare_all(images).to(target)
    with torch.inference_mode():
        probabilities = model(batch).float().softmax(dim=1).cpu()
    results = []
    for path, p in zip(images, probabilities, strict=True):
        values, digits = p.topk(top_k)
        results.append(
            dict(
                file=str(path),
                digit=int(digits[0]),
                probability=float(values[0]),
                top_k=[dict(digit=int(d), probability=float(v)) for d, v in zip(digits, values, strict=True)],
                probabilities=[float(v) for v in p],
            )
        )
    return results


def list_models() -> list[dict]:
    """The models bnvit registers in timm, each with its parameters, input, configuration and weights.

    Models are built on the `meta` device: no memory is allocated and no weight initialized.

    Examples:
        >>> rows = {row["name"]: row for row in list_models()}
        >>> rows["vitbnffn_mnist"]["params"], rows["vitbnffn_mnist"]["trained_weights"]
        (893932, True)
    """
    rows = []
    for name in timm.list_models():
        if not timm.models.model_entrypoint(name).__module__.startswith("bnvit."):
            continue
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg = model.pretrained_cfg
        shipped = cfg.get("tag") == SHIPPED_TAG and Path(cfg.get("file") or "").name
        config = _summary(model)
        rows.append(
            dict(
                name=name,
                params=sum(p.numel() for p in model.parameters()),
                input_size=list(cfg["input_size"]),
                config=config,
                trained_weights=bool(shipped) and (WEIGHTS_DIR / shipped).is_file(),
            )
        )
    return rows


def _summary(model: torch.nn.Module) -> dict:
    """Norm, depth, width, heads and patch of a bnvit model, or of timm's ViT as `timmvit_*` builds it."""
    if hasattr(model, "config"):
        return {k: v for k, v in model.config.items() if k in ("norm", "depth", "dim", "heads", "patch_size")}
    block = model.blocks[0]
    return dict(
        norm="bn_ffn" if isinstance(block, BNFFNBlock) else "ln",
        depth=len(model.blocks),
        dim=model.embed_dim,
        heads=block.attn.num_heads,
        patch_size=model.patch_embed.patch_size[0],
    )


def _print_models(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        config = ", ".join(f"{k} {v}" for k, v in row["config"].items())
        size = "x".join(map(str, row["input_size"]))
        weights = "trained weights" if row["trained_weights"] else "-"
        print(f"{row['name']:<28} {row['params']:>12,} params  {size:<10} {config:<45} {weights}")


def _print_text(results: list[dict]) -> None:
    for r in results:
        ranked = ", ".join(f"{t['digit']} {100 * t['probability']:.1f}%" for t in r["top_k"])
        print(f"{r['file']}: {r['digit']}  (top {len(r['top_k'])}: {ranked})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `bnvit` command; returns the exit status (0, or 2 for bad input).

    Examples:
        >>> main(["predict", "digit.png", "--checkpoint", "FinOptAug1_ViT_30.pth"])  # doctest: +SKIP
        digit.png: 7  (top 3: 7 99.9%, 2 0.0%, 3 0.0%)
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "reproduce" and argv[1] in REPRODUCE:
        return reproduce(argv[1], argv[2:])  # its own parser reads every flag, --help included
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            results = predict(args.images, args.checkpoint, device=args.device, top_k=args.top_k)
            if args.json:
                print(json.dumps(results, indent=2))
            else:
                _print_text(results)
        elif args.command == "list":
            _print_models(list_models(), as_json=args.json)
        elif args.command == "demo":
            return demo(args.checkpoint, args.compare, host=args.host, port=args.port, device=args.device)
    except CommandError as err:
        for line in str(err).splitlines():
            print(f"bnvit {args.command}: error: {line}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
