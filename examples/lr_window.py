"""The learning-rate window: which range of learning rates ViT and ViTBNFFN each tolerate.

Beyond the article, a cleaner test of its second claim (BatchNorm lets ViT take a higher
learning rate): both models at depths 3 and 6 over a log grid of nine learning rates from 1e-4
to 5e-2, 4 epochs on the first 10,000 training images (evaluated on 5,000 augmented test
images), 3 seeds. The report gives each model's window: the rates whose final accuracy is within
2 points of its best, and the window's width in decades of learning rate, with the seeds'
spread. Writes `results.jsonl`, `lr_window.png` and `report.md` into `--out`.

    python examples/lr_window.py --estimate
    python examples/lr_window.py --workers auto          # resumable: rerun the same command
    python examples/lr_window.py --quick                 # 5 rates at depth 3, 1 epoch on 4,000 images, 2 seeds
"""

import sys

from bnvit.experiments import LR_WINDOW, run_cli

EXPERIMENT = LR_WINDOW  # declared in bnvit.experiments.grid, shared with `bnvit reproduce lr-window`

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
