"""ViT vs ViTBNFFN at several depths: the article's two depth figures.

At lr 0.003 the article compares depths 4, 5, 6 and 7; at lr 0.005 depths 1, 2, 3 and 4; each
model trains for 10 epochs on augmented MNIST (Adam, batch 100) and is scored on the
augmented test set after every epoch. Writes `results.jsonl`, one figure per learning rate
(`depths_lr0.003.png`, `depths_lr0.005.png`) and `report.md` into `--out`.

    python examples/compare_depths.py             # the article's sweep (CUDA when present)
    python examples/compare_depths.py --quick     # a few minutes on a laptop CPU
    python examples/compare_depths.py --seeds 3   # how much of each gap is noise

Rerunning the same command skips finished runs and resumes an interrupted one.
"""

import sys

from bnvit.experiments import COMPARE_DEPTHS, run_cli

EXPERIMENT = COMPARE_DEPTHS  # declared in experiments.grid, shared with `bnvit reproduce` and the three-seed study

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
