"""Sweeps, reports and the three examples, end to end on real MNIST at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnvit.experiments import EXPERIMENTS, Cell, Settings, cli, load_results, report_folder, run_sweep, verdicts
from bnvit.experiments import sweep as ex
from bnvit.experiments.claims import judge
from bnvit.experiments.report import report_source, summary_table
from bnvit.experiments.results import RESULTS, results_sha256
from bnvit.experiments.study import reference_folder
from bnvit.experiments.transfer import transfer_table

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--train-subset", "200", "--test-subset", "100", "--no-progress", "--no-download", "--device", "cpu"]
VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the frozen augmented test set out of the user's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPERIMENT


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def metrics(result: dict) -> list[dict]:
    skip = ("seconds", "images_per_sec")
    return [{k: v for k, v in r.items() if k not in skip} for r in result["history"]["records"]]


# ----------------------------------------------------------------------------- the examples, --quick


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "figures", "cells", "claims"),
    [
        ("compare_depths", ["depths_lr0.003.png", "depths_lr0.005.png"], 4, ["| 1 |", "| 2 |"]),
        ("compare_lr", ["lr_comparison.png"], 4, ["| 3 |"]),
        ("dnn_batchnorm", ["mlp.png"], 4, ["| 4 |"]),
    ],
)
def test_example_quick_mode_writes_every_output(mnist_root, tmp_path, capsys, name, figures, cells, claims):
    out = tmp_path / name
    code = cli.run_cli(load_example(name), ["--quick", "--epochs", "1", "--out", str(out), *TINY])
    assert code == 0
    results = load_results(out)
    assert len(results) == cells
    assert all(r["settings"]["train_subset"] == 200 and len(r["history"]["records"]) == 1 for r in results)
    assert all(0.0 <= r["clean_test_acc"] <= 1.0 for r in results)
    for figure in figures:
        assert is_png(out / figure), figure
    report = (out / "report.md").read_text()
    assert report.count("\n| ") >= cells + 1  # header + one row per (model, depth, lr)
    assert "these verdicts are not evidence" in report  # 3 epochs on 6,000 images decide nothing
    for claim in claims:
        row = next(line for line in report.splitlines() if line.startswith(claim))
        assert any(f"_{v} (quick run: not evidence)_" in row for v in VERDICTS), row
        assert "**" not in row, row
    printed = capsys.readouterr().out
    assert "estimated time" in printed and "report:" in printed
    # the estimate says what it assumes of the rest of the machine (it is measured under today's load)
    estimate = next(line for line in printed.splitlines() if line.startswith("estimated time"))
    assert "it holds while the machine stays as busy as now" in estimate, estimate
    # It ends with what to look at, and says it was a smoke test; it prints no verdict.
    *_, smoke, report_line, figures_line, checkpoints_line = printed.strip().splitlines()
    assert smoke.startswith("This was a quick run: a smoke test") and "not a verdict" in smoke
    assert report_line == f"report: {out / 'report.md'}"
    assert figures_line == "figures: " + ", ".join(str(out / f) for f in sorted(figures))
    assert checkpoints_line.startswith(f"checkpoints: {out / 'checkpoints'} (") and "MB)" in checkpoints_line
    assert not any(line.startswith("claim ") for line in printed.splitlines())
    assert "reproduced" not in printed and "inconclusive" not in printed


def test_quick_mode_uses_fewer_depths_and_epochs():
    experiment = load_example("compare_depths")
    args = cli.build_parser(experiment).parse_args(["--quick"])
    grid = cli._grid_from_args(experiment, args)
    settings = cli._settings_from_args(experiment, args)
    assert sum(len(d) for d in grid.values()) < sum(len(d) for d in experiment.grid.values())
    assert settings.epochs < experiment.settings.epochs and settings.train_subset
    full = cli._settings_from_args(experiment, cli.build_parser(experiment).parse_args([]))
    assert full == Settings() and full.epochs == 10 and full.batch_size == 100 and full.eval_batch_size == 5000
    assert experiment.grid == {0.003: (4, 5, 6, 7), 0.005: (1, 2, 3, 4)}


def test_cli_overrides_and_bad_flags(capsys):
    experiment = load_example("compare_lr")
    args = cli.build_parser(experiment).parse_args(["--depths", "2,3", "--lrs", "0.001", "--epochs", "2"])
    assert cli._grid_from_args(experiment, args) == {0.001: (2, 3)}
    with pytest.raises(SystemExit):
        cli.build_parser(experiment).parse_args(["--depths", "two"])
    assert "expected comma-separated integers, got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run_cli(experiment, ["--epochs", "0"])
    assert "--epochs must be an int >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the sweep machinery

SETTINGS = Settings(epochs=2, train_subset=200, test_subset=100)
CELLS = [Cell("vit_mnist", 1, 0.003, 0), Cell("vitbnffn_mnist", 1, 0.003, 0), Cell("vit_mnist", 1, 1e6, 0)]


def sweep(out: Path, mnist_root: Path, cells=CELLS, settings=SETTINGS):
    return run_sweep(cells, settings, out, data_dir=mnist_root, device="cpu", progress=False, log=lambda *a: None)


def test_a_diverging_cell_is_recorded_and_the_sweep_goes_on(mnist_root, tmp_path):
    results = {r["key"]: r for r in sweep(tmp_path, mnist_root)}
    assert set(results) == {c.key for c in CELLS}
    diverged = results["vit_mnist-d1-lr1e+06-s0"]
    assert diverged["history"]["diverged_at"] == 1 and diverged["clean_test_acc"] is None
    assert all(len(results[c.key]["history"]["records"]) == 2 for c in CELLS[:2])
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        json.loads(line)  # every line is strict JSON (no NaN)


def test_rerun_skips_finished_cells(mnist_root, tmp_path):
    first = sweep(tmp_path, mnist_root, CELLS[:2])
    calls = []
    original = ex._build_model
    try:
        ex._build_model = lambda cell: calls.append(cell) or original(cell)
        second = sweep(tmp_path, mnist_root, CELLS[:2])
    finally:
        ex._build_model = original
    assert calls == [] and second == first


def test_other_settings_in_the_same_folder_are_refused(mnist_root, tmp_path):
    sweep(tmp_path, mnist_root, CELLS[:1])
    with pytest.raises(ValueError, match="train_subset: 200 in the folder, 300 now"):
        sweep(tmp_path, mnist_root, CELLS[:1], Settings(epochs=2, train_subset=300, test_subset=100))


def test_unwritable_output_folder_fails_before_training(mnist_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write to the output folder"):
        sweep(blocker / "out", mnist_root)


KILLED_SWEEP = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from bnvit.experiments import sweep as ex
    sys.path.insert(0, {tests!r})
    from test_experiments import CELLS, SETTINGS

    calls = 0
    original = ex._build_model
    def build(cell):
        model = original(cell)
        def count(module, args):
            global calls
            calls += 1
            if calls == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)
        model.register_forward_pre_hook(count)
        return model
    ex._build_model = build
    ex.run_sweep(CELLS[:2], SETTINGS, Path(sys.argv[1]), data_dir=sys.argv[2], device="cpu", progress=False)
    """
)


@pytest.mark.slow
def test_a_sweep_killed_mid_cell_resumes_and_matches_an_uninterrupted_one(mnist_root, tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(KILLED_SWEEP.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "killed"
    # Forward calls per cell: 2 preflight, then per epoch 2 training batches and 1 validation batch,
    # then 1 batch of clean test evaluation: 9 in all. Call 16 is the second training step of the
    # second epoch of the second cell.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, str(script), str(out), str(mnist_root), "16"], capture_output=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    finished = load_results(out)
    assert [r["key"] for r in finished] == [CELLS[0].key]
    checkpoint = out / "checkpoints" / CELLS[1].key / "last.pt"
    assert checkpoint.exists()  # the second cell's first epoch was saved

    forward_calls = []
    original = ex._build_model

    def counting(cell):
        model = original(cell)
        model.register_forward_pre_hook(lambda m, a: forward_calls.append(cell.key))
        return model

    ex._build_model = counting
    try:
        resumed = sweep(out, mnist_root, CELLS[:2])
    finally:
        ex._build_model = original
    assert [r["key"] for r in resumed] == [c.key for c in CELLS[:2]]
    assert resumed[0] == finished[0]  # the finished cell was not redone
    assert CELLS[0].key not in forward_calls
    assert 0 < len(forward_calls) < 9  # the second cell continued from its checkpoint, not from scratch

    uninterrupted = sweep(tmp_path / "clean", mnist_root, CELLS[:2])
    assert [metrics(r) for r in resumed] == [metrics(r) for r in uninterrupted]
    assert [r["clean_test_acc"] for r in resumed] == [r["clean_test_acc"] for r in uninterrupted]


# ----------------------------------------------------------------------------- verdicts from data


def fake_result(model: str, depth: int, lr: float, seed: int, accs: list[float], diverged_at=None) -> dict:
    records = [
        dict(epoch=i + 1, train_loss=1.0, train_acc=a, val_loss=1.0, val_acc=a, lr=lr, seconds=1.0, images_per_sec=1.0)
        for i, a in enumerate(accs)
    ]
    cell = Cell(model, depth, lr, seed)
    return dict(
        key=cell.key,
        cell=dict(model=model, depth=depth, lr=lr, seed=seed),
        settings=dict(epochs=10, augment="fast"),
        history=dict(records=records, diverged_at=diverged_at, diverged_step=None, meta={}),
        test_acc=accs[-1] if accs else None,
        clean_test_acc=None if diverged_at else 0.95,
        device="cpu",
    )


def depth_results(gaps: dict[int, float], lr: float, seeds=(0,), noise=0.0) -> list[dict]:
    """ViT at 85% every epoch; ViTBNFFN at 85% + gap (+/- noise alternating by seed)."""
    out = []
    for depth, gap in gaps.items():
        for seed in seeds:
            jitter = noise if seed % 2 else -noise
            out.append(fake_result("vit_mnist", depth, lr, seed, [0.85] * 10))
            out.append(fake_result("vitbnffn_mnist", depth, lr, seed, [0.85 + gap + jitter] * 10))
    return out


SEEDS = tuple(range(5))


def test_claim_1_reproduced_when_the_data_shows_it():
    results = depth_results({4: 0.002, 5: -0.004, 6: 0.05, 7: 0.08}, 0.003, seeds=SEEDS, noise=0.002)
    (v,) = verdicts(results, [1])
    assert v.verdict == "reproduced", v.measured
    assert "depth 6: +4.96 ± 0.22 pts, 90% CI [+4.75, +5.17] (clearly: reproduced)" in v.measured


def test_one_seed_decides_nothing():
    results = depth_results({4: 0.002, 5: -0.004, 6: 0.05, 7: 0.08}, 0.003)
    (v,) = verdicts(results, [1])
    assert v.verdict == "inconclusive" and "(1 seed: nothing can be tested)" in v.measured


def test_claim_1_not_reproduced_when_bn_is_not_ahead_at_depth_7():
    results = depth_results({4: 0.0, 5: 0.0, 6: 0.05, 7: -0.03}, 0.003, seeds=SEEDS, noise=0.002)
    assert verdicts(results, [1])[0].verdict == "not reproduced"


def test_claim_2_inconclusive_when_the_seeds_spread_covers_the_gap():
    results = depth_results({1: 0.0, 2: 0.0, 3: 0.01, 4: 0.01}, 0.005, seeds=(0, 1, 2, 3), noise=0.03)
    (v,) = verdicts(results, [2])
    assert v.verdict == "inconclusive", v.measured


def test_claims_are_inconclusive_without_data():
    assert {v.verdict for v in verdicts([], [1, 2, 3, 4])} == {"inconclusive"}


def lr_drop_results(vit_at_005: list[float]) -> list[dict]:
    """Depth 3: both models at 91% with lr 0.003; ViTBNFFN at 88% and ViT at the given seeds' values with lr 0.005."""
    out = []
    for seed, vit in enumerate(vit_at_005):
        out += [
            fake_result("vit_mnist", 3, 0.003, seed, [0.91] * 10),
            fake_result("vit_mnist", 3, 0.005, seed, [vit] * 10),
            fake_result("vitbnffn_mnist", 3, 0.003, seed, [0.91] * 10),
            fake_result("vitbnffn_mnist", 3, 0.005, seed, [0.88] * 10),
        ]
    return out


def test_claim_3_needs_the_interval_past_the_threshold():
    # ViT loses (9, 13, 11) points more than ViTBNFFN: 11 ± 2, 90% interval [+7.63, +14.37], past 5.
    (v,) = verdicts(lr_drop_results([0.79, 0.75, 0.77]), [3])
    assert v.verdict == "reproduced" and "ViT 91.0 ± 0.0% -> 77.0 ± 2.0%" in v.measured
    # (2, 15, 1) points more: the mean passes the threshold, the interval holds it.
    (v,) = verdicts(lr_drop_results([0.86, 0.73, 0.87]), [3])
    assert v.verdict == "inconclusive", v.measured
    assert "ViT loses +6.00 ± 7.81 pts, 90% CI [-7.17, +19.17] more" in v.measured
    # (1, 2, 0) points more: 1 ± 1, the whole interval short of 5.
    assert verdicts(lr_drop_results([0.87, 0.86, 0.88]), [3])[0].verdict == "not reproduced"


def test_a_small_gap_is_not_clearly_ahead_even_when_seeds_are_noisy():
    """Expected 'clearly ahead' (>= 2 points): 0.5 ± 0.58 points over four seeds is shown below 2."""
    results = depth_results({1: 0.0, 2: 0.0, 3: 0.01, 4: 0.005}, 0.005, seeds=(0, 1, 2, 3), noise=0.005)
    (v,) = verdicts(results, [2])
    assert "depth 4: +0.50 ± 0.58 pts, 90% CI [-0.18, +1.18] (clearly: not reproduced)" in v.measured
    assert v.verdict == "not reproduced"


def test_slightly_ahead_has_an_upper_bound():
    """A gap shown above +2 is not 'slightly' ahead: the article's distinction is tested both ways."""
    assert judge([1.0, 1.2, 1.4, 1.1, 1.3], "slightly").verdict == "reproduced"
    assert judge([6.0, 7.5, 8.1, 6.6, 7.2], "slightly").verdict == "not reproduced"
    assert judge([6.0, 7.5, 8.1, 6.6, 7.2], "clearly").verdict == "reproduced"


def mlp_result(model: str, lr: float, seed: int, accs: list[float], steps_acc: list[float], **kw) -> dict:
    """An MLP run with a per-step record: training accuracy every 20 steps."""
    result = fake_result(model, 3, lr, seed, accs, **kw)
    result["history"]["steps"] = [
        dict(step=20 * (i + 1), epoch=1, train_loss=1.0, train_acc=a) for i, a in enumerate(steps_acc)
    ]
    return result


def mlp_results(bn_steps_to_90: list[int], plain_steps_to_90: list[int], bn_final_at_01=0.97) -> list[dict]:
    out = []
    for seed, (bn, plain) in enumerate(zip(bn_steps_to_90, plain_steps_to_90, strict=True)):

        def curve(k):  # reaches 0.9 at the k-th record (step 20 k)
            return [0.5] * (k - 1) + [0.92] * (30 - k + 1)

        out += [
            mlp_result("dnn_mnist", 0.01, seed, [0.95, 0.96, 0.97] * 5, curve(plain // 20)),
            mlp_result("dnnbn_mnist", 0.01, seed, [0.96, 0.97, 0.97] * 5, curve(bn // 20)),
            mlp_result("dnn_mnist", 0.1, seed, [0.3, 0.2], [0.1] * 30, diverged_at=3),
            mlp_result("dnnbn_mnist", 0.1, seed, [bn_final_at_01] * 15, curve(bn // 20)),
        ]
    return out


def test_claim_4_is_judged_on_the_steps_to_90_percent():
    results = mlp_results([100, 120, 80, 100, 140], [300, 260, 320, 280, 300])
    (v,) = verdicts(results, [4])
    assert v.verdict == "reproduced", v.measured
    speed, early, reference, stable = v.parts
    assert speed.values == pytest.approx(
        [math.log(b / p) for b, p in [(100, 300), (120, 260), (80, 320), (100, 280), (140, 300)]]
    )
    assert "median steps DNN_d3 300, DNNBN_d3 100" in speed.note
    assert reference.verdict == "not judged" and not reference.judged and reference.p_hold_holm is None
    assert early.verdict == "not judged" and "exploratory" in early.label
    assert early.values[0] == pytest.approx(100 * (0.92 * 6 + 0.5 * 4 - (0.92 * 0 + 0.5 * 10)) / 10)
    assert stable.verdict == "reproduced"
    # the same steps for both: no faster, shown (the log-ratio is 0 with no spread, above log 0.8)
    assert verdicts(mlp_results([100] * 5, [100] * 5), [4])[0].verdict == "not reproduced"
    # a plain MLP that never reached 90%: nothing imputed
    results[0]["history"]["steps"] = [dict(step=20, epoch=1, train_loss=1.0, train_acc=0.5)]
    (v,) = verdicts(results, [4])
    assert v.verdict == "inconclusive" and "never reached 90% in the recorded steps: DNN_d3 seed 0" in v.measured


def test_claim_4_counts_a_diverged_mlp_as_broken_down_and_needs_a_stable_bn_mlp():
    results = mlp_results([100, 120, 80], [300, 260, 320])
    assert verdicts(results, [4])[0].parts[-1].verdict == "reproduced"
    results = mlp_results([100, 120, 80], [300, 260, 320], bn_final_at_01=0.3)
    assert verdicts(results, [4])[0].verdict == "not reproduced"


def test_claim_4_without_per_step_records_is_inconclusive():
    results = mlp_results([100, 120, 80], [300, 260, 320])
    for r in results:
        del r["history"]["steps"]
    (v,) = verdicts(results, [4])
    assert v.verdict == "inconclusive" and "no per-step record" in v.measured


# ----------------------------------------------------------------------------- the published results

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def folder_experiment(folder: Path):
    """The experiment a published folder belongs to: recorded in sweep.json, else named by the folder
    (the study's `article`, `article-mlp`, `article-fp32`; `<example>`, `<example>-quick`, or
    `<example>-<what>` for a part of the grid with more seeds)."""
    recorded = json.loads((folder / "sweep.json").read_text()).get("experiment")
    if recorded or folder.name in EXPERIMENTS:  # the study's folders are named after their experiments
        return EXPERIMENTS[recorded or folder.name]
    return load_example(folder.name.partition("-")[0])


@pytest.mark.parametrize("folder", sorted(p.name for p in RESULTS_DIR.glob("*/") if (p / RESULTS).exists()))
def test_published_report_is_computed_from_its_results(folder, tmp_path):
    """Every `report.md` under docs/results is what `report_folder` makes of the `results.jsonl`
    beside it: the tables and verdicts in the docs come from the recorded runs, not by hand.

    A report names the sha256 of the results it was computed from. Results that grew after their
    report was written fail here (regenerate the report with the command that made it, plus
    `--report-only`); a folder still filling up (no report yet) is recomputed without comparing."""
    published = RESULTS_DIR / folder
    experiment = folder_experiment(published)
    results = load_results(published)
    keys = {r["key"] for r in results}
    seeds = 1 + max(r["cell"]["seed"] for r in results)
    reduced = "quick" in folder
    grid = experiment.quick_grid if reduced and experiment.quick_grid else experiment.grid
    assert keys <= {c.key for c in experiment.cells(grid, max(seeds, 1))}
    if folder in ("compare_depths", "compare_lr", "dnn_batchnorm") or folder.endswith("-quick"):
        expected = (experiment.quick_seeds if reduced else None) or 1
        assert keys == {c.key for c in experiment.cells(grid, expected)}  # the whole grid, the run's seeds
    if not (published / "report.md").exists():
        return
    problem = report_problem(published, experiment, tmp_path)
    assert problem is None, problem


def report_problem(published: Path, experiment, scratch: Path) -> str | None:
    """Why `published/report.md` is not what `report_folder` makes of the results beside it (None: it is)."""
    for figure in published.glob("*.png"):
        (scratch / figure.name).write_bytes(b"")
    reference = reference_folder(published, experiment)
    recomputed = report_folder(published, experiment, dest=scratch, figures=False, reference=reference)
    report = published / "report.md"
    if report_source(report).get(RESULTS) != results_sha256(published):
        return f"{report} was computed from other results than {published / RESULTS} holds now: regenerate it"
    if recomputed.read_text() != report.read_text():
        return f"{report} differs from what its results give: regenerate it, never edit it"
    return None


def test_readme_study_table_is_computed_from_the_published_results():
    """The README's study table is what `summary_table` makes of the published results, line for
    line: every number rounded once from exact values, every verdict the protocol's."""
    readme = (RESULTS_DIR.parents[1] / "README.md").read_text()
    shown = readme.split("<!-- study table:", 1)[1].split("\n", 1)[1].split("<!-- end of study table -->")[0]
    vit, mlp = (load_results(RESULTS_DIR / name, complete=True) for name in ("article", "article-mlp"))
    assert shown.strip().splitlines() == summary_table(vit, mlp), "README's study table: regenerate it"


def test_timm_blocks_transfer_table_is_computed_from_the_published_results():
    """docs/timm-blocks.md's table of the transfer study is what `transfer_table` makes of its results."""
    page = (RESULTS_DIR.parent / "timm-blocks.md").read_text()
    shown = page.split("<!-- transfer table:", 1)[1].split("\n", 1)[1].split("<!-- end of transfer table -->")[0]
    transfer = EXPERIMENTS["transfer"]
    expected = transfer_table(load_results(RESULTS_DIR / "transfer"), transfer.models, transfer.seeds)
    assert shown.strip().splitlines() == expected, "docs/timm-blocks.md's transfer table: regenerate it"


def test_an_edited_verdict_in_a_published_report_is_caught(tmp_path):
    published = tmp_path / "article"
    published.mkdir()
    for name in ("results.jsonl", "sweep.json", "report.md"):
        (published / name).write_bytes((RESULTS_DIR / "article" / name).read_bytes())
    for figure in (RESULTS_DIR / "article").glob("*.png"):  # the report lists them
        (published / figure.name).write_bytes(b"")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert report_problem(published, EXPERIMENTS["article"], scratch) is None
    text = (published / "report.md").read_text()
    (published / "report.md").write_text(text.replace("| **inconclusive** |", "| **reproduced** |", 1))
    assert "never edit it" in report_problem(published, EXPERIMENTS["article"], scratch)
