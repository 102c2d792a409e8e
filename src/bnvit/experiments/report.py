"""`report.md`: every cell's accuracies, the claims with verdicts, and the statistics behind them.

A report records the sha256 of its `results.jsonl` (`report_source`); `report_folder` is the
one way reports and figures are made.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._util.io import atomic_write_text
from .claims import DEPTH_CLAIMS, LR_DROP_CLAIM, MLP_CLAIM, Verdict, paired, verdicts
from .claims import mean_over_epochs as _mean_over_epochs
from .folder import read_folder
from .grid import Experiment
from .plots import PLOTS
from .protocol import (
    CLEARLY,
    COMPARABLE,
    EXPECTATION_TEXT,
    FASTER,
    LEVEL,
    LR_DROP,
    SLIGHTLY,
    TARGET_ACC,
    interval_text,
    judge,
    p_text,
    points_text,
    signed,
)
from .results import RESULTS, describe_machines, load_results, results_sha256
from .stats import fmt, summarize, t_interval
from .transfer import transfer_section
from .window import window_section

__all__ = [
    "RULES",
    "describe_reduced",
    "report_folder",
    "report_source",
    "summary_table",
    "write_report",
]

_TEST_SETS = {
    "augmented": "the augmented test set (augmented once with a fixed seed: identical images for every model)",
    "clean": "the clean test set",
}
_PRECISION_AUTO = "auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32; not recorded per run)"

_LO, _HI = LR_DROP_CLAIM.lrs
_MLO, _MHI = MLP_CLAIM.lrs
RULES = (
    "The protocol (docs/reproducing.md), fixed before seeds 5-9 ran (the seeds run before it are named there). "
    "Gaps are the BatchNorm model minus its plain twin (ViTBNFFN minus ViT; for the MLPs of claim 4, DNNBN "
    "minus DNN), in accuracy points: the validation accuracy averaged over epochs, paired by seed. Every part "
    "is judged by one-sided one-sample t-tests at 5% (Student's t, n - 1 degrees of freedom) on its per-seed "
    "values: 'comparable' "
    f"needs the gap shown inside (-{COMPARABLE}, +{COMPARABLE}) (TOST), 'slightly ahead' inside [+{SLIGHTLY}, "
    f"+{CLEARLY}), 'clearly ahead' above +{CLEARLY}; claim 3 needs ViT's drop in final accuracy from lr {_LO:g} "
    f"to {_HI:g} at depth {LR_DROP_CLAIM.depth}, minus ViTBNFFN's, shown above {LR_DROP}; claim 4 needs, at lr "
    f"{_MLO:g}, the MLP with BatchNorm shown to reach {TARGET_ACC:.0%} training accuracy in at most {FASTER:.0%} "
    f"of the plain MLP's steps (the paired log-ratio of steps, recorded every 20 steps), and at lr {_MHI:g} its "
    f"final accuracy shown above {100 * MLP_CLAIM.stable:.0f}% and {100 * MLP_CLAIM.broken_margin:.0f} points "
    "above the plain MLP's. A part is 'reproduced' when every test it needs rejects, 'not reproduced' when a "
    "test shows the opposite at the same level, and 'inconclusive' otherwise. The interval shown is the 90% "
    "t-interval, whose ends are the bounds of those one-sided tests: a verdict can be read off it. A claim of "
    "several parts is reproduced when every part's p-value for 'holds' stays below 5% after Holm's correction "
    "over the claim's parts, not reproduced when some part's p-value for 'fails' does. 'Seeds for 80% power': "
    "for an inconclusive part, the seeds at which its one-sided test at 5% would decide it with 80% "
    "probability, were the observed mean and standard deviation the true ones (a noncentral t). Numbers are "
    "rounded once, from exact values, ties away from zero. A diverged run counts as chance accuracy after it "
    "diverged."
)


def describe_reduced(settings: Mapping[str, Any]) -> str:
    """What a reduced run was: `"3 epochs, 6,000 training images, 2,000 test images"`."""
    epochs = settings.get("epochs")
    parts = [f"{epochs} epoch{'' if epochs == 1 else 's'}"]
    if settings.get("train_subset"):
        parts.append(f"{settings['train_subset']:,} training images")
    if settings.get("test_subset"):
        parts.append(f"{settings['test_subset']:,} test images")
    return ", ".join(parts)


def _fmt_interval(values: Sequence[float]) -> str:
    interval = t_interval(values, level=LEVEL)
    return "– (1 seed)" if interval is None else interval_text(interval)


def _progress_note(groups: Mapping[tuple[str, int, float], dict], planned: int | None) -> list[str]:
    """How far the folder is from the protocol's seeds per cell (nothing to say once every cell has them)."""
    if not planned or planned < 2:
        return []
    counts: dict[tuple[float, int], int] = {}
    for (_, depth, lr), g in groups.items():
        counts[(lr, depth)] = min(counts.get((lr, depth), planned), len(g["curves"]))
    short = {cell: n for cell, n in counts.items() if n < planned}
    if not short:
        return [f"Protocol: {planned} paired seeds per cell (seeds 0-{planned - 1}), every cell complete.", ""]
    cells = "; ".join(f"lr {lr:g} depth {depth}: {n}" for (lr, depth), n in sorted(short.items()))
    return [
        f"**In progress.** The protocol asks {planned} paired seeds per cell (seeds 0-{planned - 1}); "
        f"{len(counts) - len(short)} of {len(counts)} cells have them. Cells with fewer so far (paired seeds): "
        f"{cells}. Their verdicts are provisional until the cell is complete.",
        "",
    ]


def _seed_counts(groups: Mapping[tuple[str, int, float], dict], empty: int) -> tuple[list[int], str]:
    """The distinct numbers of seeds per cell, sorted, and how to say them ("3", or "3 to 5")."""
    counts = sorted({len(g["curves"]) for g in groups.values()}) or [empty]
    return counts, str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


def _header(
    results: Sequence[Mapping[str, Any]], machine_note: str | None, source: str, planned: int | None = None
) -> list[str]:
    groups = summarize(results)
    counts, per_cell = _seed_counts(groups, empty=0)
    seeds = counts[-1]
    settings = results[0]["settings"] if results else {}
    epochs = max((r["settings"]["epochs"] for r in results), default=0)
    run_precisions = [r.get("precision") or r["history"].get("meta", {}).get("precision") for r in results]
    precisions = sorted({p for p in run_precisions if p})
    recorded = len(precisions) and all(run_precisions)
    precision = (
        ", ".join(precisions)
        if recorded
        else _PRECISION_AUTO
        if settings.get("precision") == "auto"
        else settings.get("precision")
    )
    machines = describe_machines(list(results)) if all(isinstance(r.get("machine"), dict) for r in results) else []
    machine = "; ".join(machines) if machines else (machine_note or "not recorded with these results")
    devices = ", ".join(sorted({str(r.get("device")) for r in results})) or "?"
    return [
        f"{len(results)} runs; "
        + (f"{per_cell} seeds per cell (mean ± std over seeds); " if seeds > 1 else "1 seed per cell; ")
        + f"{epochs} epoch{'s' * (epochs != 1)}; augmentation {settings.get('augment')}; "
        f"train subset {settings.get('train_subset') or 'all 60,000'}; "
        f"test subset {settings.get('test_subset') or 'all 10,000'}; "
        f"device {devices}; precision {precision}.",
        "",
        *_progress_note(groups, planned),
        f"Machine: {machine}.",
        "",
        source,
        "",
    ]


def _cells_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    groups = summarize(results)
    settings = results[0]["settings"] if results else {}
    epochs = max((r["settings"]["epochs"] for r in results), default=0)
    marks = [e for e in (1, 5, 10) if e <= epochs] or [epochs]
    if epochs not in marks:
        marks.append(epochs)
    lines = [
        f"Validation accuracy (%) per epoch on {_TEST_SETS.get(settings.get('test'), 'the test set')}, "
        "and the clean test accuracy at the last epoch (mean ± std over seeds).",
        "",
    ]
    header = ["model", "depth", "lr", *[f"epoch {e}" for e in marks], "clean test", "diverged"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, depth, lr), group in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        per_epoch = [fmt([c[e - 1] for c in group["curves"]]) for e in marks]
        clean = [math.nan if r["clean_test_acc"] is None else r["clean_test_acc"] for r in group["results"]]
        diverged = sum(1 for r in group["results"] if r["history"]["diverged_at"])
        row = [model, str(depth), f"{lr:g}", *per_epoch, fmt(clean), f"{diverged}/{len(group['results'])}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _show(verdict: str, reduced: bool) -> str:
    return f"_{verdict} (quick run: not evidence)_" if reduced else f"**{verdict}**"


def _claims_tables(vs: Sequence[Verdict], reduced: str | None) -> list[str]:
    lines = ["", "## The article's claims", ""]
    if reduced:
        lines += [
            f"> **Quick run ({reduced}): these verdicts are not evidence** for or against the article. They are "
            "computed the same way as for the full setting, to show what the command produces; the article's "
            "numbers refer to the full setting (all 60,000 images, 10 epochs; 15 for the MLPs).",
            "",
        ]
    lines += ["| # | article | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {v.claim} | {v.article} | {v.measured} | {_show(v.verdict, bool(reduced))} |" for v in vs]
    lines += [
        "",
        "### Per part: the paired seeds and the tests",
        "",
        "Per-seed values (gaps in accuracy points; for claim 3 the extra drop; for claim 4 at the low rate the "
        "log-ratio of steps, at the high rate the gap in final accuracy), their mean ± std, the 90% t-interval, "
        "the one-sided p-values for 'holds' and 'fails' (raw, then after Holm's correction over the claim's "
        "parts), the verdict, and for an inconclusive part the seeds that would decide it with 80% power at "
        "this mean and std.",
        "",
        "| claim | part | expected | per seed | mean ± std | 90% t-interval | p holds / fails | Holm | verdict "
        "| seeds for 80% power |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in vs:
        for p in v.parts:
            per_seed = ", ".join(f"s{s}: {signed(x)}" for s, x in zip(p.seeds, p.values, strict=True)) or "not run"
            t = p.test
            pvalues = f"{p_text(t.p_hold)} / {p_text(t.p_fail)}" if t and p.judged else "–"
            holm = f"{p_text(p.p_hold_holm)} / {p_text(p.p_fail_holm)}" if p.p_hold_holm is not None else "–"
            needed = "–" if not t or t.verdict != "inconclusive" or not p.judged else str(t.needed or "none would")
            note = f" ({p.note})" if p.note else ""
            cells = [
                v.claim,
                p.label + note,
                EXPECTATION_TEXT.get(p.expect, p.expect),
                per_seed,
                points_text(p.values),
                interval_text(t.interval) if t else "–",
                pvalues,
                holm,
            ]
            verdict = p.verdict if not p.judged else _show(p.verdict, bool(reduced))
            lines.append("| " + " | ".join(map(str, cells)) + f" | {verdict} | {needed} |")
    lines += ["", "### How the verdicts are computed", "", RULES]
    return lines


def _figures(out: Path, results: Sequence[Mapping[str, Any]]) -> list[str]:
    figures = sorted(p.name for p in out.glob("*.png"))
    if not figures:
        return []
    counts, seeds = _seed_counts(summarize(results), empty=1)
    caption = (
        f"Lines: the mean over {seeds} seeds; bands: ± one standard deviation over seeds."
        if counts[-1] > 1
        else "One seed per curve."
    )
    return ["", "## Figures", "", caption, ""] + [f"![{name}]({name})" for name in figures]


def precision_section(results: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> list[str]:
    """This folder's gaps (e.g. fp32) beside the same cells' gaps in a reference folder (e.g. bf16), per seed."""
    lines = ["", "## Against the same cells at the study's default precision", ""]
    groups, ref_groups = summarize(results), summarize(reference)
    header = ["cell", "seeds", "gap here", "gap in the reference", "here minus reference", "90% t-interval"]
    header += ["verdict here", "verdict in the reference", "clean test here", "clean test there"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # The pair from both folders: a folder still filling up may hold one model of a cell so far.
    models = sorted({k[0] for k in groups} | {k[0] for k in ref_groups}, key=lambda m: "bn" in m)
    for depth, lr in sorted({k[1:] for k in groups}, key=lambda k: (k[1], k[0])):
        seeds, gaps = paired(groups, tuple(models), depth, lr, _mean_over_epochs)
        ref_seeds, ref_gaps = paired(ref_groups, tuple(models), depth, lr, _mean_over_epochs)
        ref = dict(zip(ref_seeds, ref_gaps, strict=True))
        common = [s for s in seeds if s in ref]
        diff = [g - ref[s] for s, g in zip(seeds, gaps, strict=True) if s in ref]
        clean = [
            fmt([r["clean_test_acc"] or math.nan for m in models for r in g.get((m, depth, lr), {}).get("results", [])])
            for g in (groups, ref_groups)
        ]
        row = [f"depth {depth}, lr {lr:g}", ", ".join(map(str, common)) or "none in common"]
        row += [points_text(gaps), points_text([ref[s] for s in common]), points_text(diff), _fmt_interval(diff)]
        expect = next((c.expect.get(depth) for c in DEPTH_CLAIMS.values() if c.lr == lr), None)
        for values in (gaps, [ref[s] for s in common]):
            row.append(f"{judge(values, expect).verdict} ({expect} expected)" if expect and values else "–")
        lines.append("| " + " | ".join(row + clean) + " |")
    lines += [
        "",
        "Gaps as above (mean over epochs of ViTBNFFN minus ViT), paired by seed; 'here minus reference' is the "
        "per-seed difference of the gaps, with its 90% t-interval: an interval holding 0 means no change of the "
        "gap is shown at 5% on either side. Verdicts follow the rules above for the claim that covers the cell "
        "(only the gaps of the seeds both folders hold are compared; the verdict in the reference uses those seeds). "
        "Clean test accuracies pool both models.",
    ]
    return lines


def write_report(
    results: Sequence[Mapping[str, Any]],
    out: str | Path,
    claims: Iterable[int] = (),
    title: str = "Results",
    *,
    reduced: str | None = None,
    machine_note: str | None = None,
    source: str = "",
    extra: Sequence[str] = (),
    planned_seeds: int | None = None,
) -> Path:
    """Write `out/report.md`: every cell's accuracies and the article's claims with verdicts.

    Args:
        results: Results lines (see `load_results`).
        out: Folder of the report (its `*.png` are listed as figures).
        claims: The article's claims to judge.
        title: The report's title.
        reduced: For a quick run, what it was (`describe_reduced`): its verdicts are no evidence.
        machine_note: The machine, when the results do not record it.
        source: The line naming the results file and its sha256.
        extra: More Markdown lines, before the figures.
        planned_seeds: The seeds per cell the protocol asks for (the header says how far the folder is).
    """
    out = Path(out)
    lines = [f"# {title}", ""]
    if reduced:
        lines += [f"> Quick run ({reduced}): a smoke test of the command, not a reproduction.", ""]
    lines += _header(results, machine_note, source, planned_seeds) + _cells_table(results)
    claims = list(claims)
    if claims:
        lines += _claims_tables(verdicts(results, claims), reduced)
    lines += list(extra) + _figures(out, results)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


_SOURCE = re.compile(r"Computed from `(?P<file>[^`]+)`: \d+ lines, sha256 `(?P<sha>[0-9a-f]{64})`")


def report_source(report: str | os.PathLike) -> dict[str, str]:
    """The results files a report says it was computed from: `{file: sha256}` (empty for older reports)."""
    return {m["file"]: m["sha"] for m in _SOURCE.finditer(Path(report).read_text())}


def _source_line(folder: Path, name: str) -> str:
    lines = len((folder / RESULTS).read_text().splitlines()) if (folder / RESULTS).exists() else 0
    return f"Computed from `{name}`: {lines} lines, sha256 `{results_sha256(folder) or '0' * 64}`."


def report_folder(
    folder: str | os.PathLike,
    experiment: Experiment,
    *,
    dest: str | os.PathLike | None = None,
    figures: bool = True,
    reference: str | os.PathLike | None = None,
    machine_note: str | None = None,
) -> Path:
    """Write a folder's report (and figures) from its `results.jsonl`: the one way reports are made.

    Args:
        folder: The sweep's folder.
        experiment: Its experiment (claims, figures, the full setting).
        dest: Where to write (default: `folder`).
        figures: Draw the figures (else list the `*.png` already in `dest`).
        reference: A folder with the same cells at other settings, compared in its own section.
        machine_note: The machine, when the results do not record it (default: `sweep.json`'s note).
    """
    folder = Path(folder)
    dest = Path(folder if dest is None else dest)
    results = load_results(folder, complete=True)
    settings = results[0]["settings"] if results else {}
    reduced = describe_reduced(settings) if results and experiment.is_reduced(settings) else None
    if figures:
        for name in experiment.plots:
            PLOTS[name](results, dest, experiment.figure_grids.get(name), reduced)
    source = _source_line(folder, RESULTS)
    extra: list[str] = []
    if reference is not None:
        reference = Path(reference)
        source += " " + _source_line(reference, f"../{reference.name}/{RESULTS}")
        extra = precision_section(results, load_results(reference, complete=True))
    if "window" in experiment.plots and results:
        extra += window_section(results)
    if "transfer" in experiment.sections and results:
        extra += transfer_section(results, experiment.models, experiment.seeds)
    return write_report(
        results,
        dest,
        experiment.claims,
        title=experiment.description or experiment.name,
        reduced=reduced,
        machine_note=machine_note or read_folder(folder).get("machine_note"),
        source=source,
        extra=extra,
        planned_seeds=(reduced and experiment.quick_seeds) or experiment.seeds,
    )


_EXPECT_SHORT = {
    "comparable": "comparable",
    "slightly": "slightly ahead",
    "clearly": "clearly ahead",
    "lr_drop": ">= 5 more",
    "faster": "BN faster",
}


def summary_table(vit: Sequence[Mapping[str, Any]], mlp: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The README's table of the study (`vit`: claims 1-3, `mlp`: claim 4), one row per judged part."""
    lines = [
        "| claim, cell | seeds | ViT, epoch 10 | ViTBNFFN, epoch 10 | measured | 90% interval | article expects "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = summarize(vit)

    def last(model: str, depth: int, lr: float) -> str:
        group = groups.get((model, depth, lr))
        return fmt([c[-1] for c in group["curves"]]) + "%" if group else "–"

    def seeds(part) -> str:
        return str(part.test.n) if part.test else "0"

    vit_claims = verdicts(vit, (1, 2, 3)) if vit else []
    mlp_claims = verdicts(mlp, (4,)) if mlp else []
    for v in vit_claims:
        for part in v.parts:
            t = part.test
            measured = "–" if t is None else f"{signed(t.mean)}" + (f" ± {t.std:.2f}" if t.std is not None else "")
            if v.claim == 3:
                (lo, hi), depth = LR_DROP_CLAIM.lrs, LR_DROP_CLAIM.depth
                accs = [f"{last(m, depth, lo)} -> {last(m, depth, hi)}" for m in LR_DROP_CLAIM.models]
                measured = f"ViT loses {measured} more"
            else:
                depth, lr = part.cells[0][1], part.cells[0][2]
                accs = [last(m, depth, lr) for m in DEPTH_CLAIMS[v.claim].models]
            row = [f"{v.claim}: {part.label}", seeds(part), *accs, measured, interval_text(t.interval if t else None)]
            lines.append("| " + " | ".join([*row, _EXPECT_SHORT[part.expect], part.verdict]) + " |")
    for v in mlp_claims:
        for part in (p for p in v.parts if p.judged):
            t = part.test
            if part.expect == "faster" and t is not None and t.interval is not None:
                measured = f"DNNBN / DNN steps to 90%: {math.exp(t.mean):.2f}"
                interval = f"[{math.exp(t.interval[0]):.2f}, {math.exp(t.interval[1]):.2f}]"
                expect = f"<= {FASTER:.2f}"
            elif t is not None and t.interval is not None:
                measured = f"final gap {signed(t.mean)} ± {t.std:.2f}"
                interval = interval_text(t.interval)
                expect = "BN stable"
            else:
                measured, interval, expect = part.note or "not run", "–", _EXPECT_SHORT.get(part.expect, "")
            row = [f"4: MLP, {part.label}", seeds(part), "", "", measured, interval, expect, part.verdict]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| claim | verdict (Holm's correction over its parts) |", "|---|---|"]
    lines += [f"| {v.claim}: {v.article} | {v.verdict} |" for v in vit_claims + mlp_claims]
    return lines
