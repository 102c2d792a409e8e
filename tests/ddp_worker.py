"""One process of the multi-process tests in `test_distributed.py`.

`test_distributed.launch` starts one copy per rank with torchrun's environment (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so `fit(distributed="auto")` finds
it exactly as under torchrun. Each scenario writes what it measured into the output folder,
one file per rank; the tests compare the files with each other and with single-process runs.

    python tests/ddp_worker.py OUT SCENARIO [ARGS...]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from toys import tiny_model, toy_data

EQUIVALENCE = dict(
    epochs=3, lr=1e-3, batch_size=100, optimizer="adam", device="cpu", precision="fp32", seed=0, progress=False
)
RESUMABLE = dict(epochs=4, lr=3e-3, batch_size=32, device="cpu", seed=0)


def float64_loader(n: int = 200) -> DataLoader:
    """Unshuffled float64 batches of 100: fit re-creates it with a DistributedSampler under DDP."""
    images, labels = toy_data(n)
    return DataLoader(TensorDataset(images.double(), labels), batch_size=100, shuffle=False)


def metrics(history) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k not in ("seconds", "images_per_sec")} for r in history.records]


def batchnorm_types(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)})


# ----------------------------------------------------------------------------- scenarios


def equivalence(out: Path, rank: int) -> None:
    """The runs `test_syncbn_*` compare with a single process holding the whole batch."""
    from bnvit import fit

    results = {}
    for norm in ("bn_ffn", "bn"):
        for sync_bn in (True, False):
            model = tiny_model(norm, dtype=torch.float64)
            history = fit(model, float64_loader(), sync_bn=sync_bn, **EQUIVALENCE)
            results[f"{norm}-{sync_bn}-float64"] = (metrics(history), model.state_dict(), batchnorm_types(model))
    model = tiny_model("bn_ffn")
    history = fit(model, toy_data(200), **EQUIVALENCE)
    results["bn_ffn-True-float32"] = (metrics(history), model.state_dict(), batchnorm_types(model))
    torch.save(results, out / f"equivalence-rank{rank}.pt")


def checkpoints(out: Path, rank: int) -> None:
    """A full run with a logger and progress, a run stopped by a callback, its resumption."""
    from bnvit import JSONLLogger, fit
    from bnvit.training import checkpoint as train_module
    from bnvit.training.callbacks import Callback

    saved_epochs: list[int] = []
    save = train_module._save

    def spy(folder, epoch, *args, **kwargs):
        saved_epochs.append(epoch)
        return save(folder, epoch, *args, **kwargs)

    train_module._save = spy

    class StopAfterTwo(Callback):
        def on_epoch_end(self, state, record):
            state.stop = record.epoch == 2

    data = toy_data(96)
    logger = JSONLLogger(out / f"log-rank{rank}.jsonl")
    model = tiny_model()
    full = fit(model, data, data, checkpoint_dir=out / "full", callbacks=[logger], progress=True, **RESUMABLE)
    full_saves = list(saved_epochs)
    stopped = fit(tiny_model(), data, data, checkpoint_dir=out / "resumed", callbacks=[StopAfterTwo()], **RESUMABLE)
    resumed = fit(tiny_model(seed=99), data, data, checkpoint_dir=out / "resumed", progress=False, **RESUMABLE)
    record = dict(
        full=full.to_dict(),
        full_saves=full_saves,
        all_saves=saved_epochs,
        stopped=metrics(stopped),
        resumed=metrics(resumed),
        full_metrics=metrics(full),
        batchnorm_types=batchnorm_types(model),
    )
    (out / f"checkpoints-rank{rank}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), out / f"model-rank{rank}.pt")


def agreement(out: Path, rank: int) -> None:
    """A setup error on one process only, and a loss that becomes non-finite on one process only."""
    from bnvit import fit

    images, labels = toy_data(64)
    bad_labels = labels.clone()
    bad_labels[1] = 12  # index 1 is in rank 1's share of the validation set
    try:
        fit(tiny_model(), (images, labels), (images, bad_labels), **{**RESUMABLE, "epochs": 1, "progress": False})
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    calls = 0

    def loss_fn(logits, labels):
        """Non-finite from rank 1's second step on: a divergence that only one process sees."""
        nonlocal calls
        calls += 1
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if rank == 1 and calls >= 2 else loss

    history = fit(tiny_model(), (images, labels), loss_fn=loss_fn, **{**RESUMABLE, "epochs": 3, "progress": False})
    poisoned = images.clone()
    poisoned[41, 0, 3, 3] = float("nan")  # rank 1's second batch (DistributedSampler without shuffling), image 4
    try:
        loader = DataLoader(TensorDataset(poisoned, labels), batch_size=32, shuffle=False)
        fit(tiny_model(), loader, sync_bn=False, **{**RESUMABLE, "epochs": 1, "progress": False})
        data_error = None
    except Exception as err:
        data_error = f"{type(err).__name__}: {err}"
    record = dict(error=error, history=history.to_dict(), diverged_at=history.diverged_at, data_error=data_error)
    (out / f"agreement-rank{rank}.json").write_text(json.dumps(record, default=str))


def syncbn(out: Path, rank: int) -> None:
    """`CPUSyncBatchNorm` on unequal shares (3 and 5 samples), 2-d and 4-d, forward and backward."""
    import torch.distributed as dist

    from bnvit.training.distributed import CPUSyncBatchNorm

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo")
    results = {}
    for case, shape, momentum in (("2d", (8, 6), 0.1), ("4d", (8, 6, 3, 2), None)):
        torch.manual_seed(0)
        full = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        upstream = torch.randn(*shape, dtype=torch.float64)
        share = slice(0, 3) if rank == 0 else slice(3, 8)
        bn = CPUSyncBatchNorm(6, momentum=momentum).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        x = full[share].clone().requires_grad_(True)
        y = bn(x)
        (y * upstream[share]).sum().backward()
        results[case] = dict(
            y=y.detach(),
            grad_x=x.grad,
            grad_weight=bn.weight.grad,
            grad_bias=bn.bias.grad,
            running_mean=bn.running_mean,
            running_var=bn.running_var,
        )
    torch.save(results, out / f"syncbn-rank{rank}.pt")
    if started_here:
        dist.destroy_process_group()


def killed(out: Path, rank: int, kill_at: int) -> None:
    """The `checkpoints` full run, with rank 0 killed by SIGKILL at its `kill_at`-th loss call."""
    from bnvit import fit

    calls = 0

    def loss_fn(logits, labels):
        nonlocal calls
        calls += 1
        if rank == 0 and calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(logits, labels)

    data = toy_data(96)
    history = fit(tiny_model(), data, data, loss_fn=loss_fn, checkpoint_dir=out / "killed", progress=False, **RESUMABLE)
    (out / f"killed-rank{rank}.json").write_text(json.dumps(metrics(history)))


SCENARIOS = {"equivalence": equivalence, "checkpoints": checkpoints, "agreement": agreement, "syncbn": syncbn}


def main(argv: list[str]) -> None:
    out, names = Path(argv[0]), argv[1:]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if names[0] == "killed":
        killed(out, rank, int(names[1]))
        return
    for name in names:
        SCENARIOS[name](out, rank)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
