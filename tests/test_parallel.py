"""Several cells at once: worker processes and Ray tasks give the sequential runner's numbers, one writer, faults.

Every comparison runs each cell with one thread in both runners, so float reductions happen in
the same order and the numbers are bit-identical (at the default precision, bf16 autocast on
this CPU; fp32 where the CPU lacks native bf16).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bnvit.experiments import COMPARE_LR, Cell, Settings, cli, estimate, parallel, run_sweep
from bnvit.experiments.parallel import FAILURES, SweepError

SETTINGS = Settings(epochs=1, train_subset=200, test_subset=100)
CELLS = [Cell("vit_mnist", 1, 0.003, 0), Cell("vitbnffn_mnist", 1, 0.003, 0)]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _private_cache_and_threads(tmp_path_factory, monkeypatch):
    """Keep the frozen augmented test set out of the user's cache; restore this process's thread count."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def numbers(results: list[dict]) -> dict[str, tuple]:
    """What a cell measured (not how long it took or where)."""
    skip = ("seconds", "images_per_sec")
    return {
        r["key"]: (
            [{k: v for k, v in e.items() if k not in skip} for e in r["history"]["records"]],
            r["history"]["diverged_at"],
            r["test_acc"],
            r["clean_test_acc"],
        )
        for r in results
    }


def sweep(out: Path, mnist_root: Path, cells=CELLS, **kwargs) -> list[dict]:
    args = dict(data_dir=mnist_root, device="cpu", progress=False, log=lambda *a: None, threads=1)
    return run_sweep(cells, SETTINGS, out, **{**args, **kwargs})


@pytest.fixture(scope="module")
def sequential(mnist_root, tmp_path_factory) -> dict[str, tuple]:
    threads = torch.get_num_threads()
    try:
        return numbers(sweep(tmp_path_factory.mktemp("sequential"), mnist_root))
    finally:
        torch.set_num_threads(threads)


def lines(out: Path, name: str = "results.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]  # strict: every line complete


# ----------------------------------------------------------------------------- the same numbers, one writer


@pytest.mark.slow
def test_two_workers_give_the_sequential_runners_numbers(mnist_root, tmp_path, sequential):
    logged = []
    results = sweep(tmp_path, mnist_root, workers=2, log=logged.append)
    assert numbers(results) == sequential
    assert sorted(r["key"] for r in lines(tmp_path)) == sorted(c.key for c in CELLS)
    assert all(r["machine"]["torch_threads"] == 1 for r in results)  # recorded by the worker that trained it
    assert any("2 at once in worker processes (1 thread each" in line for line in logged), logged
    assert not (tmp_path / FAILURES).exists()
    assert sweep(tmp_path, mnist_root, workers=2) == results  # resumable: nothing left to train


@pytest.mark.slow
def test_a_worker_cell_that_raises_is_recorded_retried_once_and_reported(mnist_root, tmp_path):
    broken = Cell("no_such_model", 1, 0.003, 0)
    logged = []
    with pytest.raises(SweepError, match=r"1 of 2 cells failed twice: no_such_model-d1-lr0\.003-s0 \(.*Unknown model"):
        sweep(tmp_path, mnist_root, cells=[broken, CELLS[0]], workers=2, log=logged.append)
    assert [r["key"] for r in lines(tmp_path)] == [CELLS[0].key]  # the healthy cell is recorded
    failures = lines(tmp_path, FAILURES)
    assert [(f["key"], f["attempt"]) for f in failures] == [(broken.key, 1), (broken.key, 2)]
    assert "Traceback" in failures[0]["error"] and "Unknown model" in failures[0]["error"]
    assert any("trying it once more" in line for line in logged)


# ----------------------------------------------------------------------------- SIGKILL of a worker, of the driver

# Spawned workers run this script again as their main module (outside the __main__ block), so the
# patch of the model builder reaches them.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from bnvit.experiments import sweep
    from test_parallel import CELLS, SETTINGS

    OUT, MODE = Path(sys.argv[1]), sys.argv[2]
    original_build, original_append = sweep._build_model, sweep._append

    def build(cell):
        (OUT / "pids").mkdir(exist_ok=True)
        (OUT / "pids" / str(os.getpid())).touch()
        marker = OUT / "killed-once"
        if MODE == "worker" and cell == CELLS[0] and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # this worker dies before its cell is trained
        return original_build(cell)

    def append_then_die(out, line):
        original_append(out, line)
        os.kill(os.getpid(), signal.SIGKILL)  # the driver dies right after recording its first cell

    sweep._build_model = build
    if MODE == "driver":
        sweep._append = append_then_die

    if __name__ == "__main__":
        cells = CELLS + [CELLS[0].__class__("vit_mnist", 2, 0.003, 0)] * (MODE == "driver")  # one still running
        sweep.run_sweep(cells, SETTINGS, OUT, data_dir=sys.argv[3], device="cpu", progress=False, workers=2, threads=1)
    """
)


def run_script(tmp_path: Path, out: Path, mode: str, mnist_root: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "parallel_sweep.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    out.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script), str(out), mode, str(mnist_root)], capture_output=True, text=True, timeout=300
    )


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no longer runs


@pytest.mark.slow
def test_sigkill_of_a_worker_is_recorded_and_its_cell_retried(mnist_root, tmp_path):
    out = tmp_path / "out"
    proc = run_script(tmp_path, out, "worker", mnist_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["key"] for r in lines(out)) == sorted(c.key for c in CELLS)
    (failure,) = lines(out, FAILURES)
    assert failure["key"] == CELLS[0].key and failure["attempt"] == 1 and "killed by SIGKILL" in failure["error"]
    assert "trying it once more" in proc.stdout


@pytest.mark.slow
def test_sigkill_of_the_driver_loses_no_finished_cell_and_its_workers_stop(mnist_root, tmp_path, sequential):
    out = tmp_path / "out"
    proc = run_script(tmp_path, out, "driver", mnist_root)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (first,) = lines(out)  # one complete line: the cell recorded before the kill
    pids = [int(p.name) for p in (out / "pids").iterdir()]
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(pid) for pid in pids), "a worker outlived its killed driver"

    results = sweep(out, mnist_root, cells=CELLS)  # the stale lock is taken over; the finished cell is kept
    assert results[0] == first
    assert {k: v for k, v in numbers(results).items() if k in sequential} == sequential


# ----------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_a_two_cell_sweep_on_a_local_ray_instance_gives_the_sequential_numbers(mnist_root, tmp_path, sequential):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnvit[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        results = sweep(tmp_path, mnist_root, ray="local")
        assert numbers(results) == sequential
        assert sorted(r["key"] for r in lines(tmp_path)) == sorted(c.key for c in CELLS)
        with pytest.raises(ValueError, match="other settings"):
            run_sweep(CELLS, Settings(epochs=2), tmp_path, data_dir=mnist_root, device="cpu", ray="local")
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers 0: use a number of worker processes from 1 to"),
        (["--workers", "9999"], "--workers 9999: this machine has"),
        (["--workers", "two"], "expected a number of worker processes or auto, got 'two'"),
        (["--workers", "2", "--ray"], "--workers and --ray: choose one"),
        (["--ray", "nowhere"], "--ray nowhere: expected HOST:PORT"),
        (["--ray", "127.0.0.1:{port}"], "--ray 127.0.0.1:{port}: no Ray cluster answers there"),
    ],
)
def test_bad_parallel_input_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, flags, message):
    if "--ray" in flags:
        pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnvit[ray]')")
    port = free_port()
    flags = [f.format(port=port) for f in flags]
    monkeypatch.setattr(cli, "estimate_seconds", lambda *a, **k: pytest.fail("estimated after bad input"))
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(COMPARE_LR, ["--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message.format(port=port) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_address_that_never_answers_is_refused_after_the_short_timeout(monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnvit[ray]')")

    def silent(address, timeout):
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(parallel.socket, "create_connection", silent)
    monkeypatch.setattr(parallel, "RAY_TIMEOUT_S", 0.2)
    began = time.monotonic()
    with pytest.raises(ValueError, match=r"--ray 10\.0\.0\.5:6379: no Ray cluster answers there \(no answer within"):
        parallel.check_ray("10.0.0.5:6379")
    assert time.monotonic() - began < 2


def test_ray_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(COMPARE_LR, ["--device", "cpu", "--out", str(tmp_path / "out"), "--ray"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--ray needs Ray, which is not installed here: pip install 'bnvit[ray]'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_workers_auto_picks_the_fastest_measurement_and_prints_it(monkeypatch):
    measured = {(1, 2): 800.0, (2, 1): 1030.0, (1, 1): 900.0}
    monkeypatch.setattr(estimate, "measure_workers", lambda cell, settings, device, n, threads: measured[(n, threads)])
    logged = []
    cells = [Cell("vit_mnist", 1, 0.003, 0), Cell("vitbnffn_mnist", 6, 0.003, 0)]
    assert estimate.choose_workers(cells, Settings(precision="fp32"), "cpu", cores=2, log=logged.append) == (2, 1)
    (line,) = logged
    assert line.startswith("--workers auto: 2 x 1 thread") and "vitbnffn_mnist depth 6 in fp32" in line
    assert "1 x 2 threads: 800 images/s" in line and "2 x 1 thread: 1030 images/s" in line
    assert "1 x 1 thread: 900 images/s" in line
    measured[(1, 1)] = 2000.0  # a busy machine: one single-thread process beats both
    assert estimate.choose_workers(cells, Settings(precision="fp32"), "cpu", cores=2, log=logged.append) == (1, 1)
