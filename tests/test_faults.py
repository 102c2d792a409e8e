"""Faults: crafted and half-written checkpoints, SIGKILL while the results file is written, a diverging batch.

What `test_train.py` and `test_experiments.py` already prove is not repeated here (SIGKILL
mid-epoch of `fit` and of a sweep, unwritable folders, NaN inputs in `fit`, `load_checkpoint`
skipping a truncated file, a crash inside `torch.save`).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import bnvit
from bnvit._util import io as _io
from bnvit._util.io import FolderLockedError
from bnvit.data import DeviceLoader
from bnvit.experiments import Cell, Settings, run_sweep
from bnvit.training.checkpoint import INCOMING, LAST, LOCK, load_checkpoint
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


# ----------------------------------------------------------------------------- one process per checkpoint folder

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import bnvit
    from test_train import FIT, tiny_model, toy_data

    class Wait(bnvit.Callback):
        def on_fit_start(self, state):
            print("training", flush=True)
            time.sleep(120)

    bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=sys.argv[1], callbacks=[Wait()], **FIT)
    """
)


@pytest.mark.slow
def test_a_second_process_training_into_the_same_checkpoint_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(tests=str(Path(__file__).parent)))
    holder = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "training"
        with pytest.raises(
            FolderLockedError, match=rf"{folder} is in use: fit\(\) is training .*\(pid {holder.pid} on "
        ):
            bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=folder, **FIT)
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, and the kernel's lock goes with the process
        holder.wait()
    assert (folder / LOCK).exists()
    # A restarted container gets the same pid and host: the record left behind then names the new process itself.
    record = json.loads((folder / LOCK).read_text())
    (folder / LOCK).write_text(json.dumps({**record, "pid": os.getpid()}))
    history = bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=folder, **FIT)  # resumes, no manual step
    assert len(history) == FIT["epochs"] and not (folder / LOCK).exists()


def test_a_second_thread_training_into_the_same_checkpoint_folder_is_refused(tmp_path):
    started, finish = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    class Wait(bnvit.Callback):
        def on_fit_start(self, state):
            started.set()
            finish.wait(60)

    def first() -> None:
        outcome["first"] = bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, callbacks=[Wait()], **FIT)

    thread = threading.Thread(target=first, name="first-fit")
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(
            FolderLockedError, match=rf"{tmp_path} is in use: fit\(\) is training .*thread 'first-fit' of this process"
        ):
            bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **FIT)
    finally:
        finish.set()
        thread.join()
    assert len(outcome["first"]) == FIT["epochs"]  # the first run was not disturbed
    assert load_checkpoint(tmp_path)["epoch"] == FIT["epochs"] and not (tmp_path / LOCK).exists()


# ----------------------------------------------------------------------------- a full disk, leftovers, no folder


class _FullDisk:
    """A file on a disk that fills up after `room` bytes: `write` raises ENOSPC, as the kernel does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_while_saving_names_the_cause_and_the_intact_checkpoint_then_resumes(tmp_path, monkeypatch):
    data = toy_data()
    full = bnvit.fit(tiny_model(), data, data, **{**FIT, "epochs": 3})
    saves = []

    def filling_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115  (returned, closed by its user)
        if Path(path).name.startswith(f".{INCOMING}.") and "w" in mode:
            saves.append(path)
            return _FullDisk(handle, room=10**9 if len(saves) < 2 else 4096)  # the second save finds the disk full
        return handle

    monkeypatch.setattr(_io, "open", filling_open, raising=False)
    with pytest.raises(OSError, match="No space left on device") as info:
        bnvit.fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 3})
    message = str(info.value)
    assert "\n" not in message and "enforce fail" not in message
    assert f"cannot save the checkpoint of epoch 2 in {tmp_path}" in message
    assert f"{tmp_path / LAST} is intact and a resume starts from it" in message
    assert load_checkpoint(tmp_path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temporary file, no lock left
    monkeypatch.undo()  # space again: the same call resumes and ends as if nothing happened
    resumed = bnvit.fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 3})
    assert metrics(resumed) == metrics(full)


def test_temporary_files_of_a_killed_save_are_removed_on_the_next_start(tmp_path):
    bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    leftovers = [tmp_path / f".{INCOMING}.{suffix}.tmp" for suffix in ("0a1b2c3d4e5f", "ffeeddccbbaa")]
    for path in leftovers:
        path.write_bytes(b"half of a checkpoint")  # what a SIGKILL during torch.save leaves
    mine = tmp_path / "notes.txt"
    mine.write_text("not bnvit's")
    bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    assert not any(path.exists() for path in leftovers) and mine.exists()


@pytest.mark.parametrize(("folder", "error"), [("", ValueError), ("   ", ValueError), (3, TypeError)])
def test_an_empty_checkpoint_dir_is_refused_and_nothing_is_written(tmp_path, monkeypatch, folder, error):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match="checkpoint_dir") as info:
        bnvit.fit(tiny_model(), toy_data(32), checkpoint_dir=folder, **FIT)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the results file under SIGKILL

SETTINGS = Settings(epochs=1, train_subset=200, test_subset=100, test="clean")
CELL = Cell("vitbnffn_mnist", 1, 0.003, 0)
EARLIER = {"key": "vit_mnist-d1-lr0.003-s0", "cell": {"model": "vit_mnist"}, "note": "finished by an earlier run"}

KILLED_WHILE_WRITING = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from pathlib import Path
    from bnvit._util import io as _io
    sys.path.insert(0, {tests!r})
    from test_faults import CELL, SETTINGS
    from bnvit.experiments import run_sweep

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


@pytest.mark.slow
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
        assert load_checkpoint(tmp_path / "checkpoints" / result["key"]) is None  # no finite epoch: no checkpoint
    assert len(healthy["history"]["records"]) == 1 and healthy["history"]["diverged_at"] is None
    assert 0.0 <= healthy["clean_test_acc"] <= 1.0
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literal


# ----------------------------------------------------------------------------- a diverging epoch in fit


class _LossThatBreaks:
    """Cross-entropy that goes wrong at its `at`-th call: NaN (`"nan"`), or finite with NaN gradients (`"grad"`:
    the loss looks fine and the step's update makes the weights NaN)."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how, self.calls = at, how, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if self.calls < self.at:
            return loss
        if self.how == "nan":
            return loss * float("nan")
        return loss + torch.sqrt((logits * 0).sum())  # value + 0; gradient inf * 0 = NaN


class _Snapshots(bnvit.Callback):
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, state, record):
        self.states[record.epoch] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


@pytest.mark.parametrize("how", ["nan", "grad"])
def test_a_diverging_epoch_leaves_the_last_finite_state_in_last_pt_and_it_loads(tmp_path, how):
    # 2 steps per epoch, no validation: call 3 is step 1 of epoch 2; call 4 its last step ("grad": a finite loss)
    snapshots = _Snapshots()
    loss_fn = _LossThatBreaks(3 if how == "nan" else 4, how)
    fit_args = {**FIT, "epochs": 4}
    history = bnvit.fit(
        tiny_model(), toy_data(64), checkpoint_dir=tmp_path, loss_fn=loss_fn, callbacks=[snapshots], **fit_args
    )
    assert history.diverged_at == 2 and len(history) == 1
    assert history.diverged_step == (1 if how == "nan" else 2)
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1 and saved["history"]["diverged_at"] == 2  # History says where it diverged
    for name, value in saved["model"].items():
        assert torch.equal(value, snapshots.states[1][name]), name  # the state after epoch 1, not after the step
    model = bnvit.load_model(tmp_path / LAST)  # what docs/training.md promises
    assert all(torch.equal(v, snapshots.states[1][k]) for k, v in model.state_dict().items())
    again = bnvit.fit(tiny_model(), toy_data(64), checkpoint_dir=tmp_path, loss_fn=_LossThatBreaks(3, how), **fit_args)
    assert again.diverged_at == 2 and len(again) == 1  # a diverged run is finished: not retrained


def test_a_first_epoch_that_diverges_writes_no_checkpoint(tmp_path):
    history = bnvit.fit(tiny_model(), toy_data(64), checkpoint_dir=tmp_path, loss_fn=_LossThatBreaks(2, "grad"), **FIT)
    assert history.diverged_at == 1 and history.diverged_step == 2 and len(history) == 0
    assert list(tmp_path.iterdir()) == []  # no state the run finished finite: nothing, and no lock left
