"""Faults: crafted and half-written checkpoints, SIGKILL while the results file is written, a diverging batch.

What `test_train.py` and `test_experiments.py` already prove is not repeated here (SIGKILL
mid-epoch of `fit` and of a sweep, unwritable folders, NaN inputs in `fit`, `load_checkpoint`
skipping a truncated file, a crash inside `torch.save`).
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bnvit
from bnvit.article import Cell, Settings, run_sweep
from bnvit.data import DeviceLoader
from bnvit.training.checkpoint import LAST, load_checkpoint
from test_train import FIT, metrics, tiny_model, toy_data


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the frozen augmented test set out of the user's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


# ----------------------------------------------------------------------------- checkpoints that must not be loaded


def _create_marker(path: str) -> str:
    """What the crafted file asks the unpickler to call: creating a file proves code ran."""
    Path(path).write_text("code from a checkpoint ran")
    return path


class _Crafted:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_create_marker, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    crafted = {"format": "bnvit.fit/1", "epoch": 1, "model": _Crafted(marker)}
    path = tmp_path / "crafted.pt"
    torch.save(crafted, path)
    # Control: an unrestricted unpickler does run it, so the file is a real threat.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match=r"crafted\.pt"):
        bnvit.load_model(path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LAST).write_bytes(path.read_bytes())
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"refusing .*last\.pt: it asks to import the Python object .*_create_marker"):
        fit_args = {**FIT, "epochs": 2}
        bnvit.fit(model, toy_data(32), checkpoint_dir=folder, **fit_args)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no training started
    assert (folder / LAST).read_bytes() == path.read_bytes()  # and the evidence is not overwritten


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_that_would_run_code_never_runs(tmp_path):
    """Protocol 2 reaches the forbidden import: refused. Protocol 4 is stopped earlier, at an opcode the
    weights-only unpickler does not know, so it looks like any damaged file: skipped with a warning."""
    marker = tmp_path / "marker"
    (tmp_path / LAST).write_bytes(pickle.dumps({"epoch": 1, "x": _Crafted(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing .*_create_marker"):
        load_checkpoint(tmp_path)
    (tmp_path / LAST).write_bytes(pickle.dumps({"epoch": 1, "x": _Crafted(marker)}, protocol=4))
    with pytest.warns(RuntimeWarning, match="ignoring damaged checkpoint"):
        assert load_checkpoint(tmp_path) is None
    assert not marker.exists()


def test_fit_resumes_from_the_previous_checkpoint_when_the_last_is_half_written(tmp_path):
    data = toy_data()
    full = bnvit.fit(tiny_model(), data, data, **{**FIT, "epochs": 4})
    bnvit.fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    last = tmp_path / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # half of epoch 2's checkpoint
    with pytest.warns(RuntimeWarning, match=r"ignoring damaged checkpoint .*last\.pt"):
        resumed = bnvit.fit(tiny_model(seed=7), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 4})
    assert metrics(resumed) == metrics(full)  # epoch 1's checkpoint, then epochs 2-4 again


# ----------------------------------------------------------------------------- the results file under SIGKILL

SETTINGS = Settings(epochs=1, train_subset=200, test_subset=100, test="clean")
CELL = Cell("vitbnffn_mnist", 1, 0.003, 0)
EARLIER = {"key": "vit_mnist-d1-lr0.003-s0", "cell": {"model": "vit_mnist"}, "note": "finished by an earlier run"}

KILLED_WHILE_WRITING = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from pathlib import Path
    from bnvit import _io
    sys.path.insert(0, {tests!r})
    from test_faults import CELL, SETTINGS
    from bnvit.article import run_sweep

    original = _io.atomic_open

    class HalfThenDie:  # a SIGKILL in the middle of writing the new results file
        def __init__(self, handle):
            self.handle = handle
        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def dying_open(path, mode="w"):
        with original(path, mode) as handle:
            if Path(path).name == "results.jsonl":
                yield HalfThenDie(handle)
                return
            yield handle

    _io.atomic_open = dying_open
    run_sweep([CELL], SETTINGS, Path(sys.argv[1]), data_dir=sys.argv[2], device="cpu", progress=False)
    """
)


def test_sigkill_while_the_results_file_is_written_leaves_only_complete_lines(mnist_root, tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(KILLED_WHILE_WRITING.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps(EARLIER) + "\n"
    (out / "results.jsonl").write_text(earlier)
    proc = subprocess.run([sys.executable, str(script), str(out), str(mnist_root)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list(out.glob(".results.jsonl.*.tmp")), "the kill was meant to happen inside the write"
    assert (out / "results.jsonl").read_text() == earlier  # the old file, whole: never half of the new one

    results = run_sweep([CELL], SETTINGS, out, data_dir=mnist_root, device="cpu", progress=False, log=lambda *a: 0)
    assert [r["key"] for r in results] == [EARLIER["key"], CELL.key]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [EARLIER["key"], CELL.key]  # complete, strict JSON
    assert len(results[1]["history"]["records"]) == 1  # from the checkpoint the killed run left


# ----------------------------------------------------------------------------- a diverging batch in a sweep


class _PoisonedLoader(DeviceLoader):
    """The article's training loader, with one patch of huge (finite) pixels `value` in the second batch of epoch 1.

    Finite data whose loss becomes non-finite: a divergence. (NaN or inf in the data is refused
    before training instead: `test_train.py`.)
    """

    value = 3e38

    def _batches(self, epoch):
        for index, (images, labels) in enumerate(super()._batches(epoch)):
            if epoch == 1 and index == 1:
                images = images.clone()
                images[0, 0, :7, :7] = self.value  # a whole patch: its LayerNorm statistics overflow
            yield images, labels


def test_a_batch_that_makes_the_loss_non_finite_makes_the_cell_diverged_and_the_sweep_goes_on(
    mnist_root, tmp_path, monkeypatch
):
    from bnvit import data

    bad_values = {1: 3e38, 2: -3e38}  # cell seed -> the huge patch of its second batch
    original = data.mnist_loaders

    def loaders(*args, **kwargs):
        train, test = original(*args, **kwargs)
        if kwargs["seed"] in bad_values:
            settings = dict(batch_size=train.batch_size, augment=train.augment, seed=train.seed)
            train = _PoisonedLoader(train.images, train.labels, **settings)
            train.value = bad_values[kwargs["seed"]]
        return train, test

    monkeypatch.setattr(data, "mnist_loaders", loaders)
    cells = [Cell("vitbnffn_mnist", 1, 0.003, seed) for seed in (1, 2, 0)]  # the healthy cell runs last
    settings = Settings(epochs=1, train_subset=300, test_subset=100, test="clean")
    results = run_sweep(cells, settings, tmp_path, data_dir=mnist_root, device="cpu", progress=False, log=lambda *a: 0)
    *poisoned, healthy = results
    assert [r["key"] for r in results] == [c.key for c in cells]
    for result in poisoned:
        # the step of the huge batch, or the next one (its update made the weights non-finite)
        assert result["history"]["diverged_at"] == 1 and result["history"]["diverged_step"] in (2, 3)
        assert result["clean_test_acc"] is None and result["test_acc"] is None
        assert load_checkpoint(tmp_path / "checkpoints" / result["key"])["history"]["diverged_at"] == 1
    assert len(healthy["history"]["records"]) == 1 and healthy["history"]["diverged_at"] is None
    assert 0.0 <= healthy["clean_test_acc"] <= 1.0
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literal
