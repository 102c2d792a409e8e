"""bnvit's benchmark suite: measured ratios, printed as tables and saved as JSON.

Sections (all by default, or pick with `--only`):

1. `train`: one training step at the article's setting (depth 6, batch 100, Adam), bnvit's
   ViTBNFFN and ViT against the straightforward reference-style model (benchmarks/reference_vit.py)
   at equal precision: both in fp32, and both under the same bf16 autocast where that is fit()'s
   default; the precision's own gain and fit()'s default against the straightforward model in fp32
   are separate, labelled rows. With a check that both compute the same losses and weights in fp32.
2. `infer`: inference at batch 1 and 5000, the same equal-precision comparison, and folded ViTBNFFN
   against the LayerNorm ViT of the same size in the same precision.
3. `augment`: the batched on-device augmentation against torchvision's per-image pipeline.
4. `epoch`: one epoch end to end (60,000 augmented images) with fit() and the device path against
   a DataLoader with the torchvision pipeline and a plain loop.
5. `deploy`: inference latency (batch 1) and throughput (batches 64, 256 and 5000) of the LayerNorm ViT,
   folded ViTBNFFN and folded ViTBN, in PyTorch eager, torch.compile and onnxruntime, with the ratios
   "folded ViTBN / ViT" and "folded ViTBNFFN / ViT", and the LayerNorm share of the ViT's time.
6. `small`: ViT-S/16 at 224 pixels, folded `vitbn_s16_224` against `vitln_s16_224`,
   batch 1 and 16, eager and onnxruntime.

   On a CPU both deploy sections run with `--deploy-threads` threads (default 1: one serving
   process per core). On a 2-core machine two threads made onnxruntime slower than one (42 ms
   against 27 ms at batch 64) and the ratios swing with the scheduler, not the model.
7. `sweep` (CUDA only): the wall time of the article's whole sweep.
8. `attention` (only when asked for): the two forms of attention, `attn_impl="standard"` and
   `"factored"`, in the same ViTBNFFN with the same weights, at equal precision: a training step
   and an eval forward at batch 1 and 100, and the form `"auto"` (the default) takes at each.

Every timing is the median (and minimum) of interleaved rounds after a warm-up, in one process.
On glibc the script first restarts itself with malloc told to keep freed memory (`ALLOCATOR_ENV`),
so that large batches do not page-fault their activations back in on every pass.

Usage:
    python benchmarks/run.py [--device cuda] [--json out.json] [--threads N]
    python benchmarks/run.py --smoke        # every section at a tiny size, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import augment_throughput
import deploy_speed
import epoch
import model_speed
from bnvit._util.device import CpuThreads
from bnvit.training import resolve_device
from common import machine, table

SECTIONS = ("train", "infer", "augment", "epoch", "deploy", "small", "sweep", "attention")

# glibc's malloc returns every large buffer (activations of a big batch) to the OS when it is freed
# and page-faults it back in on the next pass: at batch 5000 that was ~700,000 page faults and 1.7x
# the time of one forward pass, and it varies run to run. With these settings, read by glibc at process
# start, the heap keeps its memory: after the first pass there are no page faults.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_ARENA_MAX": "1"}


def _steady_allocator(argv: list[str] | None) -> None:
    """Restart this script with `ALLOCATOR_ENV` set, unless it is already set (or this is not glibc)."""
    if argv is not None or platform.libc_ver()[0] != "glibc" or all(k in os.environ for k in ALLOCATOR_ENV):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


def _print_train(result: dict) -> None:
    rows = []
    for kind, r in result.items():
        for precision, v in r["precisions"].items():
            rows.append(
                (
                    kind,
                    precision,
                    f"{v['reference_ms']:.1f} / {v['reference_min_ms']:.1f}",
                    f"{v['bnvit_ms']:.1f} / {v['bnvit_min_ms']:.1f}",
                    f"{v['speedup']:.2f}x",
                    f"{v['speedup_of_minimums']:.2f}x",
                )
            )
    header = ("model", "precision", "straightforward ms (median / min)", "bnvit ms", "ratio", "ratio of minimums")
    print(table("Training step (Adam), both models in the same precision", rows, header))
    default = next(iter(result.values()))["default_precision"]
    rows = []
    for kind, r in result.items():
        for name, g in r.get("precision_gain", {}).items():
            rows.append((kind, name, f"{g['speedup']:.2f}x", f"{g['speedup_of_minimums']:.2f}x"))
    if rows:
        print()
        header = ("model", "implementation", "gain", "of minimums")
        print(table(f"The precision's own gain, {default} over fp32", rows, header))
    print()
    rows = [
        (kind, f"{d['speedup']:.2f}x", f"{d['speedup_of_minimums']:.2f}x")
        for kind, d in ((k, r["defaults_vs_defaults"]) for k, r in result.items())
    ]
    title = f"Defaults vs defaults (not equal precision): bnvit in fit()'s default ({default}), straightforward in fp32"
    print(table(title, rows, ("model", "ratio", "of minimums")))
    keys = ("loss_max_abs_diff", "weight_max_abs_diff", "bias_before_bn_max_abs_diff")
    rows = [(kind, *(f"{r[key]:.1e}" for key in keys)) for kind, r in result.items()]
    print()
    header = ("model", "loss", "weights", "bias before BN")
    print(table("Same results in fp32 after 3 Adam steps (max abs diff)", rows, header))


def _print_infer(result: dict) -> None:
    for batch, row in result.items():
        rows = [
            (name, f"{v['ms']:.2f}", f"{v['min_ms']:.2f}", f"{v['images_per_s']:,.0f}")
            for name, v in row.items()
            if name != "ratios"
        ]
        print(table(f"Inference, {batch}", rows, ("model", "ms (median)", "ms (min)", "images/s")))
        rows = [(name, f"{v['speedup']:.2f}x", f"{v['speedup_of_minimums']:.2f}x") for name, v in row["ratios"].items()]
        print(table(f"Inference ratios, {batch}", rows, ("ratio", "medians", "minimums")))
        print()


def _print_attention(result: dict) -> None:
    for batch, row in result.items():
        rows = [
            (name, f"{v['ms']:.2f}", f"{v['min_ms']:.2f}")
            for name, v in row.items()
            if isinstance(v, dict) and "ms" in v
        ]
        print(table(f"Attention forms, ViTBNFFN, {batch}", rows, ("form, work, precision", "ms (median)", "ms (min)")))
        rows = [(name, f"{v['speedup']:.2f}x", f"{v['speedup_of_minimums']:.2f}x") for name, v in row["ratios"].items()]
        print(table(f"standard / factored, {batch}", rows, ("ratio", "medians", "minimums")))
        print(
            f"attn_impl='auto' takes the {row['auto_takes']} form at {batch}; eval logits of the two forms differ "
            f"by {row['eval_max_abs_diff_fp32']:.1e} at most (fp32)\n"
        )


def _print_deploy(result: dict, title: str = "Deploy") -> None:
    for runtime, by_batch in result["runtimes"].items():
        if "skipped" in by_batch:
            print(f"{title}, {runtime}: skipped ({by_batch['skipped']})\n")
            continue
        rows = []
        for batch, row in by_batch.items():
            for name, v in row.items():
                if isinstance(v, dict) and "ms" in v:
                    rows.append((batch, name, f"{v['ms']:.2f}", f"{v['images_per_s']:,.0f}", "", "", ""))
            rows += [
                (
                    batch,
                    label,
                    "",
                    "",
                    f"{ratio:.2f}x",
                    f"{row['ratios_of_minimums'][label]:.2f}x",
                    f"{row['ratios_paired'][label]:.2f}x",
                )
                for label, ratio in row["ratios"].items()
            ]
        header = ("batch", "model", "ms / batch", "images/s", "ratio (medians)", "(minimums)", "(paired)")
        where = f"depth {result['depth']}, {result['threads']} thread{'s' * (result['threads'] > 1)}, medians"
        print(table(f"{title}, {runtime} ({where})", rows, header))
        print()
    if "diagnosis" not in result:
        return
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
    parser.add_argument("--only", default=",".join(SECTIONS[:6]), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per configuration (median)")
    parser.add_argument("--epoch-images", type=int, default=60_000, help="images in the end-to-end epoch")
    parser.add_argument("--data-dir", default=None, help="folder with MNIST/raw (default: $BNVIT_DATA)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every section runs")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's choice)")
    parser.add_argument(
        "--deploy-threads",
        default="1",
        help="threads of the deploy and small sections on a CPU (default 1; 'same': as --threads)",
    )
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help=f"keep malloc's defaults (otherwise the script restarts itself with {' '.join(ALLOCATOR_ENV)} set)",
    )
    args = parser.parse_args(argv)
    if args.deploy_threads != "same" and not (args.deploy_threads.isdigit() and int(args.deploy_threads) > 0):
        parser.error(f"--deploy-threads {args.deploy_threads!r}: give a positive number of threads or 'same'")
    deploy_threads = None if args.deploy_threads == "same" else int(args.deploy_threads)
    if not args.system_allocator:
        _steady_allocator(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    deploy_threads = deploy_threads if device.type == "cpu" else None  # threads are a CPU setting
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    repeats = 2 if args.smoke else args.repeats
    depth = 1 if args.smoke else 6

    results: dict = {"machine": machine(device), "repeats": repeats, "started": time.strftime("%Y-%m-%d %H:%M")}
    results["allocator"] = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ} or "malloc defaults"
    print(f"bnvit benchmarks on {results['machine']['cpu']} ({device}), {repeats} rounds, medians\n")
    if "train" in sections:
        results["train"] = model_speed.training_step(device, repeats, depth=depth, batch=20 if args.smoke else 100)
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
        batches = (1, 8) if args.smoke else (1, 64, 256, 5000)
        with CpuThreads(deploy_threads):
            results["deploy"] = deploy_speed.run(device, repeats, depth=depth, batches=batches)
            results["deploy"]["threads"] = torch.get_num_threads()
        _print_deploy(results["deploy"])
        print()
    if "small" in sections:
        runtimes, batches = (("eager",), (1, 2)) if args.smoke else (("eager", "onnxruntime"), (1, 16))
        small = dict(batches=batches, runtimes=runtimes, depth=1 if args.smoke else None)
        with CpuThreads(deploy_threads):
            results["small"] = deploy_speed.run_small(device, repeats, **small)
            results["small"]["threads"] = torch.get_num_threads()
        _print_deploy(results["small"], "ViT-S/16 at 224, folded ViTBN vs LayerNorm ViT")
        print()
    if "sweep" in sections:
        if device.type != "cuda" and not args.smoke:
            parser.error("the sweep section is for CUDA; on a CPU, see the time estimate of examples/compare_depths.py")
        import sweep

        results["sweep"] = sweep.run(device, args.data_dir, smoke=args.smoke)
        print(f"article sweep: {results['sweep']['runs']} runs in {results['sweep']['seconds'] / 60:.1f} min\n")
    if "attention" in sections:
        batches = (1, 8) if args.smoke else (1, 100)
        results["attention"] = model_speed.attention_forms(device, repeats, depth=depth, batches=batches)
        _print_attention(results["attention"])
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
