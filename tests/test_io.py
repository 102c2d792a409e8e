"""Files bnvit writes: atomic, with the process's umask; checkpoints whose damage is detected before use."""

from __future__ import annotations

import ast
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import bnvit
from bnvit._util import io as _io
from bnvit.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint
from bnvit.training.history import EpochRecord, History
from toys import tiny_model

SRC = Path(bnvit.__file__).parent


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_every_writer_creates_files_with_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    history = History(meta={"lr": 1e-3})
    history.append(EpochRecord(1, 0.5, 0.9, 0.4, 0.9, 1e-3, 1.0, 100.0))
    writers = {
        "text.txt": lambda p: _io.atomic_write_text(p, "a\n"),
        "tensor.pt": lambda p: _io.atomic_torch_save({"x": torch.zeros(2)}, p),
        "lines.jsonl": lambda p: _io.append_line_atomic(p, "{}"),
        "history.json": lambda p: history.to_json(p),
        "history.csv": lambda p: history.to_csv(p),
        "checkpoint": lambda p: save_checkpoint(p, {"epoch": 1, "w": torch.ones(3)}),
    }
    for name, write in writers.items():
        path = tmp_path / name
        write(path)
        written = path / LAST if name == "checkpoint" else path
        assert mode(written) == expected, (name, oct(mode(written)))
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    _io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), _io.atomic_open(path) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_there_is_one_atomic_write_core():
    """Only `_util.io.atomic_path` renames a temporary over a file; nothing else makes temporary files to write."""
    for path in SRC.rglob("*.py"):
        calls = {
            node.func.attr
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        if path != SRC / "_util" / "io.py":
            assert "NamedTemporaryFile" not in calls, path
    assert "os.replace(tmp, path)" in (SRC / "_util" / "io.py").read_text()
    sets = (SRC / "data" / "sets.py").read_text()
    assert "from .._util.io import" in sets and "tempfile" not in sets


# ----------------------------------------------------------------------------- verify_checkpoint_file


def flipped(source: Path, target: Path, offset: int) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("where", [0.02, 0.25, 0.5, 0.75, 0.98])
def test_flipped_bytes_in_a_reference_checkpoint_are_detected(reference_checkpoints, tmp_path, where):
    original = reference_checkpoints / "VITBNFFN_d5_15.pth"
    copy = tmp_path / "copy.pth"
    shutil.copyfile(original, copy)  # never modify the original
    _io.verify_checkpoint_file(copy)  # intact: passes
    bad = flipped(copy, tmp_path / "bad.pth", int(where * copy.stat().st_size))
    with pytest.raises(ValueError, match=r"bad\.pth") as info:
        _io.verify_checkpoint_file(bad)
    assert "\n" not in str(info.value)


def test_flipped_bytes_at_the_end_of_the_zip_are_detected(reference_checkpoints, tmp_path):
    copy = tmp_path / "copy.pth"
    shutil.copyfile(reference_checkpoints / "VITBNFFN_d5_15.pth", copy)
    # The signature of the end-of-central-directory record. Its other fields repeat the zip64 record's
    # (torch writes zip64): flipping them changes nothing torch or zipfile reads, so there is nothing to detect.
    for offset in (-22, -21, -19):
        bad = flipped(copy, tmp_path / f"bad{-offset}.pth", copy.stat().st_size + offset)
        with pytest.raises(ValueError, match=rf"bad{-offset}\.pth"):
            _io.verify_checkpoint_file(bad)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt is empty \(0 bytes\)"):
        _io.verify_checkpoint_file(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError):
        _io.verify_checkpoint_file(tmp_path / "nothing.pt")


def test_tensors_sha256_covers_values_names_and_shapes():
    state = {"a": torch.arange(6.0), "b": {"c": torch.ones(2, dtype=torch.int64)}}
    digest = _io.tensors_sha256(state)
    assert digest == _io.tensors_sha256({"b": {"c": torch.ones(2, dtype=torch.int64)}, "a": torch.arange(6.0)})
    assert digest != _io.tensors_sha256({**state, "a": torch.arange(6.0).reshape(2, 3)})
    changed = torch.arange(6.0)
    changed[3] = 3.0000002
    assert digest != _io.tensors_sha256({**state, "a": changed})


# ----------------------------------------------------------------------------- the training checkpoint loader


def test_training_checkpoints_carry_a_checksum_that_is_verified(tmp_path):
    bnvit.fit(tiny_model(), _toy(), epochs=2, lr=1e-3, batch_size=16, device="cpu", seed=0, progress=False,
              checkpoint_dir=tmp_path)  # fmt: skip
    raw = torch.load(tmp_path / LAST, weights_only=True)
    assert len(raw["sha256"]) == 64
    # Rewrite last.pt with one weight changed but the old checksum: a valid zip, wrong tensors.
    raw["model"][next(iter(raw["model"]))].view(-1)[0] += 1.0
    torch.save(raw, tmp_path / LAST)
    with pytest.warns(RuntimeWarning, match=r"ignoring damaged checkpoint .*last\.pt: its tensors fail their SHA-256"):
        saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1  # previous.pt instead


def test_a_flipped_byte_in_last_falls_back_to_previous(tmp_path):
    bnvit.fit(tiny_model(), _toy(), epochs=2, lr=1e-3, batch_size=16, device="cpu", seed=0, progress=False,
              checkpoint_dir=tmp_path)  # fmt: skip
    last = tmp_path / LAST
    flipped(last, last, last.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match=r"ignoring damaged checkpoint .*last\.pt: damaged: its member .* CRC-32"):
        assert load_checkpoint(tmp_path)["epoch"] == 1


def _toy():
    from toys import toy_data

    return toy_data(32)


@pytest.mark.parametrize(
    "kind, content, reason",
    [
        ("empty", b"", r"empty \(0 bytes\): not a checkpoint$"),
        ("text", b"hello, this is a text file\n", r"neither torch's zip format nor a pickle"),
        ("random", bytes(range(7, 255)) * 8, r"neither torch's zip format nor a pickle|damaged|Error"),
    ],
)
def test_unreadable_files_give_one_clear_line(tmp_path, kind, content, reason):
    (tmp_path / PREVIOUS).write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_checkpoint(tmp_path) is None
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"ignoring damaged checkpoint {tmp_path / PREVIOUS}: ")
    assert "\n" not in message and not message.endswith(": ")
    assert __import__("re").search(reason, message), message


def test_a_pickled_whole_model_is_refused_without_advising_weights_only_false(tmp_path):
    torch.save(tiny_model(), tmp_path / LAST)  # a whole module, not a state dict
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"refusing {tmp_path / LAST}: it asks to import the Python object ")
    assert "weights_only" not in message and "\n" not in message
    assert info.value.__cause__ is None  # torch's advice is not chained either


# ----------------------------------------------------------------------------- the folder lock


def _stale_record(pid: int) -> str:
    """What a lock file holds after its process was SIGKILLed: a record of a process the kernel no longer locks for."""
    host = socket.gethostname()
    return json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00+00:00", "command": "train"})


def _racer(folder: str, barrier, inside, most, wins, trials: int) -> None:
    """One racing process: at each trial, try to take the lock once and, if it got in, hold it until all have tried."""
    for _ in range(trials):
        barrier.wait()  # go
        lock = _LOCK[0](folder, "fit.lock", "racing")
        try:
            lock.acquire()
            got_in = True
        except _LOCK[1]:
            got_in = False
        if got_in:
            with inside.get_lock():
                inside.value += 1
                most.value = max(most.value, inside.value)
                wins.value += 1
        barrier.wait()  # everyone has tried
        if got_in:
            with inside.get_lock():
                inside.value -= 1
            lock.release()
        barrier.wait()  # everyone is out: the parent lays the next stale lock


_LOCK: list = [_io.FolderLock, _io.FolderLockedError]  # the lock under test (another one can be raced too)


def race_for_a_stale_lock(folder: Path, trials: int, processes: int = 4) -> tuple[int, int]:
    """`processes` forked processes race `trials` times for a lock file left by a dead process (as after a SIGKILL).

    Returns the most holders at once and the number of wins (one per trial if the lock is a lock).
    """
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes + 1, timeout=60)
    inside, most, wins = context.Value("i", 0), context.Value("i", 0), context.Value("i", 0)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no running process
    racers = [
        context.Process(target=_racer, args=(str(folder), barrier, inside, most, wins, trials))
        for _ in range(processes)
    ]
    for racer in racers:
        racer.start()
    try:
        for _ in range(trials):
            (folder / "fit.lock").write_text(_stale_record(dead.pid))
            for _ in range(3):
                barrier.wait()
    finally:
        for racer in racers:
            racer.join(timeout=60)
    assert all(racer.exitcode == 0 for racer in racers)
    return most.value, wins.value


def test_four_processes_racing_400_times_for_a_stale_lock_never_hold_it_together(tmp_path):
    most, wins = race_for_a_stale_lock(tmp_path, trials=400)
    assert (most, wins) == (1, 400)  # exactly one holder in each trial: a stale file is no lock, and no double hold


def test_a_lock_file_naming_this_very_pid_and_host_is_no_lock(tmp_path):
    """A container restarted after a SIGKILL gets the same pid and host: the record left behind names the new
    process itself. Only the kernel's lock counts, and nobody holds that."""
    (tmp_path / "fit.lock").write_text(_stale_record(os.getpid()))
    with _io.FolderLock(tmp_path, "fit.lock", "training"):
        record = json.loads((tmp_path / "fit.lock").read_text())
        assert record["pid"] == os.getpid() and record["thread"] == threading.current_thread().name
    assert not (tmp_path / "fit.lock").exists()


def test_a_second_thread_or_a_second_lock_of_this_process_is_refused_naming_the_folder_and_holder(tmp_path):
    lock = _io.FolderLock(tmp_path, "fit.lock", "training runs there")
    errors: list[BaseException] = []

    def other() -> None:
        try:
            _io.FolderLock(tmp_path, "fit.lock", "training runs there").acquire()
        except BaseException as err:
            errors.append(err)

    with lock:
        thread = threading.Thread(target=other, name="second")
        thread.start()
        thread.join()
        with pytest.raises(_io.FolderLockedError) as same_thread:
            lock.acquire()  # not re-entrant either
    assert len(errors) == 1 and isinstance(errors[0], _io.FolderLockedError)
    for message in (str(errors[0]), str(same_thread.value)):
        assert message.startswith(f"{tmp_path.resolve()} is in use: training runs there (pid {os.getpid()} on ")
        assert f"thread '{threading.current_thread().name}' of this process" in message and "\n" not in message
    with _io.FolderLock(tmp_path, "fit.lock", "training"):  # released: free again
        pass


def _hold_until_killed(folder: str, locked) -> None:
    _io.FolderLock(folder, "fit.lock", "training").acquire()
    locked.set()
    time.sleep(120)


def test_a_sigkilled_holder_leaves_a_lock_file_that_is_no_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    locked = context.Event()
    holder = context.Process(target=_hold_until_killed, args=(str(tmp_path), locked))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(_io.FolderLockedError, match=rf"is in use: training \(pid {holder.pid} on "):
            _io.FolderLock(tmp_path, "fit.lock", "training").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert json.loads((tmp_path / "fit.lock").read_text())["pid"] == holder.pid  # the file stays: it does not matter
    with _io.FolderLock(tmp_path, "fit.lock", "training"):
        pass


def _hold_with_a_child_then_wait(folder: str, locked, child_pid) -> None:
    _io.FolderLock(folder, "fit.lock", "training").acquire()
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))  # a data-loading worker, say
    child.start()
    child_pid.value = child.pid
    locked.set()
    time.sleep(120)


def test_a_forked_child_outliving_the_holder_does_not_keep_its_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    locked, child_pid = context.Event(), context.Value("i", 0)
    holder = context.Process(target=_hold_with_a_child_then_wait, args=(str(tmp_path), locked, child_pid))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(_io.FolderLockedError):
            _io.FolderLock(tmp_path, "fit.lock", "training").acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
        os.kill(child_pid.value, 0)  # the child still runs
        with _io.FolderLock(tmp_path, "fit.lock", "training"):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid.value, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGKILL)


def test_a_lock_file_that_cannot_be_written_still_locks(tmp_path, monkeypatch):
    """Another user's lock file: opening it for writing is refused (simulated, so that it is refused to root
    too), and the OS lock needs only read access, so the folder still locks."""
    lock_file = tmp_path / "fit.lock"
    lock_file.write_text(_stale_record(1))
    real_open, refused = os.open, []

    def no_write_access(path, flags, *args):
        if Path(path) == lock_file and flags & os.O_RDWR:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_io.os, "open", no_write_access)
    holder, other = _io.FolderLock(tmp_path, "fit.lock", "training"), _io.FolderLock(tmp_path, "fit.lock", "training")
    with holder, pytest.raises(_io.FolderLockedError, match="pid 1 on"):  # its record could not be rewritten
        other.acquire()
    assert refused and not lock_file.exists()  # the folder is writable: released, removed
