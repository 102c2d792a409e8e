"""Several cells at once: worker processes on this machine, or Ray tasks on a cluster.

Only the driver writes `results.jsonl`; a worker sends its cell's line back. A failed cell is
recorded in `failures.jsonl` and tried once more, then named in a `SweepError` after the rest
(docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from .._util.io import append_line_atomic

__all__ = ["FAILURES", "SweepError", "available_cores", "check_ray", "check_workers", "run_jobs"]

FAILURES = "failures.jsonl"
RAY_TIMEOUT_S = 5.0
"""How long `check_ray` waits for a cluster's address to answer."""


class SweepError(RuntimeError):
    """Some cells failed twice (their worker raised or died); the others are recorded."""


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_workers(workers: int | str, cores: int | None = None) -> None:
    """Refuse a number of local workers this machine cannot run (`"auto"` is always fine)."""
    if workers == "auto":
        return
    cores = available_cores() if cores is None else cores
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"--workers {workers}: use a number of worker processes from 1 to {cores}, or auto")
    if workers > cores:
        raise ValueError(
            f"--workers {workers}: this machine has {cores} CPU cores, and each worker needs one; "
            f"use 1 to {cores} (or auto)"
        )


def check_ray(address: str | None, timeout: float | None = None) -> None:
    """Refuse `--ray` when Ray is not installed, or the cluster's address does not answer.

    `address`: `"local"`, `"auto"` or `HOST:PORT` / `ray://HOST:PORT`, which must accept a TCP
    connection within `timeout` seconds (default `RAY_TIMEOUT_S`).
    """
    timeout = RAY_TIMEOUT_S if timeout is None else timeout
    try:
        import ray  # noqa: F401  deferred: Ray is optional (bnvit[ray]) and slow to import
    except ImportError:
        raise ValueError("--ray needs Ray, which is not installed here: pip install 'bnvit[ray]'") from None
    if address in (None, "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: expected HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT, auto or nothing")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else err.strerror or type(err).__name__
        raise ValueError(
            f"--ray {address}: no Ray cluster answers there ({why} within {timeout:g} s); "
            "start one with `ray start --head` or check the address"
        ) from None


# ----------------------------------------------------------------------------- the driver's loop


def run_jobs(
    jobs: Sequence[Any],
    backend: Any,
    run: Callable[[Any], str],
    out: Path,
    *,
    key: Callable[[Any], str],
    done: Callable[[Any, str], None],
    log: Callable[[str], object],
    retries: int = 1,
) -> None:
    """Run `run(job)` for every job on `backend`; `done(job, line)` for each result, as it arrives.

    A failed attempt is logged, recorded in `out/failures.jsonl` and retried `retries` times;
    jobs that still fail raise `SweepError` after all the others are done.
    """
    pending, running, attempts, failed = deque(jobs), {}, Counter(), []
    try:
        while pending or running:
            while pending and len(running) < backend.slots:
                job = pending.popleft()
                attempts[key(job)] += 1
                retry = f" (attempt {attempts[key(job)]})" if attempts[key(job)] > 1 else ""
                running[backend.submit(run, job)] = job
                log(f"started {key(job)}{retry}")
            for handle, ok, payload in backend.wait(list(running)):
                job = running.pop(handle)
                if ok:
                    done(job, payload)
                    continue
                name, summary = key(job), payload.strip().splitlines()[-1] if payload.strip() else "no message"
                record = dict(key=name, attempt=attempts[name], error=payload, at=_now(), backend=backend.name)
                append_line_atomic(out / FAILURES, json.dumps(record))
                if attempts[name] <= retries:
                    log(f"FAILED {name} ({summary}); trying it once more")
                    pending.append(job)
                else:
                    log(f"FAILED {name} again ({summary}); see {out / FAILURES}")
                    failed.append(f"{name} ({summary})")
    finally:
        backend.close()
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(jobs)} cells failed twice: {'; '.join(failed)}; the others are recorded, and "
            f"running the same command again retries only these (details in {out / FAILURES})"
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- local worker processes


def _exit_with_parent(parent: int) -> None:
    """Stop this worker when its parent is gone (e.g. SIGKILLed): no orphan keeps training into the folder."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # not an Exception: the cell is not reported as failed, the process just ends


def _worker(run: Callable[[Any], str], conn, parent: int) -> None:
    """A worker process: `run` each job the driver sends, send back its line or its traceback, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver ends the workers
    signal.signal(signal.SIGTERM, _exit_cleanly)  # ... with SIGTERM, after which Python cleans up as usual
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the driver is done with this worker
            return
        try:
            conn.send((True, run(job)))
        except Exception:  # anything a cell raises is the driver's to record
            conn.send((False, traceback.format_exc()))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"the worker process was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"the worker process exited with status {code} before sending its result"


class LocalProcesses:
    """`slots` spawned worker processes, kept between cells; worker `i` trains on `devices[i % len(devices)]`."""

    name = "local processes"

    def __init__(self, slots: int, devices: Iterable[str]) -> None:
        self.slots = slots
        self.devices = list(devices)
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[tuple[Any, Any, str]] = []  # (process, connection, device)
        self._busy: dict[Any, tuple[Any, str]] = {}  # connection -> (process, device)

    def _start(self, run: Callable[[Any], str]) -> tuple[Any, Any, str]:
        used = Counter(device for _, device in self._busy.values()) + Counter(d for _, _, d in self._idle)
        device = min(self.devices, key=lambda d: used[d])  # the device with the fewest workers
        conn, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(run, theirs, os.getpid()), daemon=True)
        process.start()
        theirs.close()  # only the worker holds its end: its exit makes ours see EOF
        return process, conn, device

    def submit(self, run: Callable[[Any], str], job: Any) -> Any:
        process, conn, device = self._idle.pop() if self._idle else self._start(run)
        conn.send(dataclasses.replace(job, device=device))
        self._busy[conn] = (process, device)
        return conn

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, bool, str]]:
        finished = []
        for conn in wait_for(handles):
            process, device = self._busy.pop(conn)
            try:
                ok, payload = conn.recv()
                self._idle.append((process, conn, device))
            except (EOFError, OSError):
                process.join()
                conn.close()
                ok, payload = False, _exit_reason(process.exitcode)
            finished.append((conn, ok, payload))
        return finished

    def close(self) -> None:
        for process, conn, _ in self._idle:
            conn.close()  # the worker sees EOF and returns
            process.join(timeout=30)
        for process, _ in self._busy.values():
            process.terminate()  # a cell cut short resumes from its last checkpoint next time
            process.join()
        for process, _, _ in self._idle:
            if process.is_alive():
                process.terminate()
        self._idle.clear()
        self._busy.clear()


# ----------------------------------------------------------------------------- Ray tasks


class RayTasks:
    """Every cell a Ray task asking for `cpus` CPUs and `gpus` GPUs; Ray places them on the cluster."""

    name = "ray"

    def __init__(self, address: str | None, cpus: float, gpus: float, slots: int) -> None:
        import ray  # deferred: Ray is optional (bnvit[ray]) and slow to import

        self.ray = ray
        self.slots = slots
        self._started = not ray.is_initialized()
        if self._started:
            where = None if address in (None, "local") else address
            ray.init(address=where, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        self._remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_task)

    def submit(self, run: Callable[[Any], str], job: Any) -> Any:
        return self._remote.remote(run, job)

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, bool, str]]:
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        finished = []
        for ref in ready:
            try:
                finished.append((ref, True, self.ray.get(ref)))
            except self.ray.exceptions.RayError as err:  # the task raised, or its worker or node died
                finished.append((ref, False, str(err)))
        return finished

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def _ray_task(run: Callable[[Any], str], job: Any) -> str:
    return run(job)
