"""The seed study's command and statistics: t-tests, intervals and Holm's correction, the protocol's
fixed plan, resuming the study's folders without retraining, one experiment and one process per
folder, reports that cannot go stale, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import nct as noncentral_t
from scipy.stats import t as student_t

from bnvit.experiments import cli, study
from bnvit.experiments import sweep as article_sweep
from bnvit.experiments.claims import EXPECTATIONS, judge
from bnvit.experiments.folder import LOCK, FolderLockedError, prepare_folder, sweep_lock
from bnvit.experiments.grid import (
    ARTICLE_FP32,
    ARTICLE_MLP,
    ARTICLE_VIT,
    COMPARE_DEPTHS,
    COMPARE_LR,
    LR_WINDOW,
    Cell,
    Settings,
)
from bnvit.experiments.report import report_folder, report_source
from bnvit.experiments.results import load_results, results_sha256
from bnvit.experiments.stats import holm, seeds_needed, t_interval, t_test

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


# ----------------------------------------------------------------------------- statistics


def test_t_interval_of_three_paired_seeds():
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, std 1, n 3: 2 ± 4.303 / sqrt(3)
    assert (low, high) == pytest.approx((2 - 2.4843, 2 + 2.4843), abs=1e-3)
    assert t_interval([1.0]) is None


def test_t_test_matches_scipy():
    values = [0.3, 1.2, 2.5, 1.1, 0.9]  # scipy.stats.ttest_1samp(values, b, alternative=...).pvalue
    assert t_test(values, 1.5, "less") == pytest.approx(0.2260850355533946, rel=1e-9)
    assert t_test(values, 0.2, "greater") == pytest.approx(0.025075444715859662, rel=1e-9)
    assert t_test([1.0], 0.0, "greater") == 1.0  # one value shows nothing
    assert t_test([2.0, 2.0], 1.0, "greater") == 0.0 and t_test([2.0, 2.0], 1.0, "less") == 1.0
    with pytest.raises(ValueError, match="alternative must be 'greater' or 'less', got 'two'"):
        t_test(values, 0.0, "two")


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, 0.001]) == [0.5, 0.002]
    assert holm([0.04, 0.03]) == [0.06, 0.06]  # monotone: 0.04 alone would stay 0.04, below the earlier step
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_seeds_needed_is_the_first_count_with_80_percent_power():
    """The count at which a one-sided t-test at 5% rejects with probability 0.8 (a noncentral t, from scipy)."""
    n = seeds_needed(mean=1.0, std=1.0, distance=1.0)
    for k, enough in ((n - 1, False), (n, True)):
        critical = student_t.ppf(0.95, k - 1)
        assert bool(noncentral_t.sf(critical, k - 1, math.sqrt(k)) >= 0.8) is enough
    assert n == 8
    assert seeds_needed(1.0, 1.0, 1.0, target=0.5) == 5  # ~ where the observed t would just cross
    assert seeds_needed(1.0, 1.0, 0.0) is None  # the mean on the bound: no number of seeds decides


@pytest.mark.parametrize("seed", range(40))
def test_no_verdict_contradicts_its_printed_interval(seed):
    """The verdict is exactly where the 90% interval lies against the expectation's bounds."""
    rng = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 12, (), generator=rng))
    values = (torch.randn(n, generator=rng, dtype=torch.float64) * 3 + torch.rand((), generator=rng) * 8 - 2).tolist()
    for expect, bounds in EXPECTATIONS.items():
        test = judge(values, expect)
        low, high = test.interval
        inside = all(low > b if side == "above" else high < b for side, b in bounds)
        outside = any(high < b if side == "above" else low > b for side, b in bounds)
        assert (test.verdict == "reproduced") == inside, (expect, values)
        assert (test.verdict == "not reproduced") == outside, (expect, values)


def fake_result(model, depth, lr, seed, accs, settings=None, diverged_at=None) -> dict:
    records = [
        dict(epoch=i + 1, train_loss=1.0, train_acc=a, val_loss=1.0, val_acc=a, lr=lr, seconds=1.0, images_per_sec=1.0)
        for i, a in enumerate(accs)
    ]
    cell = Cell(model, depth, lr, seed)
    return dict(
        key=cell.key,
        cell=dataclasses.asdict(cell),
        settings=dataclasses.asdict(settings or Settings()),
        history=dict(records=records, diverged_at=diverged_at, diverged_step=None, meta={}),
        test_acc=accs[-1],
        clean_test_acc=0.95 + 0.001 * seed,
        device="cpu",
    )


def write_folder(folder: Path, results: list[dict], settings: Settings, **stored) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({**dataclasses.asdict(settings), **stored}))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def depth4_results(gaps: list[float], settings: Settings) -> list[dict]:
    out = []
    for seed, gap in enumerate(gaps):
        out.append(fake_result("vit_mnist", 4, 0.005, seed, [0.80] * 10, settings))
        out.append(fake_result("vitbnffn_mnist", 4, 0.005, seed, [0.80 + gap] * 10, settings))
    return out


def test_report_shows_paired_gaps_t_interval_and_the_source_hash(tmp_path):
    write_folder(tmp_path, depth4_results([0.01, 0.02, 0.03], Settings()), Settings())
    text = report_folder(tmp_path, dataclasses.replace(COMPARE_LR, claims=(2,)), figures=False)
    text = text.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 | lr 0.005, depth 4 |"))
    assert "s0: +1.00, s1: +2.00, s2: +3.00" in row and "+2.00 ± 1.00" in row and "[+0.31, +3.69]" in row
    assert "**inconclusive**" in row  # clearly ahead (>= 2): the 90% interval holds the threshold
    assert report_source(tmp_path / "report.md") == {"results.jsonl": results_sha256(tmp_path)}
    assert "Machine: not recorded with these results." in text and "precision auto" in text


def test_report_says_how_far_a_folder_is_from_the_protocols_seeds(tmp_path):
    results = depth4_results([0.01, 0.02, 0.03, 0.02], Settings())
    results += [fake_result(m, 3, 0.005, s, [0.8] * 10) for s in range(3) for m in ("vit_mnist", "vitbnffn_mnist")]
    write_folder(tmp_path, results, Settings())
    experiment = dataclasses.replace(COMPARE_LR, claims=(2,), seeds=4)
    text = report_folder(tmp_path, experiment, figures=False).read_text()
    assert "14 runs; 3 to 4 seeds per cell" in text
    assert "1 of 2 cells have them. Cells with fewer so far (paired seeds): lr 0.005 depth 3: 3." in text
    results += [fake_result(m, 3, 0.005, 3, [0.8] * 10) for m in ("vit_mnist", "vitbnffn_mnist")]
    write_folder(tmp_path, results, Settings())
    text = report_folder(tmp_path, experiment, figures=False).read_text()
    assert "Protocol: 4 paired seeds per cell (seeds 0-3), every cell complete." in text
    assert "s0: +1.00, s1: +2.00, s2: +3.00, s3: +2.00" in text


@pytest.mark.parametrize("experiment", [ARTICLE_VIT, ARTICLE_MLP, LR_WINDOW], ids=lambda e: e.name)
def test_a_run_is_quick_only_when_smaller_than_its_experiments_full_setting(experiment):
    full = experiment.settings
    assert not experiment.is_reduced(full)  # the learning-rate window's full run trains on a subset by design
    assert experiment.is_reduced(experiment.quick_settings)
    assert experiment.is_reduced(dataclasses.replace(full, epochs=full.epochs - 1))
    assert experiment.is_reduced(dataclasses.replace(full, test_subset=(full.test_subset or 10_000) - 1))
    assert not experiment.is_reduced(dataclasses.replace(full, epochs=full.epochs + 1))


def test_a_report_older_than_its_results_is_detected(tmp_path):
    results = depth4_results([0.01, 0.02], Settings())
    write_folder(tmp_path, results[:2], Settings())
    report_folder(tmp_path, ARTICLE_FP32, figures=False)
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write(json.dumps(results[2]) + "\n")
    assert report_source(tmp_path / "report.md")["results.jsonl"] != results_sha256(tmp_path)


def test_fp32_report_compares_gaps_and_verdicts_with_the_bf16_folder(tmp_path):
    fp32 = Settings(precision="fp32")
    write_folder(tmp_path / "article", depth4_results([0.10, 0.12, 0.14], Settings()), Settings())
    write_folder(tmp_path / "article-fp32", depth4_results([0.11, 0.12, 0.13], fp32), fp32)
    reference = study.reference_folder(tmp_path / "article-fp32", ARTICLE_FP32)
    assert reference == tmp_path / "article"
    text = report_folder(tmp_path / "article-fp32", ARTICLE_FP32, figures=False, reference=reference).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| depth 4, lr 0.005 |"))
    assert "+12.00 ± 1.00 | +12.00 ± 2.00 | +0.00 ± 1.00 |" in row
    assert row.count("reproduced (clearly expected)") == 2
    assert set(report_source(tmp_path / "article-fp32" / "report.md")) == {"results.jsonl", "../article/results.jsonl"}


def test_the_protocol_plan_is_fixed_ten_seeds_claims_first_and_cells_whole(tmp_path):
    args = study.build_parser().parse_args(["--out", str(tmp_path / "article")])
    plan = {part: cells for part, _, _, cells, _ in study._plan(args)}
    vit = plan["vit"]
    assert len(vit) == 2 * 10 * 10 and {c.seed for c in vit} == set(range(10))
    assert {c.seed for c in plan["mlp"]} == set(range(10)) and {c.seed for c in plan["fp32"]} == set(range(3))
    order = list(dict.fromkeys((c.lr, c.depth) for c in vit))  # each cell whole, in this order
    assert order[-1] == (0.003, 2)  # the cell no claim judges comes last
    assert order[0] == (0.003, 3) and len(order) == 10
    first = vit[:20]
    assert {(c.lr, c.depth) for c in first} == {(0.003, 3)} and {c.seed for c in first} == set(range(10))
    only_vit = study.build_parser().parse_args(["--out", str(tmp_path / "article"), "--parts", "vit"])
    assert [part for part, *_ in study._plan(only_vit)] == ["vit"]


def test_a_study_part_that_does_not_exist_is_refused(capsys):
    with pytest.raises(SystemExit):
        study.build_parser().parse_args(["--parts", "vit,cnn"])
    assert "the study's parts are mlp, vit, fp32" in capsys.readouterr().err


# ----------------------------------------------------------------------------- results lines


def test_results_of_an_unknown_schema_are_read_when_possible_and_refused_with_the_line_otherwise(tmp_path):
    good = fake_result("vit_mnist", 1, 0.003, 0, [0.5])
    newer = {**good, "schema": 7, "gpu_temp": 61}
    newer["history"] = {**good["history"], "records": [{**good["history"]["records"][0], "new_metric": 1.0}]}
    (tmp_path / "results.jsonl").write_text(json.dumps(newer) + "\n")
    (result,) = load_results(tmp_path, complete=True)
    assert result["history"]["records"][0]["val_acc"] == 0.5
    other = fake_result("vit_mnist", 2, 0.003, 0, [0.5])
    broken = {**other, "schema": 7, "history": {"epochs": []}}
    (tmp_path / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl, line 2: no 'history' .*schema 7"):
        load_results(tmp_path, complete=True)
    assert [r["key"] for r in load_results(tmp_path)] == [good["key"], other["key"]]  # enough to skip finished cells


@pytest.mark.parametrize("complete", [True, False])
def test_a_cell_recorded_twice_is_refused_naming_both_lines(tmp_path, complete, capsys):
    first, second = fake_result("vit_mnist", 1, 0.003, 0, [0.5]), fake_result("vit_mnist", 2, 0.003, 0, [0.6])
    lines = [first, second, {**first, "test_acc": 0.9}]  # a pasted or merged line, even with other numbers
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(
        ValueError, match=r"results\.jsonl, lines 1 and 3 both record the cell vit_mnist-d1-lr0\.003-s0"
    ):
        load_results(tmp_path, complete=complete)
    (tmp_path / "sweep.json").write_text(json.dumps(dataclasses.asdict(Settings())))
    code = cli.run_cli(COMPARE_LR, ["--out", str(tmp_path), "--report-only", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "lines 1 and 3" in err
    assert not (tmp_path / "report.md").exists()


# ----------------------------------------------------------------------------- the study's folders


def background_job_cells() -> dict[str, tuple[list[Cell], Settings]]:
    """The cells and settings of the job that trains the study (its driver, spelled out)."""
    vit = ("vit_mnist", "vitbnffn_mnist")
    grid = {0.003: (2, 3, 4, 5, 6, 7), 0.005: (1, 2, 3, 4)}
    return {
        "mlp": (
            [Cell(m, 3, lr, s) for s in range(3) for lr in (0.01, 0.1) for m in ("dnn_mnist", "dnnbn_mnist")],
            Settings(epochs=15, augment="none", test="clean", log_every=20),
        ),
        "vit": ([Cell(m, d, lr, s) for s in range(3) for lr, ds in grid.items() for d in ds for m in vit], Settings()),
        "fp32": ([Cell(m, 4, 0.005, s) for s in range(3) for m in vit], Settings(precision="fp32")),
    }


def study_plan(out: Path, *flags: str):
    args = study.build_parser().parse_args(["--seeds", "3", "--out", str(out), *flags])
    return {
        part: (experiment, settings, cells, folder) for part, experiment, settings, cells, folder in study._plan(args)
    }


def test_the_study_command_has_the_background_jobs_cells_and_settings(tmp_path):
    plan = study_plan(tmp_path / "article")
    for part, (cells, settings) in background_job_cells().items():
        _, planned_settings, planned_cells, _ = plan[part]
        assert {c.key for c in planned_cells} == {c.key for c in cells}, part
        assert planned_settings == settings, part
    assert [plan[p][3].name for p in ("vit", "mlp", "fp32")] == ["article", "article-mlp", "article-fp32"]
    assert (plan["vit"][0], plan["mlp"][0], plan["fp32"][0]) == (ARTICLE_VIT, ARTICLE_MLP, ARTICLE_FP32)


@pytest.mark.parametrize("folder", ["article", "article-mlp", "article-fp32"])
def test_the_published_study_folders_are_accepted_by_the_study_command(folder, tmp_path):
    """What the job wrote so far (sweep.json without an experiment) is this command's folder."""
    published = RESULTS_DIR / folder
    if not (published / "sweep.json").exists():
        pytest.skip(f"{published} not started yet")
    copy = tmp_path / folder
    copy.mkdir()
    for name in ("sweep.json", "results.jsonl"):
        if (published / name).exists():
            shutil.copy(published / name, copy / name)
    part = {"article": "vit", "article-mlp": "mlp", "article-fp32": "fp32"}[folder]
    experiment, settings, cells, _ = study_plan(tmp_path / "article")[part]
    cli.check_folder(copy, settings, experiment.name)  # same settings, no other owner
    planned = {(c.model, c.depth, c.lr) for c in cells}
    for r in load_results(copy):  # the planned cells, with the protocol's seeds only
        cell = r["cell"]
        assert (cell["model"], cell["depth"], cell["lr"]) in planned and cell["seed"] < experiment.seeds, r["key"]


@pytest.mark.slow
def test_a_finished_study_trains_nothing_and_writes_every_report(mnist_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "article"
    for part, (cells, settings) in background_job_cells().items():
        folder = study.study_folders(out)[part]
        epochs = settings.epochs
        results = [fake_result(c.model, c.depth, c.lr, c.seed, [0.9] * epochs, settings) for c in cells]
        write_folder(folder, results, settings)  # as the background job leaves them: settings only

    def no_training(*args, **kwargs):
        raise AssertionError("a finished study must not build or time a model")

    monkeypatch.setattr(article_sweep, "_build_model", no_training)
    monkeypatch.setattr(study, "estimate_seconds", no_training)
    flags = ["--seeds", "3", "--out", str(out), "--data-dir", str(mnist_root), "--no-download", "--device", "cpu"]
    assert study.main([*flags, "--no-progress", "--machine", "a test machine"]) == 0
    printed = capsys.readouterr().out
    assert "vit: 60 runs (0 to do)" in printed and "mlp: 12 runs (0 to do)" in printed
    for folder in study.study_folders(out).values():
        report = (folder / "report.md").read_text()
        assert "Machine: a test machine." in report
        assert json.loads((folder / "sweep.json").read_text())["experiment"] == folder.name
    assert {p.name for p in out.glob("*.png")} == {"depths_lr0.003.png", "depths_lr0.005.png", "lr_comparison.png"}
    assert "| 1 | lr 0.003, depth 7 |" in (out / "report.md").read_text()
    assert "Against the same cells" in (study.study_folders(out)["fp32"] / "report.md").read_text()


# ----------------------------------------------------------------------------- ownership and locks


def test_a_folder_belongs_to_one_experiment(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps(dataclasses.asdict(Settings())))  # written before: no owner
    prepare_folder(tmp_path, Settings(), "compare_lr")
    assert json.loads((tmp_path / "sweep.json").read_text())["experiment"] == "compare_lr"
    with pytest.raises(ValueError, match="holds results of the experiment 'compare_lr', not 'compare_depths'"):
        prepare_folder(tmp_path, Settings(), "compare_depths")


def test_cli_refuses_another_experiments_folder_in_one_line(tmp_path, capsys):
    prepare_folder(tmp_path, Settings(), "compare_lr")
    code = cli.run_cli(dataclasses.replace(COMPARE_LR, name="other"), ["--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'compare_lr', not 'other'" in err


HOLDER = textwrap.dedent(
    """
    import sys, time
    from bnvit.experiments.folder import sweep_lock
    with sweep_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.slow
def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=rf"is in use: a sweep runs there \(pid {holder.pid} on "):
            sweep_lock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel's lock does not
        holder.wait()
    assert (tmp_path / LOCK).exists()
    with sweep_lock(tmp_path):  # taken: no one holds it
        assert json.loads((tmp_path / LOCK).read_text())["pid"] != holder.pid
    assert not (tmp_path / LOCK).exists()


# ----------------------------------------------------------------------------- bad input and Ctrl-C


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "fp16"], "--precision fp16: precision='fp16' needs CUDA"),
        (["--train-subset", "99999999"], "--train-subset 99999999: MNIST has 60,000 such images"),
        (["--test-subset", "0"], "--test-subset must be an int >= 1, got 0"),
        (["--seeds", "0"], "--seeds must be an int >= 1, got 0"),
        (["--lrs", "x"], "expected comma-separated numbers, got 'x'"),
        (["--lrs", "nan"], "expected finite positive learning rates, got 'nan'"),
        (["--lrs", "0.003,inf"], "expected finite positive learning rates, got '0.003,inf'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_estimate(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(COMPARE_LR, ["--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "estimated" not in captured.out and not (tmp_path / "out").exists()


def test_a_cell_with_a_learning_rate_no_run_can_have_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"cell vit_mnist-d1-lrnan-s0: the learning rate must be a finite number > 0"):
        article_sweep.run_sweep([Cell("vit_mnist", 1, float("nan"), 0)], Settings(epochs=1), out, device="cpu")
    assert not out.exists()  # no sweep.json that would refuse the next, valid, run


def _foreign_folder(folder: Path) -> dict[str, tuple[bytes, int]]:
    """A user's folder: their own report and figure, no file bnvit wrote. Returns what it holds."""
    folder.mkdir()
    (folder / "report.md").write_text("# My own notes\n")
    (folder / "figure.png").write_bytes(b"\x89PNG my figure")
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("flags", [[], ["--report-only"], ["--estimate"]])
def test_a_folder_holding_files_bnvit_did_not_write_is_refused_untouched(tmp_path, capsys, flags):
    out = tmp_path / "mine"
    before = _foreign_folder(out)
    code = cli.run_cli(COMPARE_LR, ["--out", str(out), "--device", "cpu", "--quick", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds files bnvit did not write (figure.png, report.md) and no sweep.json" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_the_sweep_itself_refuses_a_foreign_folder_before_writing_its_lock(tmp_path):
    out = tmp_path / "mine"
    before = _foreign_folder(out)
    with pytest.raises(ValueError, match="holds files bnvit did not write"):
        article_sweep.run_sweep([Cell("vit_mnist", 1, 0.003, 0)], Settings(epochs=1), out, device="cpu")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_folder(empty, Settings(), "compare_lr")  # an empty folder is the sweep's to fill
    assert (empty / "sweep.json").exists()


def test_a_missing_data_folder_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "data"
    with pytest.raises(SystemExit) as exit_:
        study.main(["--data-dir", str(missing), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_.value.code == 2 and "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "out").exists()


def test_ctrl_c_during_a_sweep_is_one_line_and_exit_130(mnist_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_sweep", interrupted)
    monkeypatch.setattr(cli, "estimate_seconds", lambda *a, **k: 1.0)
    flags = ["--out", str(tmp_path), "--data-dir", str(mnist_root), "--no-download", "--device", "cpu"]
    assert cli.run_cli(COMPARE_LR, flags) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"{Path(sys.argv[0]).name}: interrupted; run the same command to resume"]


def test_bnvit_reproduce_runs_the_articles_command_line(capsys):
    import _bnvit_cli as bnvit_cli

    with pytest.raises(SystemExit) as exit_:
        bnvit_cli.main(["reproduce", "lr", "--epochs", "0"])
    assert exit_.value.code == 2 and "--epochs must be an int >= 1, got 0" in capsys.readouterr().err
    assert bnvit_cli.build_parser().parse_args(["reproduce", "all", "--seeds", "3"]).what == "all"


@pytest.mark.slow
def test_predict_does_not_import_the_article_harness():
    code = "import sys, bnvit.app.cli; sys.exit('bnvit.experiments' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


INTERRUPTED_SWEEP = textwrap.dedent(
    """
    import sys
    from bnvit.experiments import COMPARE_LR, cli
    cli.estimate_seconds = lambda *args, **kwargs: 1.0  # straight to training
    sys.exit(cli.run_cli(COMPARE_LR, sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_real_sigint_during_training_is_one_line_exit_130_and_frees_the_folder(mnist_root, tmp_path):
    out = tmp_path / "out"
    flags = ["--quick", "--epochs", "3", "--train-subset", "600", "--test-subset", "100", "--no-progress"]
    flags += ["--out", str(out), "--data-dir", str(mnist_root), "--no-download", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_SWEEP, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may ignore it
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["-c: interrupted; run the same command to resume"]
    assert not (out / LOCK).exists()


def test_figures_of_several_seeds_say_mean_std_and_each_panels_seeds_and_quick_ones_say_quick(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from bnvit.experiments import plots

    seen = {}
    original = plots._save

    def capture(fig, path, quick):
        ax = fig.axes[0]
        seen[path.name] = (ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()])
        return original(fig, path, quick)

    monkeypatch.setattr(plots, "_save", capture)
    results = depth4_results([0.01, 0.02, 0.03], Settings(epochs=3, train_subset=600))
    plots.plot_depths(results, tmp_path, quick="3 epochs, 600 training images")
    title, legend = seen["depths_lr0.005.png"]
    assert title == "quick: depth 4, lr 0.005, 3 seeds"
    assert legend == ["ViT (mean ± std)", "ViTBNFFN (mean ± std)"]
    # A cell still filling up: its panel says each model's count, not the first panel's.
    plots.plot_depths(results[:-1], tmp_path)
    assert seen["depths_lr0.005.png"][0] == "depth 4, lr 0.005, 3 and 2 seeds"


# ----------------------------------------------------------------------------- the learning-rate window


def window_results(settings: Settings) -> list[dict]:
    """ViT tolerates 1e-3 to 1e-2 (a decade) on seed 0 but only 1e-3 to 3e-3 on seed 1; ViTBNFFN 1e-3 to 3e-2."""
    finals = {
        ("vit_mnist", 0): [0.60, 0.90, 0.91, 0.90, 0.40],
        ("vit_mnist", 1): [0.62, 0.91, 0.92, 0.85, 0.10],
        ("vitbnffn_mnist", 0): [0.70, 0.92, 0.93, 0.93, 0.92],
        ("vitbnffn_mnist", 1): [0.71, 0.93, 0.93, 0.92, 0.92],
    }
    lrs = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    return [
        fake_result(model, 3, lr, seed, [0.5, acc], settings)
        for (model, seed), accs in finals.items()
        for lr, acc in zip(lrs, accs, strict=True)
    ]


def test_the_window_is_the_rates_within_two_points_of_the_best_in_decades_with_the_seeds_spread(tmp_path):
    from bnvit.experiments.grid import LR_WINDOW
    from bnvit.experiments.window import windows

    settings = LR_WINDOW.settings
    vit, bn = windows(window_results(settings))
    assert (vit.model, bn.model) == ("vit_mnist", "vitbnffn_mnist")
    # ViT's means: 61, 90.5, 91.5, 87.5, 25: within 2 points of 91.5 are 1e-3 and 3e-3
    assert vit.inside == (1e-3, 3e-3) and vit.width == pytest.approx(math.log10(3))
    assert vit.seed_widths == pytest.approx((1.0, math.log10(3))) and not vit.at_edge
    assert bn.inside == (1e-3, 3e-3, 1e-2, 3e-2) and bn.width == pytest.approx(math.log10(30)) and bn.at_edge
    write_folder(tmp_path, window_results(settings), settings)
    report = report_folder(tmp_path, LR_WINDOW).read_text()
    assert (tmp_path / "lr_window.png").read_bytes()[:4] == b"\x89PNG"
    row = next(line for line in report.splitlines() if line.startswith("| ViTBNFFN | 3 |"))
    assert "| 0.001 to 0.03 | ≥ 1.48 | 1.48 to 1.48 | 2 |" in row, row
    row = next(line for line in report.splitlines() if line.startswith("| ViT | 3 |"))
    assert "| 0.003 | 91.5 ± 0.7 | 0.001 to 0.003 | 0.48 | 0.48 to 1.00 | 2 |" in row, row


def test_the_lr_window_command_line_defaults_to_its_seeds_and_is_reachable_from_bnvit(capsys):
    import _bnvit_cli as bnvit_cli
    from bnvit.experiments.grid import LR_WINDOW

    lrs = sorted(LR_WINDOW.grid)
    assert len(lrs) >= 9 and lrs[0] <= 1e-4 and lrs[-1] >= 3e-2 and set(LR_WINDOW.grid.values()) == {(3, 6)}
    parser = cli.build_parser(LR_WINDOW)
    assert parser.parse_args([]).seeds is None  # filled in by run_cli: 3, or 2 with --quick
    with pytest.raises(SystemExit) as exit_:
        bnvit_cli.main(["reproduce", "lr-window", "--seeds", "0"])
    assert exit_.value.code == 2 and "--seeds must be an int >= 1, got 0" in capsys.readouterr().err


def test_estimate_times_cells_with_the_threads_they_will_use(monkeypatch):
    from bnvit.experiments import estimate

    seen = []

    def timed(cell, settings, device, batches):
        seen.append(torch.get_num_threads())
        return 1e-3, 1e-4

    monkeypatch.setattr(estimate, "_timed_epochs", timed)
    before = torch.get_num_threads()
    cells = [Cell("vit_mnist", 3, 1e-3, 0), Cell("vitbnffn_mnist", 3, 1e-3, 0)]
    seconds = estimate.estimate_seconds(cells, Settings(epochs=2, train_subset=1000, test_subset=100), "cpu", threads=1)
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert seconds == pytest.approx(2 * (2 * (1000 * 1e-3 + 100 * 1e-4) + 100 * 1e-4))


def test_estimate_times_each_model_at_two_depths_and_interpolates_the_rest(monkeypatch):
    """compare_depths' 14 (model, depth) pairs cost 4 timings; a cost linear in depth is extrapolated exactly."""
    from bnvit.experiments import estimate

    seen = []

    def timed(cell, settings, device, batches):
        seen.append((cell.model, cell.depth))
        return 1e-3 * (2 + cell.depth), 1e-4 * (3 + cell.depth)

    monkeypatch.setattr(estimate, "_timed_epochs", timed)
    cells = COMPARE_DEPTHS.cells(COMPARE_DEPTHS.grid, 1)
    settings = Settings(epochs=3, train_subset=1000, test_subset=100)
    seconds = estimate.estimate_seconds(cells, settings, "cpu")
    assert len({(c.model, c.depth) for c in cells}) == 14
    assert sorted(seen) == [("vit_mnist", 1), ("vit_mnist", 7), ("vitbnffn_mnist", 1), ("vitbnffn_mnist", 7)]
    per_cell = [(1e-3 * (2 + c.depth), 1e-4 * (3 + c.depth)) for c in cells]
    assert seconds == pytest.approx(sum(3 * (1000 * t + 100 * e) + 100 * e for t, e in per_cell))


def test_fp32_report_of_a_folder_holding_one_model_of_its_cell_so_far(tmp_path):
    """While the fp32 part fills up, its report compares nothing yet rather than failing."""
    reference, folder = tmp_path / "article", tmp_path / "article-fp32"
    line = {
        "key": "vit_mnist-d4-lr0.005-s0",
        "cell": {"model": "vit_mnist", "depth": 4, "lr": 0.005, "seed": 0},
        "settings": dataclasses.asdict(ARTICLE_FP32.settings),
        "history": {
            "records": [
                dict(
                    epoch=1,
                    train_loss=1.0,
                    train_acc=0.5,
                    val_loss=1.0,
                    val_acc=0.5,
                    lr=0.005,
                    seconds=1.0,
                    images_per_sec=100.0,
                )
            ]
        },
        "test_acc": 0.5,
        "clean_test_acc": 0.6,
    }
    for path, lines in (
        (
            reference,
            [
                line,
                {**line, "key": "vitbnffn_mnist-d4-lr0.005-s0", "cell": {**line["cell"], "model": "vitbnffn_mnist"}},
            ],
        ),
        (folder, [line]),
    ):
        path.mkdir()
        (path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = report_folder(folder, ARTICLE_FP32, dest=tmp_path / "out", figures=False, reference=reference)
    assert "| depth 4, lr 0.005 | none in common | – | – | – |" in report.read_text()
