"""Start-up of the `bnvit` command: wall time and peak memory of `bnvit --help` and `bnvit predict one.png`.

Every command runs in a fresh process, as a user runs it, launched the way the console script
launches it (`from _bnvit_cli import main; sys.exit(main())`); this process imports nothing
heavy itself. The commands are interleaved round by round (A, B, C, A, B, C, ...), so a change
in the machine's load hits all of them alike, and each is reported as the median of its rounds
after one warm-up round (which fills the file cache). Peak memory is the process's maximum
resident set size, from `wait4` in a small launcher process (on Linux a child's peak starts from
its parent's at the fork). Ratios are taken between medians of the same run:

- `bnvit --help` against a bare `python -c pass`, and against the same help reached through the
  package (`from bnvit.app.cli import main`: what the entry point cost when it lived in the package);
- `bnvit predict one.png` against `python -c "import torch, timm"`: how much predict adds to the
  imports it cannot avoid (`import bnvit` registers the models in timm, and timm imports torch
  and torchvision).

    python benchmarks/cli_startup.py                        # 7 rounds, docs/images/seven.png
    python benchmarks/cli_startup.py --repeats 2 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONT = "import sys; from _bnvit_cli import main; sys.exit(main())"  # what the console script runs
THROUGH_PACKAGE = "import sys; from bnvit.app.cli import main; sys.exit(main())"


def commands(image: Path) -> dict[str, list[str]]:
    """The commands timed, by name: each a full argv for a fresh Python process."""
    python = sys.executable
    return {
        "python -c pass": [python, "-c", "pass"],
        "bnvit --help": [python, "-c", FRONT, "--help"],
        "bnvit --help, entry point inside the package": [python, "-c", THROUGH_PACKAGE, "--help"],
        "import torch, timm": [python, "-c", "import torch, timm"],
        "bnvit predict one.png": [python, "-c", FRONT, "predict", str(image)],
    }


# Started by a small launcher process: on Linux a child's peak memory (ru_maxrss) starts from its parent's
# at the fork, so a parent that has imported torch (a test, say) would add its gigabyte to every child's peak.
LAUNCHER = """
import json, os, sys, time
argv, errors = json.loads(sys.argv[1]), sys.argv[2]
actions = [
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    (os.POSIX_SPAWN_OPEN, 2, errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
]
began = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - began, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one run of `argv` in a fresh process; raises if it fails."""
    with tempfile.TemporaryDirectory() as folder:
        errors = Path(folder) / "stderr"
        done = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, json.dumps(argv), str(errors)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, peak_kb, code = json.loads(done.stdout)
        if code != 0:
            message = errors.read_text(errors="replace").strip()[-500:]
            raise RuntimeError(f"{' '.join(argv)} exited with {code}: {message}")
    return seconds, peak_kb / 1024  # ru_maxrss is in KB on Linux


def measure(repeats: int, image: Path, threads: int | None) -> dict:
    """Median wall time and peak memory of each command over `repeats` interleaved rounds (after a warm-up)."""
    env_threads = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    os.environ.update(env_threads)
    timed = commands(image)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in timed}
    for round_ in range(repeats + 1):
        for name, argv in timed.items():
            result = run_once(argv)
            if round_:  # round 0 warms the file cache
                rounds[name].append(result)
    rows = {
        name: {
            "seconds": statistics.median(s for s, _ in values),
            "min_seconds": min(s for s, _ in values),
            "peak_mb": statistics.median(m for _, m in values),
        }
        for name, values in rounds.items()
    }
    ratios = {
        "bnvit --help / python -c pass": _ratio(rows, "bnvit --help", "python -c pass"),
        "help through the package / bnvit --help": _ratio(
            rows, "bnvit --help, entry point inside the package", "bnvit --help"
        ),
        "bnvit predict one.png / import torch, timm": _ratio(rows, "bnvit predict one.png", "import torch, timm"),
    }
    return {
        "commands": rows,
        "ratios": ratios,
        "repeats": repeats,
        "image": str(image),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "threads": threads,
    }


def _ratio(rows: dict, a: str, b: str) -> dict[str, float]:
    return {
        "time": rows[a]["seconds"] / rows[b]["seconds"],
        "peak_memory": rows[a]["peak_mb"] / rows[b]["peak_mb"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per command (median; default 7)")
    parser.add_argument("--image", type=Path, default=ROOT / "docs" / "images" / "seven.png", help="the picture")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the commands (default: unset)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: use 1 or more")
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    result = measure(args.repeats, args.image, args.threads)
    width = max(map(len, result["commands"]))
    print(f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'peak MB':>8}")
    for name, row in result["commands"].items():
        print(f"{name:<{width}}  {row['seconds']:>9.3f}  {row['min_seconds']:>7.3f}  {row['peak_mb']:>8.0f}")
    print()
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio['time']:.2f}x the time, {ratio['peak_memory']:.2f}x the peak memory")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
