"""CPU threads that follow the free cores, so training survives a core taken by another program.

`CpuThreads` is checked here on scripted `/proc/stat` samples (the arithmetic) and once with
real spinning processes; the speed itself is measured in `benchmarks/busy_core.py`, never asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from bnvit import ViTBNFFN, fit
from bnvit._util.device import CpuThreads


def _scripted(monkeypatch, threads: CpuThreads, samples: list[tuple[float, float, float]]) -> None:
    """Feed `threads` these (wall s, busy CPU s of its cores, own CPU s) samples, one per look."""
    queue = list(samples)
    monkeypatch.setattr(threads, "_sample", lambda: queue.pop(0))


@pytest.mark.parametrize(
    "others, expected",  # cores' worth of CPU the other processes took over one second, on 2 cores
    [(0.0, 2), (0.3, 2), (0.7, 1), (1.0, 1), (2.0, 1)],
)
def test_threads_are_the_cores_others_leave(monkeypatch, others, expected):
    threads = CpuThreads("auto", most=2, every=0.0)
    threads._cpus = [0, 1]
    own = 1.0
    _scripted(monkeypatch, threads, [(0.0, 0.0, 0.0), (1.0, own + others, own)])
    with torch.no_grad(), threads:
        threads.poll()
        assert torch.get_num_threads() == expected


def test_threads_come_back_when_the_other_program_ends_and_are_restored_after(monkeypatch):
    before = torch.get_num_threads()
    threads = CpuThreads("auto", most=2, every=0.0)
    threads._cpus = [0, 1]
    # second 1: another program takes a core; second 2: it has ended, this process uses both
    _scripted(monkeypatch, threads, [(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (2.0, 4.0, 3.0)])
    with threads:
        threads.poll()
        assert torch.get_num_threads() == 1
        threads.poll()
        assert torch.get_num_threads() == 2
    assert threads.used == {1, 2}
    assert torch.get_num_threads() == before


def test_no_more_threads_than_most_and_no_look_before_every_seconds(monkeypatch):
    threads = CpuThreads("auto", most=1, every=3600.0)
    threads._cpus = [0, 1, 2, 3]
    _scripted(monkeypatch, threads, [(time.monotonic(), 0.0, 0.0)])  # a second look would fail: the queue is empty
    with threads:
        threads.poll()
        assert torch.get_num_threads() == 1


def test_without_proc_stat_nothing_changes(monkeypatch):
    threads = CpuThreads("auto", every=0.0)
    monkeypatch.setattr(threads, "_sample", lambda: None)
    with threads:
        count = torch.get_num_threads()
        threads.poll()
        assert torch.get_num_threads() == count == threads.most


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) != 2, reason="the scenario is written for a 2-core machine")
def test_a_real_spinning_program_takes_a_thread_and_gives_it_back():
    x = torch.randn(256, 256)

    def work(seconds: float, threads: CpuThreads) -> set[int]:
        seen, end = set(), time.monotonic() + seconds
        while time.monotonic() < end:
            x @ x
            threads.poll()
            seen.add(torch.get_num_threads())
        return seen

    with CpuThreads("auto", most=2, every=0.3) as threads:
        if 2 not in work(1.5, threads):
            pytest.skip("other programs hold a core already: the scenario needs a quiet machine")
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            assert 1 in work(3.0, threads)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        time.sleep(0.5)
        assert work(3.0, threads) & {2}


def _tiny_run(**kwargs):
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    return fit(
        ViTBNFFN(depth=1), (images, labels), epochs=1, lr=1e-3, batch_size=16, device="cpu", progress=False, **kwargs
    )


def test_fit_pins_the_threads_it_is_given_and_restores_them():
    before = torch.get_num_threads()
    history = _tiny_run(threads=1)
    assert history.meta["cpu_threads"] == [1]
    assert torch.get_num_threads() == before


def test_fit_auto_threads_records_the_counts_it_used():
    history = _tiny_run(threads="auto")
    assert history.meta["cpu_threads"] and set(history.meta["cpu_threads"]) <= set(
        range(1, torch.get_num_threads() + 1)
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, "all", True])
def test_fit_refuses_a_bad_thread_count(bad):
    with pytest.raises(ValueError, match=r"threads must be None, 'auto' or an int >= 1, got"):
        _tiny_run(threads=bad)
