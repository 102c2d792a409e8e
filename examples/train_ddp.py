"""Train ViTBNFFN on MNIST with several processes: `fit()` under torchrun.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --epochs 1 --quick
    torchrun --standalone --nproc_per_node=4 examples/train_ddp.py --device cuda
    python examples/train_ddp.py --quick          # the same script in a single process

torchrun starts one copy of this script per process. `fit()` sees torchrun's environment and
trains with DistributedDataParallel: gloo on the CPU, nccl on GPUs (one GPU per process,
`cuda:LOCAL_RANK`), every BatchNorm synchronized across the processes so that its statistics
are those of the whole batch, as on one GPU (`--no-sync-bn` turns that off). `--batch-size`
is the global batch: with 4 processes and the default 100, each takes 25 images per step.

Only rank 0 writes into `--out`: `checkpoint/` (repeat the command to resume an interrupted
run), `log.jsonl` (one line per epoch), `history.json` and `model.pt`, a plain state dict
(`bnvit.load_model("runs/train_ddp/model.pt")`). MNIST is read from `--data-dir` (or
`$BNVIT_DATA`); it is never downloaded here, as several processes would download it at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bnvit import JSONLLogger, ViTBNFFN, fit
from bnvit.data import mnist_loaders
from bnvit.training.distributed import is_main_process, local_device

QUICK = dict(train_subset=2000, test_subset=1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train ViTBNFFN on MNIST with fit() under torchrun")
    parser.add_argument("--data-dir", help="folder with MNIST/raw/ (default: $BNVIT_DATA, else the cache folder)")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is present), cpu, cuda")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=100, help="global batch, all processes together (100)")
    parser.add_argument("--lr", type=float, default=0.003, help="Adam learning rate (default 0.003)")
    parser.add_argument("--depth", type=int, default=6, help="encoder blocks (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and augmentation")
    parser.add_argument("--no-sync-bn", action="store_true", help="per-process BatchNorm statistics")
    parser.add_argument("--out", default="runs/train_ddp", help="output folder (default runs/train_ddp)")
    parser.add_argument("--train-subset", type=int, help="train on this many images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on this many test images only")
    parser.add_argument("--test", choices=("augmented", "clean"), default="augmented", help="test images")
    parser.add_argument("--quick", action="store_true", help=f"a CPU-sized run: {QUICK}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.train_subset = args.train_subset or QUICK["train_subset"]
        args.test_subset = args.test_subset or QUICK["test_subset"]
    out = Path(args.out)
    device = local_device(args.device)  # where fit trains in this process: build the data there
    train, test = mnist_loaders(
        args.data_dir,
        batch_size=args.batch_size,
        device=device,
        test=args.test,
        seed=args.seed,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
    )
    torch.manual_seed(args.seed)
    model = ViTBNFFN(depth=args.depth)
    history = fit(
        model,
        train,
        test,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=device,
        threads="auto",  # on the CPU: follow the cores other programs leave free
        seed=args.seed,
        sync_bn=not args.no_sync_bn,
        checkpoint_dir=out / "checkpoint",
        callbacks=[JSONLLogger(out / "log.jsonl")],
        progress=not args.no_progress,
    )
    if is_main_process():
        history.to_json(out / "history.json")
        torch.save(model.state_dict(), out / "model.pt")
        print(repr(history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
