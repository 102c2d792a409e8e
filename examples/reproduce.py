"""The article's ten-seed study in one command: every cell of the three experiments, the protocol's seeds.

The ViT cells of both ViT experiments (lr 0.003 at depths 2-7, lr 0.005 at depths 1-4; the
cells `compare_depths` and `compare_lr` share are trained once) go into `--out`, the MLPs into
`<out>-mlp`, and an fp32 check of depth 4 at lr 0.005 into `<out>-fp32`. Each folder gets its
report (claims with paired-seed gaps, t-intervals and verdicts) and figures (mean ± std bands).

    python examples/reproduce.py --out docs/results/article                # resumable
    python examples/reproduce.py --out docs/results/article --parts mlp    # one part
    python examples/reproduce.py --out docs/results/article --estimate     # time only
    python examples/reproduce.py --quick                                   # minutes on a CPU

The protocol (docs/reproducing.md) fixes the seeds before any run: ten per cell for the ViTs and
the MLPs, three for the fp32 check; no seed is added because of a result.

The same as `bnvit reproduce all ...` from an installed package.
"""

import sys

from bnvit.experiments.study import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
