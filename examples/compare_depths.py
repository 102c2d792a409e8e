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

from bnvit.experiments import Experiment, Settings, run_cli

EXPERIMENT = Experiment(
    name="compare_depths",
    description="ViT vs ViTBNFFN at several depths (the article's depth figures)",
    models=("vit_mnist", "vitbnffn_mnist"),
    grid={0.003: (4, 5, 6, 7), 0.005: (1, 2, 3, 4)},
    quick_grid={0.003: (6,), 0.005: (3,)},
    quick_settings=Settings(epochs=3, train_subset=6000, test_subset=2000),
    plots=("depths",),
    claims=(1, 2),
)

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
