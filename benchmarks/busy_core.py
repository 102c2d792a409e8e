"""Training on a machine with one core taken by another program: the thread policies, idle and busy.

Each configuration trains the quick run's larger model (ViTBNFFN, depth 6, lr 0.003, batch 100,
fp32 or the precision `"auto"` picks) with `fit()` on synthetic 28x28 batches, in a fresh
process, because OpenMP reads its waiting policy once, when torch loads it. The same child is
timed with the machine as it is ("idle") and with one more process spinning on a core
(`python3 -c "while True: pass"`, as another program would), in interleaved rounds, so a change
in the rest of the machine's load hits every configuration alike. A run that passes
`--cap` seconds is stopped and reported as "> cap".

    python benchmarks/busy_core.py                  # minutes; a spinning run on a busy core is stopped at --cap
    python benchmarks/busy_core.py --rounds 1 --images 300 --epochs 2 --cap 120   # as in docs/benchmarks.md
    python benchmarks/busy_core.py --all            # also GOMP_SPINCOUNT=10000 and threads = free cores

Prints one line per configuration: median seconds per training epoch (the warm-up epoch
excluded) idle and busy, busy / idle, and each against the old default idle. Writes the numbers
to `benchmarks/results/cpu-busy-core.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (environment to set, environment to remove, torch threads in the child: None = torch's default,
# "free" = the cores idle or running only niced work over 0.2 s, read from /proc/stat)
CONFIGS: dict[str, tuple[dict[str, str], tuple[str, ...], int | str | None]] = {
    "spin (old default), all cores": ({}, ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"), None),
    "OMP_WAIT_POLICY=PASSIVE, all cores": ({"OMP_WAIT_POLICY": "PASSIVE"}, ("GOMP_SPINCOUNT",), None),
    "spin, 1 thread": ({}, ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"), 1),
}
if "--all" in sys.argv:  # two more, slower to measure
    CONFIGS["GOMP_SPINCOUNT=10000, all cores"] = ({"GOMP_SPINCOUNT": "10000"}, ("OMP_WAIT_POLICY",), None)
    CONFIGS["spin, threads = free cores"] = ({}, ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"), "free")

CHILD = r"""
import json, os, statistics, sys, time
import torch  # first: OpenMP starts with exactly the environment the benchmark gave this process
threads, images, epochs = json.loads(sys.argv[1])

def cpu_times():  # per CPU: (ticks idle, waiting on disk or running niced work; all ticks)
    with open("/proc/stat") as handle:
        rows = [line.split() for line in handle if line.startswith("cpu") and line[3].isdigit()]
    return [(int(r[2]) + int(r[4]) + int(r[5]), sum(int(v) for v in r[1:9])) for r in rows]

def free_cores(sample_s=0.2):  # the cores free now, sampled over sample_s
    before = cpu_times()
    time.sleep(sample_s)
    after = cpu_times()
    free = sum(a[0] - b[0] for a, b in zip(after, before))
    total = sum(a[1] - b[1] for a, b in zip(after, before))
    return max(1, min(len(os.sched_getaffinity(0)), round(len(after) * free / max(total, 1))))

if threads == "free":
    threads = free_cores()
if threads is not None:
    torch.set_num_threads(threads)
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
history = fit(model, train, val, epochs=epochs, lr=3e-3, batch_size=100, device="cpu", seed=0, progress=False)
seconds = [r.seconds for r in history.records[1:]]
print(json.dumps({"epoch_s": statistics.median(seconds), "threads": torch.get_num_threads()}))
"""


def run_child(config: str, images: int, epochs: int, cap: float) -> dict:
    setenv, unset, threads = CONFIGS[config]
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(setenv)
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps([threads, images, epochs])],
            env=env,
            capture_output=True,
            text=True,
            timeout=cap,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return {"epoch_s": None, "wall_s": time.perf_counter() - began}
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{config}: the child failed:\n{err.stderr}") from None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": time.perf_counter() - began}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, the first a warm-up")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds after which a run is stopped")
    parser.add_argument("--out", default=str(HERE / "results" / "cpu-busy-core.json"))
    parser.add_argument("--all", action="store_true", help="also GOMP_SPINCOUNT=10000 and threads = free cores")
    args = parser.parse_args()

    runs: dict[str, dict[str, list]] = {name: {"idle": [], "busy": []} for name in CONFIGS}
    loads: list[str] = []
    for round_ in range(args.rounds):
        for condition in ("idle", "busy"):
            for name in CONFIGS:
                spinner = None
                if condition == "busy":
                    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    loads.append(loadavg())
                    result = run_child(name, args.images, args.epochs, args.cap)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                runs[name][condition].append(result)
                shown = f"{result['epoch_s']:.2f} s/epoch" if result["epoch_s"] else f"> {args.cap:.0f} s (stopped)"
                print(f"round {round_ + 1} {condition:4} {name:38} {shown}", flush=True)

    def median(name: str, condition: str) -> float | None:
        values = [r["epoch_s"] for r in runs[name][condition]]
        return None if None in values or not values else statistics.median(values)

    base = median(next(iter(CONFIGS)), "idle")
    table = {}
    print(f"\n{'configuration':38} {'idle s':>7} {'busy s':>7} {'busy/idle':>9} {'idle/old':>8} {'busy/old idle':>13}")
    for name in CONFIGS:
        idle, busy = median(name, "idle"), median(name, "busy")
        row = {
            "idle_s": idle,
            "busy_s": busy,
            "busy_over_idle": busy / idle if idle and busy else None,
            "idle_over_old_idle": idle / base if idle and base else None,
            "busy_over_old_idle": busy / base if busy and base else None,
            "threads": {c: [r.get("threads") for r in runs[name][c]] for c in ("idle", "busy")},
        }
        table[name] = row

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        print(
            f"{name:38} {fmt(idle, '7.2f')} {fmt(busy, '7.2f')} {fmt(row['busy_over_idle'], '9.2f')} "
            f"{fmt(row['idle_over_old_idle'], '8.2f')} {fmt(row['busy_over_old_idle'], '13.2f')}"
        )
    print(f"load average (1 min) before each run: {', '.join(loads)}")
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "settings": vars(args),
        "loadavg_before_each_run": loads,
        "table": table,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
