"""bnvit's benchmark suite: measured ratios, printed as tables and saved as JSON.

Sections (all by default, or pick with `--only`):

1. `train`: one training step at the article's setting (depth 6, batch 100, Adam), bnvit's
   ViTBNFFN and ViT against the straightforward reference-style model (benchmarks/reference_vit.py),
   with a check that both compute the same losses and weights in fp32.
2. `infer`: inference at batch 1 and 5000, the same comparison, and folded ViTBNFFN against the
   LayerNorm ViT of the same size.
3. `augment`: the batched on-device augmentation against torchvision's per-image pipeline.
4. `epoch`: one epoch end to end (60,000 augmented images) with fit() and the device path against
   a DataLoader with the torchvision pipeline and a plain loop.
5. `deploy`: inference latency (batch 1) and throughput (batches 256 and 5000) of the LayerNorm ViT,
   folded ViTBNFFN and folded ViTBN, in PyTorch eager, torch.compile and onnxruntime, with the ratios
   "folded ViTBN / ViT" and "folded ViTBNFFN / ViT", and the LayerNorm share of the ViT's time.
6. `sweep` (CUDA only): the wall time of the article's whole sweep.

Usage:
    BNVIT_DATA=../shared/data python benchmarks/run.py [--device cuda] [--json out.json]
    python benchmarks/run.py --smoke        # every section at a tiny size, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import augment_throughput
import deploy_speed
import epoch
import model_speed
from bnvit.training import resolve_device
from common import machine, table

SECTIONS = ("train", "infer", "augment", "epoch", "deploy", "sweep")


def _print_train(result: dict) -> None:
    rows = [
        (
            kind,
            f"{r['reference_ms']:.1f}",
            f"{r['bnvit_fp32_ms']:.1f} ({r['speedup_fp32']:.2f}x)",
            f"{r['bnvit_default_ms']:.1f} ({r['speedup_default']:.2f}x)",
            f"{r['loss_max_abs_diff']:.1e} / {r['weight_max_abs_diff']:.1e} / {r['bias_before_bn_max_abs_diff']:.1e}",
        )
        for kind, r in result.items()
    ]
    default = next(iter(result.values()))["default_precision"]
    header = (
        "model",
        "reference ms",
        "bnvit fp32 ms",
        f"bnvit default ({default}) ms",
        "fp32 diff: loss / weights / bias before BN",
    )
    print(table("Training step (depth 6, batch 100, Adam)", rows, header))


def _print_infer(result: dict) -> None:
    for batch, row in result.items():
        rows = [(name, f"{v['ms']:.2f}", f"{v['images_per_s']:,.0f}") for name, v in row.items() if isinstance(v, dict)]
        rows += [(name, "", f"{v:.2f}x") for name, v in row.items() if not isinstance(v, dict)]
        print(table(f"Inference, {batch}", rows, ("model", "ms", "images/s")))


def _print_deploy(result: dict) -> None:
    for runtime, by_batch in result["runtimes"].items():
        if "skipped" in by_batch:
            print(f"Deploy, {runtime}: skipped ({by_batch['skipped']})\n")
            continue
        rows = []
        for batch, row in by_batch.items():
            for name, v in row.items():
                if isinstance(v, dict) and "ms" in v:
                    rows.append((batch, name, f"{v['ms']:.2f}", f"{v['images_per_s']:,.0f}", "", ""))
            rows += [
                (batch, label, "", "", f"{ratio:.2f}x", f"{row['ratios_of_minimums'][label]:.2f}x")
                for label, ratio in row["ratios"].items()
            ]
        header = ("batch", "model", "ms / batch", "images/s", "ratio (medians)", "ratio (minimums)")
        print(table(f"Deploy, {runtime} (depth {result['depth']}, medians)", rows, header))
        print()
    d = result["diagnosis"]
    shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in d["profile_self_time_share"].items())
    print(f"Eager ViT, torch.profiler self time at batch {d['profile_batch']}: {shares}")
    rows = [
        (batch, f"{bound:.3f}x", f"{d['page_faults_per_forward'][batch]:,}")
        for batch, bound in d["layernorm_free_bound"].items()
    ]
    header = ("batch", "ViT with its LayerNorms deleted / ViT (eager)", "page faults per forward")
    print(table("The most a normalization-free model can gain, and the allocator's page faults", rows, header))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="bnvit benchmarks: measured ratios in one process")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--only", default=",".join(SECTIONS[:5]), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per configuration (median)")
    parser.add_argument("--epoch-images", type=int, default=60_000, help="images in the end-to-end epoch")
    parser.add_argument("--data-dir", default=None, help="folder with MNIST/raw (default: $BNVIT_DATA)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every section runs")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    repeats = 2 if args.smoke else args.repeats
    depth = 1 if args.smoke else 6

    results: dict = {"machine": machine(device), "repeats": repeats, "started": time.strftime("%Y-%m-%d %H:%M")}
    print(f"bnvit benchmarks on {results['machine']['cpu']} ({device}), {repeats} rounds, medians\n")
    if "train" in sections:
        results["train"] = model_speed.training_step(device, repeats, depth=depth)
        _print_train(results["train"])
        print()
    if "infer" in sections:
        batches = (1, 50) if args.smoke else (1, 5000)
        results["infer"] = model_speed.inference(device, repeats, depth=depth, batches=batches)
        _print_infer(results["infer"])
        print()
    if "augment" in sections:
        sizes = ["--torchvision-images", "50", "--fast-images", "5000"] if args.smoke else []
        data = ["--root", args.data_dir] if args.data_dir else []
        results["augment"] = augment_throughput.main(["--repeats", str(min(repeats, 7)), *sizes, *data])
        print()
    if "epoch" in sections:
        images = 200 if args.smoke else args.epoch_images
        results["epoch"] = epoch.run(device, images, args.data_dir)
        r = results["epoch"]
        rows = [
            ("bnvit: fit + DeviceLoader", f"{r['bnvit_s']:.1f}"),
            ("straightforward: DataLoader + torchvision", f"{r['straightforward_s']:.1f}"),
        ]
        print(table(f"One epoch, {images:,} augmented images + test", rows, ("path", "seconds")))
        print(f"speedup {r['speedup']:.2f}x\n")
    if "deploy" in sections:
        batches = (1, 8) if args.smoke else (1, 256, 5000)
        results["deploy"] = deploy_speed.run(device, repeats, depth=depth, batches=batches)
        _print_deploy(results["deploy"])
        print()
    if "sweep" in sections:
        if device.type != "cuda" and not args.smoke:
            parser.error("the sweep section is for CUDA; on a CPU, see the time estimate of examples/compare_depths.py")
        import sweep

        results["sweep"] = sweep.run(device, args.data_dir, smoke=args.smoke)
        print(f"article sweep: {results['sweep']['runs']} runs in {results['sweep']['seconds'] / 60:.1f} min\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
