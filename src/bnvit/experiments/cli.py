"""The command line of the examples and of `bnvit reproduce`: one experiment, from flags to report.

Bad input ends it before anything runs, with one line and exit status 2; Ctrl-C with 130
(rerun to resume); cells that failed twice with 1, after the others are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from .._util import checks as _checks
from .._util.device import resolve_device, resolve_precision
from ..data import find_mnist_root, mnist_files
from .claims import verdicts
from .estimate import MNIST_TEST, MNIST_TRAIN, choose_workers, estimate_seconds, load_note
from .folder import FolderLockedError, check_folder, prepare_folder, read_folder
from .grid import Cell, Experiment, Settings
from .parallel import SweepError, check_ray, check_workers
from .report import report_folder
from .results import describe_machines, load_results, machine
from .sweep import run_sweep, todo
from .transfer import transfer_table

__all__ = ["CELLS_FAILED", "INTERRUPTED", "USAGE_ERROR", "build_parser", "run_cli"]

CELLS_FAILED = 1
USAGE_ERROR = 2
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected finite positive learning rates, got {text!r}")
    return values


def _parse_workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of worker processes or auto, got {text!r}") from None


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """`--workers`, `--ray`, `--threads`, `--cells-per-gpu`: how many cells run at once, and where."""
    parser.add_argument(
        "--workers",
        type=_parse_workers,
        metavar="N|auto",
        help="train N cells at once in worker processes (default 1); auto: measure and pick the fastest N",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the cells as Ray tasks on the cluster at ADDRESS (HOST:PORT, ray://HOST:PORT or auto; "
        "no ADDRESS: a Ray instance on this machine); needs bnvit[ray]",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads per cell (default: the cores shared among the workers; 1 per Ray task)"
    )
    parser.add_argument(
        "--cells-per-gpu", type=int, default=1, help="with --ray on CUDA: cells sharing one GPU (default 1)"
    )


def check_parallel(args: argparse.Namespace) -> None:
    """Refuse workers this machine cannot run, or a Ray cluster that cannot be reached, in one line."""
    if args.ray is not None and args.workers is not None:
        raise ValueError("--workers and --ray: choose one (a Ray task per cell replaces the local workers)")
    if args.threads is not None:
        _checks.positive_int("--threads", args.threads)
    _checks.positive_int("--cells-per-gpu", args.cells_per_gpu)
    if args.ray is not None and not args.report_only and not args.estimate:
        check_ray(args.ray)
    elif args.workers is not None:
        check_workers(args.workers)


def parallel_options(args: argparse.Namespace, cells: Sequence[Cell], settings: Settings, device: torch.device):
    """`run_sweep`'s keyword arguments for running cells at once (`--workers auto` measured here)."""
    workers, threads = args.workers or 1, args.threads
    if workers == "auto" and cells:
        largest = max(cells, key=lambda c: (c.depth, c.model))
        measured = vars(args).setdefault("measured_workers", {})  # one measurement per model and precision
        key = (largest.model, largest.depth, settings.precision)
        if key not in measured:
            measured[key] = choose_workers([largest], settings, device)
        workers, chosen = measured[key]
        threads = threads or chosen
    workers = 1 if workers == "auto" else workers
    return dict(workers=workers, threads=threads, ray=args.ray, cells_per_gpu=args.cells_per_gpu)


def add_common_arguments(
    parser: argparse.ArgumentParser, seeds: int | None = 1, seeds_help: str = "1, as in the article"
) -> None:
    """Flags every article command takes: data, device, settings, seeds, estimate, report, parallel runs.

    `seeds`: the default of `--seeds` (`None`: the experiment's, filled in by `run_cli`).
    """
    parser.add_argument("--data-dir", help="folder with MNIST/raw/ (default: $BNVIT_DATA, else the cache folder)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the experiment's)")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds per cell: 0 .. N-1 (default {seeds_help})")
    parser.add_argument("--train-subset", type=int, help="train on this many images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on this many test images only")
    parser.add_argument("--quick", action="store_true", help="a CPU-sized run: data subset, fewer epochs and depths")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-download", action="store_true", help="never download MNIST; fail if it is missing")
    parser.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rewrite report and figures")
    parser.add_argument(
        "--machine", help="describe the machine in the report when the results do not record it (kept in sweep.json)"
    )
    add_parallel_arguments(parser)


def build_parser(experiment: Experiment, prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line interface shared by the examples (`prog`: the command's name in messages)."""
    parser = _Parser(prog=prog, description=experiment.description or experiment.name)
    parser.add_argument(
        "--out", help=f"output folder (default: runs/{experiment.name}, or runs/{experiment.name}-quick)"
    )
    parser.add_argument("--depths", type=_parse_ints, help="comma-separated depths, used at every learning rate")
    parser.add_argument("--lrs", type=_parse_floats, help="comma-separated learning rates")
    parser.add_argument("--augment", choices=("fast", "torchvision", "none"), help="training augmentation")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="training precision")
    seeds = f"{experiment.seeds}" + (f", {experiment.quick_seeds} with --quick" if experiment.quick_seeds else "")
    add_common_arguments(parser, seeds=None, seeds_help="1, as in the article" if seeds == "1" else seeds)
    return parser


def _grid_from_args(experiment: Experiment, args: argparse.Namespace) -> dict[float, tuple[int, ...]]:
    base = dict(experiment.quick_grid or experiment.grid) if args.quick else dict(experiment.grid)
    lrs = getattr(args, "lrs", None) or tuple(base)
    all_depths = tuple(sorted({d for depths in experiment.grid.values() for d in depths}))
    depths = getattr(args, "depths", None)
    return {lr: depths or base.get(lr) or experiment.grid.get(lr) or all_depths for lr in lrs}


def _settings_from_args(experiment: Experiment, args: argparse.Namespace) -> Settings:
    settings = (experiment.quick_settings or experiment.settings) if args.quick else experiment.settings
    changes = {
        "epochs": args.epochs,
        "augment": getattr(args, "augment", None),
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "precision": getattr(args, "precision", None),
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    _checks.positive_int("--epochs", settings.epochs)
    for name, size in (("train_subset", MNIST_TRAIN), ("test_subset", MNIST_TEST)):
        value = getattr(settings, name)
        if value is not None:
            flag = f"--{name.replace('_', '-')}"
            _checks.positive_int(flag, value)
            if value > size:
                raise ValueError(f"{flag} {value}: MNIST has {size:,} such images; use 1 to {size}")
    return settings


def check_inputs(args: argparse.Namespace, all_settings: Sequence[Settings]) -> torch.device:
    """Validate device, precision, seeds and data before anything runs; returns the device."""
    if args.seeds is not None:  # None: each experiment's own (the study's protocol)
        _checks.positive_int("--seeds", args.seeds)
    check_parallel(args)
    device = resolve_device(args.device)
    for settings in all_settings:
        try:
            resolve_precision(settings.precision, device)
        except ValueError as err:
            raise ValueError(f"--precision {settings.precision}: {err}") from err
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: no such folder (it should hold MNIST/raw/)")
    return device


def check_data(args: argparse.Namespace) -> None:
    if args.report_only or not args.no_download:
        return
    for train in (True, False):
        for path in mnist_files(args.data_dir, train=train):
            if not path.is_file():
                root = find_mnist_root(args.data_dir)
                raise ValueError(f"MNIST is not in {root} ({path.name} missing) and --no-download forbids fetching it")


def duration(seconds: float) -> str:
    """`"42 s"`, `"12 min"`, `"3.4 h"`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def machine_note(folder: Path, note: str | None, device: torch.device) -> str | None:
    """The machine note a report needs when its results do not record the machine (`None` if they do)."""
    results = load_results(folder)
    if results and all(isinstance(r.get("machine"), dict) for r in results):
        return None
    if note:
        return note
    if read_folder(folder).get("machine_note"):
        return None
    (phrase,) = describe_machines([{"machine": machine(device)}])
    return f"{phrase}, {platform.system()} (read when the report was written, not recorded with the runs)"


def run_guarded(body: Callable[[], int], prog: str) -> int:
    """Run a command body: one line and status 2 for a user error, one line and 130 for Ctrl-C."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except SweepError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return CELLS_FAILED
    except (ValueError, TypeError, OSError, FolderLockedError) as err:
        message = str(err).replace("\n", "; ")
        print(f"{prog}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


def run_cli(experiment: Experiment, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run an `Experiment` from the command line: sweep, figures, report. Returns an exit code."""
    parser = build_parser(experiment, prog)
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = (args.quick and experiment.quick_seeds) or experiment.seeds
    try:
        settings = _settings_from_args(experiment, args)
        grid = _grid_from_args(experiment, args)
        device = check_inputs(args, [settings])
        check_data(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    out = Path(args.out or f"runs/{experiment.name}{'-quick' if args.quick else ''}")
    cells = experiment.cells(grid, args.seeds)
    return run_guarded(lambda: _run(experiment, args, settings, cells, out, device), parser.prog)


def _run(experiment: Experiment, args, settings: Settings, cells, out: Path, device: torch.device) -> int:
    check_folder(out, settings, experiment.name)
    remaining = todo(cells, out)
    state = f"{len(remaining)} not finished; report only" if args.report_only else f"{len(remaining)} to do"
    print(f"{experiment.name}: {len(cells)} runs ({state}) on {device}, output in {out}")
    if remaining and not args.report_only:
        seconds = estimate_seconds(remaining, settings, device, threads=args.threads)
        print(
            f"estimated time: {duration(seconds)} (measured by fit() on a few batches of each model on {device}; "
            f"{load_note()})"
        )
    if args.estimate:
        return 0
    if not args.report_only:
        run_sweep(
            cells,
            settings,
            out,
            experiment=experiment.name,
            data_dir=args.data_dir,
            device=device,
            progress=not args.no_progress,
            download=not args.no_download,
            **parallel_options(args, remaining, settings, device),
        )
    return write_outputs(experiment, out, args, device)


def write_outputs(experiment: Experiment, out: Path, args, device: torch.device, reference: Path | None = None) -> int:
    """Figures and report of a folder, then the verdicts on stdout."""
    if not load_results(out):
        print(f"{out}: no finished runs yet; no report written")
        return 0
    note = machine_note(out, args.machine, device)
    if note:
        prepare_folder(out, _folder_settings(out), experiment.name, machine_note=note)
    report = report_folder(out, experiment, reference=reference)
    results = load_results(out, complete=True)
    reduced = experiment.is_reduced(results[0]["settings"])
    if not reduced:  # a quick run judges nothing: its report shows the numbers beside the claims, marked as such
        for v in verdicts(results, experiment.claims):
            print(f"claim {v.claim}: {v.verdict} — {v.measured}")
        if "transfer" in experiment.sections:
            print("docs/timm-blocks.md transfer table:")
            print("\n".join(transfer_table(results, experiment.models, experiment.seeds)))
    for line in closing_lines(out, report, reduced):
        print(line)
    return 0


def closing_lines(out: Path, report: Path, reduced: bool) -> list[str]:
    """The last lines of a run's output: what to look at (report, figures, checkpoints), and for a quick
    run, plainly, that it was a smoke test."""
    lines = []
    if reduced:
        lines.append(
            "This was a quick run: a smoke test that training, figures and report work end to end on this machine, "
            "not a verdict on the article (too few images, epochs and seeds to decide anything; the report sets "
            "its numbers beside the article's claims, marked as such). The full run is the same command without "
            "--quick."
        )
    lines.append(f"report: {report}")
    figures = sorted(path.name for path in out.glob("*.png"))
    if figures:
        lines.append(f"figures: {', '.join(str(out / name) for name in figures)}")
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        size = sum(path.stat().st_size for path in checkpoints.rglob("*") if path.is_file())
        lines.append(
            f"checkpoints: {checkpoints} ({size / 1e6:.0f} MB), each run's last epoch, kept to resume an interrupted "
            "run; safe to delete once every run is finished (results.jsonl and the report do not need them)"
        )
    return lines


def _folder_settings(out: Path) -> Settings:
    stored = read_folder(out)
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in stored.items() if k in names})
