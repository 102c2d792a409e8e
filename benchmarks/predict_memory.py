"""Peak memory of `bnvit predict` on 1 file and on many: it must not grow with the number of files.

Writes N small PNG digits (MNIST test images when `BNVIT_DATA` has them, else drawn strokes) to
a temporary folder, then runs `bnvit predict` in a fresh Python process per case and reads that
process's peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after the command
returns: one file, then all N with the default batch size, then all N in one batch
(`--batch-size N`, what the command did before it streamed). Prints a table and JSON; docs/benchmarks.md
states what it measured.

    python benchmarks/predict_memory.py --files 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

_CHILD = """
import resource, sys
import _bnvit_cli
status = _bnvit_cli.main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, status, file=sys.stderr)
"""


def _digits(folder: Path, count: int) -> list[str]:
    try:
        from bnvit.data import load_mnist

        images = load_mnist(None, train=False)[0][:count].numpy()
    except (FileNotFoundError, ValueError):
        images = []
    paths = []
    for i in range(count):
        if i < len(images):
            image = Image.fromarray(images[i])
        else:
            image = Image.new("L", (64, 64), 255)
            ImageDraw.Draw(image).line([(32, 8), (30 + i % 5, 56)], fill=0, width=6)
        paths.append(str(folder / f"{i:05d}.png"))
        image.save(paths[-1])
    return paths


def peak_mb(paths: list[str], *flags: str) -> tuple[float, int]:
    """Peak resident memory (MB) of one `bnvit predict` process on `paths`, and its exit status."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "predict", *paths, "--top-k", "1", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    rss_kb, status = done.stderr.strip().splitlines()[-1].split()
    return int(rss_kb) / 1024, int(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = _digits(Path(folder), args.files)
        rows = {
            "1 file": peak_mb(paths[:1]),
            f"{args.files} files (default batch)": peak_mb(paths),
            f"{args.files} files in one batch": peak_mb(paths, "--batch-size", str(args.files)),
        }
    one = rows["1 file"][0]
    for name, (mb, status) in rows.items():
        print(f"{name:<32} peak {mb:8.1f} MB  (+{mb - one:7.1f} MB over one file)  exit {status}")
    print(json.dumps({name: dict(peak_mb=round(mb, 1), exit=status) for name, (mb, status) in rows.items()}))


if __name__ == "__main__":
    main()
