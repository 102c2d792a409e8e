"""Training on a machine with one core taken by another program: the thread policies, idle and busy.

Each configuration runs in a fresh process (OpenMP reads its waiting policy once, when torch
loads it), timed with the machine as it is ("idle"), with one more process spinning on a core
from the start (`python3 -c "while True: pass"`, as another program would: "busy"), and with
that process starting `--late` seconds into the run ("late", a program that starts later), in
interleaved rounds, so a change in the rest of the machine's load hits every configuration
alike. A run that passes `--cap` seconds is stopped and reported as "> cap".

Three workloads:

- `--quick-run` (what docs/benchmarks.md reports): the whole `python examples/compare_depths.py
  --quick` (four cells on 2,000 MNIST images; needs `BNVIT_DATA`), wall seconds;
- `--tests`: the README's default test run (`pytest -q`), wall seconds; the suite sets its own
  threads (tests/conftest.py), so only the waiting policy is varied;
- the default: `fit()` on the quick run's larger model (ViTBNFFN, depth 6, lr 0.003, batch 100)
  on synthetic batches, median seconds per epoch after a warm-up epoch.

    python benchmarks/busy_core.py --quick-run --rounds 2          # about 40 minutes on 2 cores
    python benchmarks/busy_core.py --tests --rounds 1 --cap 900    # about 15 minutes
    python benchmarks/busy_core.py --rounds 1 --images 600 --epochs 3

Prints one line per run and a table of medians: idle, busy and late, and their ratios to idle.
Writes the numbers to `benchmarks/results/cpu-busy-core[-quick-run].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORES = len(os.sched_getaffinity(0))

# name -> (environment to set, threads: "auto" = follow the free cores, bnvit's default; an int = pinned)
CONFIGS: dict[str, tuple[dict[str, str], str | int]] = {
    "threads follow the free cores (default)": ({}, "auto"),
    f"spinning, {CORES} threads pinned": ({}, CORES),
    f"OMP_WAIT_POLICY=PASSIVE, {CORES} threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, CORES),
    "spinning, 1 thread": ({}, 1),
}

EPOCHS_CHILD = r"""
import json, statistics, sys
import torch
threads, images, epochs = json.loads(sys.argv[1])
from bnvit.data import DeviceLoader
from bnvit.experiments import Cell
from bnvit.experiments.sweep import build_model
from bnvit.training import fit
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (images + 500, 28, 28), dtype=torch.uint8, generator=g)
y = torch.randint(0, 10, (images + 500,), generator=g)
train = DeviceLoader(x[:images], y[:images], batch_size=100, augment=True, device="cpu")
val = DeviceLoader(x[images:], y[images:], batch_size=500, shuffle=False, device="cpu")
model = build_model(Cell("vitbnffn_mnist", 6, 3e-3, 0))
history = fit(model, train, val, epochs=epochs, lr=3e-3, batch_size=100, device="cpu", seed=0, progress=False,
              threads=threads)
print(json.dumps({"seconds": statistics.median(r.seconds for r in history.records[1:]),
                  "threads": history.meta["cpu_threads"]}))
"""


def command(config: str, args: argparse.Namespace, out: str) -> list[str]:
    threads = CONFIGS[config][1]
    if args.tests:
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", out + "/pytest"]
    if args.quick_run:
        pinned = [] if threads == "auto" else ["--threads", str(threads)]
        return [
            sys.executable,
            str(ROOT / "examples" / "compare_depths.py"),
            "--quick",
            "--no-progress",
            "--out",
            out,
            *pinned,
        ]
    return [sys.executable, "-c", EPOCHS_CHILD, json.dumps([threads, args.images, args.epochs])]


def run(config: str, condition: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(CONFIGS[config][0])
    spinner = None
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        child = subprocess.Popen(
            command(config, args, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            if condition != "idle":
                time.sleep(args.late if condition == "late" else 0.0)
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            stdout, stderr = child.communicate(timeout=max(1.0, args.cap - (time.perf_counter() - began)))
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return {"seconds": None, "wall_s": time.perf_counter() - began}
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    wall = time.perf_counter() - began
    if child.returncode:
        raise SystemExit(f"{config}: the child failed:\n{stderr[-3000:]}")
    if args.quick_run or args.tests:
        return {"seconds": wall, "wall_s": wall}
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick-run", action="store_true", help="time the whole quick run (needs BNVIT_DATA)")
    parser.add_argument("--tests", action="store_true", help="time the default test run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="training images per epoch (fit() workload)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, the first a warm-up (fit() workload)")
    parser.add_argument(
        "--late", type=float, default=15.0, help="seconds into the run at which the 'late' program starts"
    )
    parser.add_argument("--cap", type=float, default=200.0, help="seconds after which a run is stopped")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/cpu-busy-core[-quick-run].json)")
    args = parser.parse_args()
    workload = "-quick-run" if args.quick_run else "-tests" if args.tests else ""
    out = Path(args.out or HERE / "results" / f"cpu-busy-core{workload}.json")
    conditions = ("idle", "busy") if args.tests else ("idle", "busy", "late")
    if args.tests:  # the suite sets its threads itself (tests/conftest.py): only the waiting policy varies
        for name in [n for n, (env, threads) in CONFIGS.items() if threads != "auto" and not env]:
            del CONFIGS[name]

    runs: dict[str, dict[str, list]] = {name: {c: [] for c in conditions} for name in CONFIGS}
    loads: list[str] = []
    for round_ in range(args.rounds):
        for condition in conditions:
            for name in CONFIGS:
                loads.append(loadavg())
                result = run(name, condition, args)
                runs[name][condition].append(result)
                shown = f"{result['seconds']:.2f} s" if result["seconds"] else f"> {args.cap:.0f} s (stopped)"
                print(f"round {round_ + 1} {condition:4} {name:42} {shown}  {result.get('threads', '')}", flush=True)

    def median(name: str, condition: str) -> float | None:
        values = [r["seconds"] for r in runs[name][condition]]
        return None if None in values or not values else statistics.median(values)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    unit = "s" if args.quick_run or args.tests else "s/epoch"
    base = median(next(iter(CONFIGS)), "idle")
    table = {}
    print(f"\nmedians of {args.rounds} rounds, {unit}")
    columns = ("idle", "busy", "late", "busy/idle", "late/idle", "idle/default")
    print(f"{'configuration':42} " + " ".join(f"{c:>12}" for c in columns))
    for name in CONFIGS:
        row = {c: median(name, c) for c in conditions}
        idle = row["idle"]
        for c in conditions[1:]:
            row[f"{c}_over_idle"] = row[c] / idle if idle and row[c] else None
        row["idle_over_default_idle"] = idle / base if idle and base else None
        table[name] = row
        values = (idle, row["busy"], row.get("late"), row["busy_over_idle"], row.get("late_over_idle"))
        print(f"{name:42} " + " ".join(fmt(v, "12.2f") for v in (*values, row["idle_over_default_idle"])))
    print(f"load average (1 min) before each run: {', '.join(loads)}")
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "workload": {"-quick-run": "the quick run, wall seconds", "-tests": "the default test run, wall seconds"}.get(
            workload, "fit() epochs, median seconds per epoch"
        ),
        "settings": vars(args),
        "loadavg_before_each_run": loads,
        "table": table,
        "runs": runs,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
