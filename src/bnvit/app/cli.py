"""The `bnvit` command line: the work behind each command.

Commands:
    predict: classify pictures of handwritten digits with a bnvit or reference checkpoint.
    calibrate: fit a checkpoint's temperature, so that its probabilities mean what they say.
    list: the models bnvit registers in timm.
    reproduce: run the article's experiments (`depths`, `lr`, `mlp`, `lr-window`) or its seed study (`all`).
    demo: a web page to draw digits on and watch a model classify them (docs/demo.md).

Usage:

```bash
bnvit predict IMAGE... [--checkpoint PATH] [--device cpu] [--top-k 3] [--temperature T] [--json]
python -m bnvit predict IMAGE... --checkpoint PATH
bnvit calibrate CHECKPOINT [--images 50000:60000] [--data-dir DIR]
bnvit reproduce all --out docs/results/article
bnvit reproduce depths --quick
bnvit demo --checkpoint PATH [--compare PATH] [--host 127.0.0.1] [--port 7860]
```

The console script's entry point is `_bnvit_cli.main`, a top-level module that parses the
arguments with the standard library alone and imports this module only once they are valid, so
`bnvit --help` and argument errors answer without importing torch or timm. This module never
imports it back: `run` takes the parsed arguments.

Each picture is prepared the way MNIST digits were (`bnvit.data.prepare_digit`: inverted if
the digit is dark on light, cropped, scaled to a 20-pixel box and centred by its centre of
mass in 28x28), and the model's prediction and probabilities are printed per file. The
probabilities are `softmax(logits / T)` with the checkpoint's calibrated temperature T
(`bnvit.weights.calibration`). A file that cannot be used (missing, not a regular file, not an image,
too many pixels) is reported on its own line and the others are still classified; any error
ends the command with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import timm
import torch

from .._util.device import resolve_device
from ..data.digits import MNIST_SIZE, prepare_digit, printable
from ..inference.deploy import for_inference
from ..models.vit import ViT
from ..timm.blocks import BNFFNBlock
from ..weights import calibration
from ..weights.calibration import Calibration, read_calibration, shipped_temperature
from ..weights.loading import SHIPPED_TAG, WEIGHTS_DIR, load_model

__all__ = [
    "PREDICT_BATCH",
    "USAGE_ERROR",
    "CommandError",
    "calibrate",
    "demo",
    "iter_predict",
    "list_models",
    "predict",
    "reproduce",
    "run",
]

USAGE_ERROR = 2
"""Exit status for bad input (argparse's convention, which `_bnvit_cli` follows for bad arguments)."""

PREDICT_BATCH = 256
"""How many images `bnvit predict` prepares and classifies at once: its memory does not grow with the file count."""
SHIPPED_MODEL = "vitbnffn_mnist"
"""What `bnvit predict` uses without `--checkpoint`: bnvit's ViTBNFFN trained on MNIST."""


class CommandError(Exception):
    """A user error to report in one message (exit status 2), without a traceback."""


def reproduce(what: str, flags: Sequence[str]) -> int:
    """`bnvit reproduce WHAT FLAGS...`: an article experiment, or the seed study for `all`."""
    # Deferred: the article harness imports the training loop, which `bnvit predict` must not load.
    from ..experiments import COMPARE_DEPTHS, COMPARE_LR, DNN_BATCHNORM, LR_WINDOW, run_cli, study

    if what == "all":
        return study.main(flags, prog="bnvit reproduce all")
    experiments = {"depths": COMPARE_DEPTHS, "lr": COMPARE_LR, "mlp": DNN_BATCHNORM, "lr-window": LR_WINDOW}
    if what not in experiments:
        raise CommandError(f"reproduce {what!r}: unknown; choose from {', '.join([*experiments, 'all'])}")
    return run_cli(experiments[what], flags, prog=f"bnvit reproduce {what}")


def demo(
    checkpoint: str | None,
    compare: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
) -> int:
    """`bnvit demo`: serve the digit-drawing page (`bnvit.app.demo`) until Ctrl+C.

    Each model's probabilities are calibrated with its temperature, as in `bnvit predict`.
    """
    try:  # deferred: the web server is this command's alone; `bnvit predict` need not load it
        from .demo import DemoModel, make_server, serve, shipped_model
    except ModuleNotFoundError as err:
        if err.name not in ("starlette", "uvicorn", "anyio", "h11"):
            raise
        raise CommandError(f"the demo needs {err.name}, in bnvit's demo extra: pip install 'bnvit[demo]'") from err

    target = _device(device)
    if checkpoint is None:
        try:
            model = for_inference(shipped_model().to(target))
        except ValueError as err:
            raise CommandError(str(err)) from err
        models = [DemoModel(SHIPPED_MODEL, model, temperature=shipped_temperature(SHIPPED_MODEL) or 1.0)]
    else:
        models = [DemoModel(*_served(checkpoint, target))]
    if compare is not None:
        models.append(DemoModel(*_served(compare, target)))
    try:
        server = make_server(models, host, port)
    except OSError as err:
        raise CommandError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bnvit demo: warning: listening on {host}: others on the network can reach the page", file=sys.stderr)
    print(f"bnvit demo: open {server.url} in a browser (Ctrl+C to stop)", flush=True)
    serve(server)
    return 0


def _served(path: str, device: torch.device) -> tuple[str, torch.nn.Module, str, float]:
    """A checkpoint as the demo serves it: name, inference copy, description (default), temperature."""
    return Path(path).name, for_inference(_load_classifier(path, device)), "", _checkpoint_temperature(path)


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as err:
        raise CommandError(f"--device: {err}") from err


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


def _checkpoint_temperature(path: str) -> float:
    """The temperature `bnvit calibrate` wrote beside the checkpoint, else 1 (the raw softmax)."""
    try:
        return read_calibration(path) or 1.0
    except (ValueError, OSError) as err:
        raise CommandError(f"checkpoint {path}: {err}") from err


def _load_shipped(device: torch.device) -> ViT:
    try:
        return timm.create_model(SHIPPED_MODEL, pretrained=True).to(device).eval()
    except (ValueError, OSError) as err:
        raise CommandError(f"no --checkpoint given, and the shipped weights cannot be used: {err}") from err


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
) -> list[dict]:
    """Classify digit pictures with a checkpoint: the work of `bnvit predict`.

    An image that cannot be used does not stop the others; every image's problem and the
    checkpoint's are reported together. The images go through the model `batch_size` at a
    time (`iter_predict` yields the results as each batch is done).

    Args:
        images: Image files.
        checkpoint: A bnvit or reference ViT checkpoint for 28x28x1 images with 10 classes;
            `None` uses the trained `vitbnffn_mnist` weights shipped with bnvit.
        device: Where to run the model (`"cpu"`, `"cuda"`, `"auto"`, ...).
        top_k: How many classes to list per image (at most 10).
        temperature: Divide the logits by it before the softmax; `None`: the checkpoint's
            calibrated temperature (the shipped weights' own, or the one `bnvit calibrate`
            wrote beside the checkpoint), else 1.
        batch_size: How many images are prepared and classified at once.

    Returns:
        One dict per image, in order. For an image classified: `file`, `digit` (the
        prediction), `probability`, `top_k` (a list of `{"digit", "probability"}`, most likely
        first), `probabilities` (all 10) and `temperature`. For an image that could not be
        used: `file` and `error` (one line naming the file and what is wrong).

    Raises:
        CommandError: For an unsuitable checkpoint or an invalid option; the message names
            the file or value (one line each, after the lines of any image that could not be used).

    Examples:
        >>> predict(["seven.png"], "FinOptAug1_ViT_30.pth")[0]["digit"]  # doctest: +SKIP
        7
    """
    return list(
        iter_predict(images, checkpoint, device=device, top_k=top_k, temperature=temperature, batch_size=batch_size)
    )


def iter_predict(
    images: Sequence[str],
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    top_k: int = 3,
    temperature: float | None = None,
    batch_size: int = PREDICT_BATCH,
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
        if checkpoint is None:
            model = _load_shipped(target)
            temperature = temperature or shipped_temperature(SHIPPED_MODEL) or 1.0
        else:
            model = _load_classifier(checkpoint, target)
            temperature = temperature or _checkpoint_temperature(checkpoint)
    except CommandError as err:  # every problem at once: the images' own errors first, then the checkpoint's
        problems = [x for x in _prepare_each(images) if isinstance(x, str)]
        raise CommandError("\n".join([*problems, str(err)])) from err
    return _stream(list(images), for_inference(model), target, top_k, float(temperature), batch_size)


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
                yield _result(str(path), next(probabilities), top_k, temperature)


def _result(path: str, p: torch.Tensor, top_k: int, temperature: float) -> dict:
    values, digits = p.topk(top_k)
    return dict(
        file=path,
        digit=int(digits[0]),
        probability=float(values[0]),
        top_k=[dict(digit=int(d), probability=float(v)) for d, v in zip(digits, values, strict=True)],
        probabilities=[float(v) for v in p],
        temperature=temperature,
    )


def calibrate(
    checkpoint: str,
    images: tuple[int, int] = (50_000, 60_000),
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    write: bool = True,
) -> Calibration:
    """Fit a checkpoint's temperature on MNIST training images: the work of `bnvit calibrate`.

    Choose images the checkpoint was not trained on (`fit` on a subset, say the first 50,000,
    leaves the rest held out); the test set is never used.

    Args:
        checkpoint: A bnvit or reference ViT checkpoint for 28x28x1 images with 10 classes.
        images: `(start, stop)`: the MNIST training images `start` to `stop - 1`.
        data_dir: The folder holding `MNIST/raw/` (default: `$BNVIT_DATA`, else the cache folder).
        device: Where to run the model.
        write: Write the temperature beside the checkpoint (`CHECKPOINT.calibration.json`).

    Returns:
        The `bnvit.weights.calibration.Calibration`.

    Raises:
        CommandError: For an unsuitable checkpoint, missing data or a bad image range, or a fit
            `bnvit.weights.calibration.calibrate` refuses (nothing is written then).
    """
    from ..data import load_mnist  # deferred: only this command reads MNIST

    target = _device(device)
    start, stop = images
    if not 0 <= start < stop:
        raise CommandError(f"--images {start}:{stop}: use START:STOP with 0 <= START < STOP")
    model = _load_classifier(checkpoint, target)
    try:
        train_images, train_labels = load_mnist(data_dir, train=True)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err).replace("\n", " ")) from err
    if stop > len(train_labels):
        raise CommandError(f"--images {start}:{stop}: MNIST has {len(train_labels):,} training images")
    source = f"MNIST training images {start}-{stop - 1}"
    try:
        result = calibration.calibrate(
            for_inference(model), train_images[start:stop], train_labels[start:stop], source=source, device=target
        )
    except ValueError as err:  # a fit that could make the probabilities worse
        raise CommandError(f"{err}; nothing was written") from err
    if write:
        try:
            calibration.write_calibration(checkpoint, result)
        except OSError as err:
            raise CommandError(f"cannot write the calibration beside {checkpoint}: {err}") from err
    return result


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
    """Norm, depth, width, heads and patch of a bnvit model, or of timm's ViT as the `timmvit*` builders make it."""
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


def _print_predictions(results: Iterator[dict], as_json: bool) -> list[str]:
    """Print each result as it comes (JSON: the list `json.dumps(results, indent=2)` prints); the errors."""
    errors, first = [], True
    for r in results:
        if "error" in r:
            errors.append(r["error"])
        if as_json:
            item = json.dumps(r, indent=2).replace("\n", "\n  ")
            print(f"[\n  {item}" if first else f",\n  {item}", end="")
        elif "error" not in r:
            ranked = ", ".join(f"{t['digit']} {100 * t['probability']:.1f}%" for t in r["top_k"])
            print(f"{printable(r['file'])}: {r['digit']}  (top {len(r['top_k'])}: {ranked})")
        first = False
    if as_json:
        print("[]" if first else "\n]")
    return errors


def _print_models(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        config = ", ".join(f"{k} {v}" for k, v in row["config"].items())
        size = "x".join(map(str, row["input_size"]))
        weights = "trained weights" if row["trained_weights"] else "-"
        print(f"{row['name']:<28} {row['params']:>12,} params  {size:<10} {config:<45} {weights}")


def _print_calibration(checkpoint: str, result: Calibration, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(
        f"{checkpoint}: temperature {result.temperature:.4f}, fitted on {result.images - result.held_out:,} of the "
        f"{result.images:,} {result.source} and checked on the other {result.held_out:,}: negative log-likelihood "
        f"{result.nll_before:.4f} -> {result.nll_after:.4f}, expected calibration error {result.ece_before:.2%} -> "
        f"{result.ece_after:.2%}"
    )


def run(args: argparse.Namespace) -> int:
    """Do what parsed arguments ask (`_bnvit_cli.build_parser().parse_args(...)`); returns the exit status.

    Errors are printed one per line as `bnvit COMMAND: error: ...`, and give exit status 2.
    """
    errors: list[str] = []
    try:
        if args.command == "predict":
            results = iter_predict(
                args.images,
                args.checkpoint,
                device=args.device,
                top_k=args.top_k,
                temperature=args.temperature,
                batch_size=args.batch_size,
            )
            errors = _print_predictions(results, as_json=args.json)
        elif args.command == "calibrate":
            result = calibrate(args.checkpoint, args.images, data_dir=args.data_dir, device=args.device)
            _print_calibration(args.checkpoint, result, args.json)
        elif args.command == "list":
            _print_models(list_models(), as_json=args.json)
        elif args.command == "demo":
            return demo(args.checkpoint, args.compare, host=args.host, port=args.port, device=args.device)
        elif args.command == "reproduce":
            return reproduce(args.what, args.flags)
    except CommandError as err:
        errors = str(err).splitlines()
    for line in errors:
        print(f"bnvit {args.command}: error: {line}", file=sys.stderr)
    return USAGE_ERROR if errors else 0
