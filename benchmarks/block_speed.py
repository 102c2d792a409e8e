"""Folded `bnvit.BNFFNBlock` against timm's `Block`: inference time at batch 1, 64 and 256, as paired ratios.

Two stacks of `depth` blocks of one size, with the same attention and MLP weights: timm's `Block`
(a LayerNorm before the attention and another before the MLP) and `bnvit.BNFFNBlock` after
`bnvit.fold_batchnorm` (its BatchNorm, calibrated on random tokens, folded into `fc1`), which
keeps one LayerNorm per block. Both in eval mode under `torch.inference_mode`, timed in interleaved
rounds after a warm-up (`common.interleaved`), in one process. Per batch size the script reports
the median time of each, and three ratios timm / folded (above 1: the folded block is faster): of
the medians, of the minimums (load on a shared machine only adds time), and paired (the median
of each round's ratio, whose two stacks ran back to back, so load drifting between rounds cancels).
It also checks that the folded stack computes what the unfolded one does.

Presets: `small`, one block of ViT-S/16 at 224 pixels (width 384, 6 heads, 197 tokens, MLP ratio
4); `mnist`, the six blocks of `timmvitln_mnist` (width 64, 4 heads, 17 tokens, MLP ratio 2).

Usage:
    python benchmarks/block_speed.py [--preset small|mnist] [--batches 1,64,256] [--threads 1] [--json out.json]
    python benchmarks/block_speed.py --smoke     # tiny sizes: checks that the script runs, measures nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from timm.models.vision_transformer import Block
from torch import nn

from bnvit import BNFFNBlock, fold_batchnorm
from bnvit._util.device import CpuThreads
from common import interleaved, machine, table

PRESETS = {
    "small": dict(dim=384, heads=6, tokens=197, mlp_ratio=4.0, depth=1),
    "mnist": dict(dim=64, heads=4, tokens=17, mlp_ratio=2.0, depth=6),
    "smoke": dict(dim=32, heads=2, tokens=9, mlp_ratio=2.0, depth=2),
}


def build_stacks(dim: int, heads: int, tokens: int, mlp_ratio: float, depth: int) -> tuple[nn.Module, nn.Module]:
    """timm's Block stack and the folded BNFFNBlock stack with the same attention and MLP weights, eval mode."""
    torch.manual_seed(0)
    timm_stack = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
    bnffn = nn.Sequential(*[BNFFNBlock(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
    shared = {k: v for k, v in timm_stack.state_dict().items() if ".norm2." not in k}
    missing = bnffn.load_state_dict(shared, strict=False).missing_keys
    assert all(".mlp.norm.bn." in k for k in missing), missing  # only the BatchNorms are new
    with torch.no_grad():  # calibrate the BatchNorms: statistics of real activations, not the initial ones
        bnffn.train()
        for _ in range(3):
            bnffn(torch.randn(8, tokens, dim))
    bnffn.eval()
    folded = fold_batchnorm(bnffn)
    x = torch.randn(2, tokens, dim)
    with torch.inference_mode():
        error = (folded(x) - bnffn(x)).abs().max().item()
    if error > 1e-4:
        raise RuntimeError(f"the folded stack differs from the unfolded one by {error:.2e}")
    return timm_stack.eval(), folded


def time_batch(stacks: dict[str, nn.Module], batch: int, tokens: int, dim: int, repeats: int) -> dict:
    """Median and minimum ms of each stack at one batch size, and the three ratios timm / folded."""
    x = torch.randn(batch, tokens, dim)
    inner = 20 if batch * tokens <= 256 else 1  # tiny inputs: 20 calls per round, so a round is not all overhead
    device = torch.device("cpu")

    def run(stack: nn.Module) -> None:
        for _ in range(inner):
            stack(x)

    configs = {name: (lambda s=s: run(s)) for name, s in stacks.items()}
    rounds: dict[str, list[float]] = {name: [] for name in stacks}
    with torch.inference_mode():
        interleaved(configs, device, repeats=1, warmup=2)
        for _ in range(repeats):
            for name, seconds in interleaved(configs, device, repeats=1, warmup=0).items():
                rounds[name].append(seconds / inner)
    timm_s, folded_s = rounds["timm Block"], rounds["BNFFNBlock folded"]
    return {
        "timm_ms": 1000 * statistics.median(timm_s),
        "folded_ms": 1000 * statistics.median(folded_s),
        "timm_min_ms": 1000 * min(timm_s),
        "folded_min_ms": 1000 * min(folded_s),
        "ratio_of_medians": statistics.median(timm_s) / statistics.median(folded_s),
        "ratio_of_minimums": min(timm_s) / min(folded_s),
        "ratio_paired": statistics.median(a / b for a, b in zip(timm_s, folded_s, strict=True)),
        "rounds": repeats,
    }


def run(preset: str, batches: list[int], repeats: int, threads: int | None) -> dict:
    """Time both stacks of `preset` at every batch size; see the module docstring."""
    size = PRESETS[preset]
    with CpuThreads(threads):
        stacks = dict(zip(("timm Block", "BNFFNBlock folded"), build_stacks(**size), strict=True))
        by_batch = {f"batch {b}": time_batch(stacks, b, size["tokens"], size["dim"], repeats) for b in batches}
        used = torch.get_num_threads()
    return {"preset": preset, "size": size, "threads": used, "batches": by_batch}


def _print(result: dict) -> None:
    rows = [
        (
            batch,
            f"{r['timm_ms']:.3f}",
            f"{r['folded_ms']:.3f}",
            f"{r['ratio_paired']:.3f}x",
            f"{r['ratio_of_medians']:.3f}x",
            f"{r['ratio_of_minimums']:.3f}x",
        )
        for batch, r in result["batches"].items()
    ]
    header = ("batch", "timm Block ms", "BNFFNBlock folded ms", "paired", "of medians", "of minimums")
    size = result["size"]
    where = (
        f"{result['preset']}: {size['depth']} x (width {size['dim']}, {size['heads']} heads, {size['tokens']} tokens)"
    )
    print(table(f"timm Block / folded BNFFNBlock, {where}, {result['threads']} thread(s)", rows, header))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("small", "mnist"), default="small", help="block size (default small)")
    parser.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes (default 1,64,256)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's choice)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: check that the script runs")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: give comma-separated positive integers")
    if not batches or min(batches) < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--batches, --repeats and --threads must be positive")
    preset, repeats = ("smoke", 2) if args.smoke else (args.preset, args.repeats)
    result = {
        "machine": machine(torch.device("cpu")),
        **run(preset, [1, 4] if args.smoke else batches, repeats, args.threads),
    }
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
