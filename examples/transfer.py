"""Does the article's effect hold in timm's own ViT? timm's LayerNorm blocks against BNFFNBlock.

timm's `VisionTransformer` at the article's scale (28x28x1, patch 7, width 64, 4 heads of width
16, MLP ratio 2, class token; `bnvit.timm.vision_transformer_bnffn`), once with timm's `Block` (`timmvitln_mnist`) and
once with `bnvit.BNFFNBlock` (`timmvitbnffn_mnist`), at depths 4 and 6 and learning rates 0.003
and 0.005, ten seeds, 10 epochs of augmented MNIST (Adam, batch 100), as the article trains.
Writes `results.jsonl`, the depth and learning-rate figures and `report.md` (each cell's gap and
the verdicts of the protocol in docs/timm-blocks.md) into `--out`, and prints the verdicts' table
that docs/timm-blocks.md shows. The results name the two models `timmvit_mnist` and
`timmvit_bnffn_mnist`, their names when the study began (`bnvit.experiments.claims.BUILT_AS`).

    python examples/transfer.py              # the study: 80 runs (CUDA when present)
    python examples/transfer.py --quick      # a smoke test: depth 4, 3 epochs on 6,000 images, 2 seeds
    python examples/transfer.py --estimate   # how long the study takes here

Rerunning the same command skips finished runs and resumes an interrupted one.
"""

import sys

from bnvit.experiments import TRANSFER, run_cli

EXPERIMENT = TRANSFER  # declared in bnvit.experiments.grid

if __name__ == "__main__":
    sys.exit(run_cli(EXPERIMENT))
