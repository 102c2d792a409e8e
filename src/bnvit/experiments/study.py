"""The seed study: every cell of the article's three experiments, in three folders, one command.

The ViT cells of `COMPARE_DEPTHS` and `COMPARE_LR` share one folder (`ARTICLE_VIT`, claims
1-3), the MLPs go to `<out>-mlp` (claim 4), an fp32 check to `<out>-fp32`. Seeds `0 .. n-1`
per `Experiment.seeds`, fixed before any run (docs/reproducing.md); judged cells run first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .claims import claim_cells
from .cli import (
    _Parser,
    _settings_from_args,
    add_common_arguments,
    check_data,
    check_inputs,
    duration,
    parallel_options,
    run_guarded,
    write_outputs,
)
from .estimate import estimate_seconds, load_note
from .folder import check_folder
from .grid import ARTICLE_FP32, ARTICLE_MLP, ARTICLE_VIT, Cell, Experiment, Settings
from .report import report_folder, summary_table
from .results import load_results
from .sweep import run_sweep, todo

__all__ = ["PARTS", "build_parser", "main", "plan_cells", "reference_folder", "study_folders"]

PARTS = {"mlp": ("-mlp", ARTICLE_MLP), "vit": ("", ARTICLE_VIT), "fp32": ("-fp32", ARTICLE_FP32)}
"""Part -> (suffix of its folder's name, experiment), in the order they run."""


def study_folders(out: str | Path) -> dict[str, Path]:
    """The study's folders: `out` (ViT), `out-mlp`, `out-fp32`."""
    out = Path(out)
    return {part: out.with_name(out.name + suffix) for part, (suffix, _) in PARTS.items()}


def reference_folder(folder: Path, experiment: Experiment) -> Path | None:
    """The folder the fp32 check is compared with: the ViT folder beside it."""
    if experiment.name != ARTICLE_FP32.name:
        return None
    return folder.with_name(folder.name.removesuffix(PARTS["fp32"][0]))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The study's command line (`examples/reproduce.py`, `bnvit reproduce all`)."""
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        help="the ViT folder; the MLPs go to <out>-mlp, the fp32 check to <out>-fp32 "
        "(default: runs/article, or runs/article-quick)",
    )
    parser.add_argument("--report-to", help="with --report-only: write reports and figures under this folder instead")
    parser.add_argument(
        "--parts",
        type=_parse_parts,
        default=tuple(PARTS),
        help=f"comma-separated parts to run: {', '.join(PARTS)} (default: all, in that order)",
    )
    seeds = ", ".join(f"{part} {experiment.seeds}" for part, (_, experiment) in PARTS.items())
    add_common_arguments(parser, seeds=None, seeds_help=f"the protocol's: {seeds}")
    return parser


def _parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: the study's parts are {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


def plan_cells(experiment: Experiment, grid, seeds: int) -> list[Cell]:
    """The cells of a part in the order they run: the claims' cells first, each cell whole (seeds, models)."""
    judged = claim_cells(experiment.claims)
    cells = experiment.cells(grid, seeds)
    return sorted(cells, key=lambda c: (c.lr, c.depth) not in judged)  # stable: grid order otherwise


def _plan(args) -> list[tuple[str, Experiment, Settings, list[Cell], Path]]:
    base = Path(args.out or f"runs/article{'-quick' if args.quick else ''}")
    plan = []
    for part, folder in study_folders(base).items():
        if part not in args.parts:
            continue
        experiment = PARTS[part][1]
        settings = _settings_from_args(experiment, args)
        grid = (experiment.quick_grid or experiment.grid) if args.quick else experiment.grid
        seeds = args.seeds or (args.quick and experiment.quick_seeds) or experiment.seeds
        plan.append((part, experiment, settings, plan_cells(experiment, grid, seeds), folder))
    return plan


def _sweep(experiment: Experiment, settings: Settings, cells, folder: Path, args, device: torch.device) -> None:
    run_sweep(
        cells,
        settings,
        folder,
        experiment=experiment.name,
        data_dir=args.data_dir,
        device=device,
        progress=not args.no_progress,
        download=not args.no_download,
        **parallel_options(args, todo(cells, folder), settings, device),
    )


def _run(args, plan, device: torch.device) -> int:
    for _, experiment, settings, _, folder in plan:
        check_folder(folder, settings, experiment.name)
    total = 0.0
    for part, _experiment, settings, cells, folder in plan:
        remaining = todo(cells, folder)
        state = f"{len(remaining)} not finished; report only" if args.report_only else f"{len(remaining)} to do"
        line = f"{part}: {len(cells)} runs ({state}) in {folder}"
        if remaining and not args.report_only:
            seconds = estimate_seconds(remaining, settings, device, threads=args.threads)
            total += seconds
            line += f", about {duration(seconds)}"
        print(line)
    if not args.report_only:
        note = load_note()
        print(f"estimated time: {duration(total)} on {device} (fit() timed on a few batches of each model; {note})")
    if args.estimate:
        return 0
    for _, experiment, settings, cells, folder in plan:
        if not args.report_only:
            _sweep(experiment, settings, cells, folder, args, device)
    for _, experiment, _, _, folder in plan:
        if args.report_to:
            dest = Path(args.report_to) / folder.name
            if load_results(folder):
                reference = reference_folder(folder, experiment)
                report = report_folder(folder, experiment, dest=dest, reference=reference, machine_note=args.machine)
                print(f"report: {report}")
        else:
            write_outputs(experiment, folder, args, device, reference_folder(folder, experiment))
    folders = {part: folder for part, *_, folder in plan}
    if "vit" in folders and not args.quick:  # the README's table, computed from the folders as they are now
        mlp = study_folders(folders["vit"])["mlp"]
        print("README study table:")
        print("\n".join(summary_table(load_results(folders["vit"], complete=True), load_results(mlp, complete=True))))
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the study from the command line; returns the exit status (0, 2 for bad input, 130 for Ctrl-C)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        if args.report_to and not args.report_only:
            raise ValueError("--report-to goes with --report-only")
        plan = _plan(args)
        device = check_inputs(args, [settings for _, _, settings, _, _ in plan])
        check_data(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return run_guarded(lambda: _run(args, plan, device), parser.prog)


if __name__ == "__main__":
    sys.exit(main())
