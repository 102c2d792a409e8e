"""How ViT and ViTBNFFN take a higher learning rate: the article's learning-rate figure.

Each model at lr 0.003 and 0.005, depths 2, 3 and 4, 10 epochs on augmented MNIST. The
article reports that raising the learning rate hurts ViT much more than ViTBNFFN (at
depth 3: ViT from about 91% to 78%, ViTBNFFN from about 92% to 90%). Writes `results.jsonl`,
`lr_comparison.png` (one panel per model and depth) and `report.md` into `--out`.

    python examples/compare_lr.py
    python examples/compare_lr.py --quick
"""

import sys

from bnvit.experiments import COMPARE_LR, run_cli

EXPERIMENT = COMPARE_LR  # declared in bnvit.experiments.grid, shared with `bnvit reproduce` and the three-seed study

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
