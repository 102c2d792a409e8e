"""The article's opening experiment: a sigmoid MLP with and without BatchNorm.

DNN_d3 (3 hidden layers of 100 sigmoid units) against DNNBN_d3 (the same with a BatchNorm
before each sigmoid), 15 epochs with Adam at lr 0.01 and 0.1 on MNIST. With BatchNorm the
network converges faster, and it stays stable at lr 0.1 where the plain MLP breaks down.
Writes `results.jsonl`, `mlp.png` (accuracy and training-loss curves) and `report.md`.

The MLPs train on MNIST without augmentation by default (`--augment fast` to change).

    python examples/dnn_batchnorm.py
    python examples/dnn_batchnorm.py --quick
"""

import sys

from bnvit.experiments import Experiment, Settings, run_cli

EXPERIMENT = Experiment(
    name="dnn_batchnorm",
    description="A 3-layer sigmoid MLP with and without BatchNorm (the article's first section)",
    models=("dnn_mnist", "dnnbn_mnist"),
    grid={0.01: (3,), 0.1: (3,)},
    settings=Settings(epochs=15, augment="none", test="clean"),
    quick_settings=Settings(epochs=5, augment="none", test="clean", train_subset=10000, test_subset=2000),
    plots=("mlp",),
    claims=(4,),
)

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
