"""How ViT and ViTBNFFN take a higher learning rate: the article's learning-rate figure.

Each model at lr 0.003 and 0.005, depths 2, 3 and 4, 10 epochs on augmented MNIST. The
article reports that raising the learning rate hurts ViT much more than ViTBNFFN (at
depth 3: ViT from about 91% to 78%, ViTBNFFN from about 92% to 90%). Writes `results.jsonl`,
`lr_comparison.png` (one panel per model and depth) and `report.md` into `--out`.

    python examples/compare_lr.py
    python examples/compare_lr.py --quick
"""

import sys

from bnvit.experiments import Experiment, Settings, run_cli

EXPERIMENT = Experiment(
    name="compare_lr",
    description="ViT vs ViTBNFFN at two learning rates (the article's learning-rate figure)",
    models=("vit_mnist", "vitbnffn_mnist"),
    grid={0.003: (2, 3, 4), 0.005: (2, 3, 4)},
    quick_grid={0.003: (3,), 0.005: (3,)},
    quick_settings=Settings(epochs=3, train_subset=6000, test_subset=2000),
    plots=("lr",),
    claims=(3,),
)

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
