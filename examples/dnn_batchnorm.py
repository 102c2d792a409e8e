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

from bnvit.experiments import DNN_BATCHNORM, run_cli

EXPERIMENT = DNN_BATCHNORM  # declared in bnvit.experiments.grid, shared with `bnvit reproduce` and the three-seed study

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
