"""Inference speed of the deployable models: LayerNorm ViT against folded ViTBNFFN and folded ViTBN.

The three models have the article's size (depth 6, dim 64, 8 heads of 64, MLP 128, 17 tokens)
and go through `bnvit.for_inference` (eval mode, BatchNorm folded: a folded ViTBN has no
normalization left, a folded ViTBNFFN keeps its depth + 3 LayerNorms, the ViT keeps all
2 * depth + 3). Their BatchNorm statistics are calibrated on random images first, so that the
folded weights have realistic magnitudes. Each model runs in three runtimes:

* `eager`: PyTorch, `torch.inference_mode()`;
* `compiled`: `torch.compile` (inductor), compiled during the warm-up;
* `onnxruntime`: the file written by `bnvit.export_onnx`, on onnxruntime's CPU execution provider
  (the CUDA one on a GPU, when the installed onnxruntime has it), with as many threads as PyTorch.

Measured: latency at batch 1 (ms per image) and throughput at batches 64, 256 and 5000 (images/s);
per runtime and batch, the throughput ratios "folded ViTBN / ViT" and "folded ViTBNFFN / ViT".
All models of one runtime and batch are timed in interleaved rounds (common.interleaved); the
ratios are of medians, of minimums (on a machine shared with other work load only ever adds
time), and paired: the median over rounds of each round's ratio, whose models ran back to back,
so that load drifting from one round to the next cancels.

`diagnose` explains the ratios: the torch.profiler breakdown of the eager ViT's time, the speed of
the ViT with its LayerNorms simply deleted (the most any normalization-free model can gain), and
the page faults of one forward pass per batch size.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import resource
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bnvit import ViT, export_onnx, for_inference
from common import interleaved

MODELS = {"ViT": "ln", "ViTBNFFN folded": "bn_ffn", "ViTBN folded": "bn"}
RUNTIMES = ("eager", "compiled", "onnxruntime")
RATIOS = {"folded ViTBN / ViT": "ViTBN folded", "folded ViTBNFFN / ViT": "ViTBNFFN folded"}


def build_models(depth: int = 6, device: torch.device | None = None) -> dict[str, ViT]:
    """The three models in eval mode, same seed, BatchNorm statistics calibrated on random images."""
    models = {}
    for name, norm in MODELS.items():
        torch.manual_seed(0)
        model = ViT(norm=norm, depth=depth)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(256, 1, 28, 28))
        models[name] = model.eval().to(device or "cpu")
    return models


def _onnx_providers(device: torch.device) -> list[str] | None:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cuda":
        return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else None
    return ["CPUExecutionProvider"]


def _runners(
    runtime: str, models: dict[str, ViT], device: torch.device, folder: Path
) -> dict[str, Callable[[torch.Tensor], object]]:
    """For each model, a function running one forward pass on a batch of images (on `device`)."""
    if runtime == "eager":
        return {name: for_inference(m, device=device) for name, m in models.items()}
    if runtime == "compiled":
        return {name: for_inference(m, device=device, compile=True) for name, m in models.items()}
    import onnxruntime

    providers = _onnx_providers(device)
    options = onnxruntime.SessionOptions()
    if device.type == "cpu":
        options.intra_op_num_threads = torch.get_num_threads()
    runners = {}
    for name, model in models.items():
        path = export_onnx(model, folder / f"{name.replace(' ', '_')}.onnx")
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        runners[name] = lambda x, s=session: s.run(None, {"images": x})
    return runners


def run(
    device: torch.device,
    repeats: int,
    *,
    depth: int = 6,
    batches: tuple[int, ...] = (1, 64, 256, 5000),
    runtimes: tuple[str, ...] = RUNTIMES,
    models: dict[str, ViT] | None = None,
    image_shape: tuple[int, ...] = (1, 28, 28),
    diagnosis: bool = True,
) -> dict:
    """Time every model in every runtime at every batch size; see the module docstring."""
    models = models or build_models(depth)
    out: dict = {"depth": depth, "models": {n: f"norm={k!r}" for n, k in MODELS.items()}, "runtimes": {}}
    with tempfile.TemporaryDirectory(prefix="bnvit-deploy-") as folder:
        for runtime in runtimes:
            if runtime == "onnxruntime":
                missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
                if missing:
                    out["runtimes"][runtime] = {
                        "skipped": f'{", ".join(missing)} not installed: pip install "bnvit[onnx]"'
                    }
                    continue
                if _onnx_providers(device) is None:
                    out["runtimes"][runtime] = {"skipped": "the installed onnxruntime has no CUDAExecutionProvider"}
                    continue
            runners = _runners(runtime, models, device, Path(folder))
            out["runtimes"][runtime] = {
                f"batch {b}": _time_batch(runners, runtime, b, device, repeats, image_shape) for b in batches
            }
    if not diagnosis:
        return out
    profile_batch = 256 if 256 in batches else max(batches)
    out["diagnosis"] = diagnose(models["ViT"], device, repeats, batches=batches, profile_batch=profile_batch)
    return out


def _time_batch(
    runners: dict, runtime: str, batch: int, device: torch.device, repeats: int, image_shape: tuple[int, ...]
) -> dict:
    """Median and minimum time per batch of each model, over interleaved rounds."""
    images = torch.rand(batch, *image_shape)
    images = images.numpy() if runtime == "onnxruntime" else images.to(device)
    inner = 20 if batch * math.prod(image_shape) <= 784 else 1  # an MNIST image takes ~1 ms: 20 calls per round
    rounds = repeats if batch < 1000 else max(3, min(repeats, 5))

    def call(run=None) -> None:
        for _ in range(inner):
            run(images)

    configs = {name: (lambda r=r: call(r)) for name, r in runners.items()}
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        interleaved(configs, device, repeats=1, warmup=2)  # warm-up (and, for torch.compile, compilation)
        for _ in range(rounds):  # one interleaved round at a time, to keep every round (median and minimum)
            for name, seconds in interleaved(configs, device, repeats=1, warmup=0).items():
                per_round[name].append(seconds / inner)
    median = {name: statistics.median(v) for name, v in per_round.items()}
    fastest = {name: min(v) for name, v in per_round.items()}
    row: dict = {
        name: {
            "ms": 1000 * median[name],
            "images_per_s": batch / median[name],
            "min_ms": 1000 * fastest[name],
        }
        for name in runners
    }
    row["ratios"] = {label: median["ViT"] / median[name] for label, name in RATIOS.items() if name in runners}
    row["ratios_of_minimums"] = {
        label: fastest["ViT"] / fastest[name] for label, name in RATIOS.items() if name in runners
    }
    row["ratios_paired"] = {  # per round, then the median: load that drifts between rounds cancels
        label: statistics.median(v / w for v, w in zip(per_round["ViT"], per_round[name], strict=True))
        for label, name in RATIOS.items()
        if name in runners
    }
    row["rounds"] = rounds
    return row


def build_small_models(device: torch.device | None = None, depth: int | None = None) -> dict[str, ViT]:
    """ViT-S/16 at 224: `vitln_s16_224` and `vitbn_s16_224` (BatchNorm calibrated), eval mode."""
    from bnvit.timm import registry  # the timm builders; only this section needs them

    models = {}
    builders = {"ViT": registry.vitln_s16_224, "ViTBN folded": registry.vitbn_s16_224}
    for name, builder in builders.items():
        torch.manual_seed(0)
        model = (builder() if depth is None else builder(depth=depth)).train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.rand(8, 3, 224, 224))
        models[name] = model.eval().to(device or "cpu")
    return models


def run_small(
    device: torch.device,
    repeats: int,
    *,
    batches: tuple[int, ...] = (1, 16),
    runtimes: tuple[str, ...] = RUNTIMES,
    depth: int | None = None,
) -> dict:
    """Folded ViTBN-S/16 against the LayerNorm ViT-S/16 at 224 pixels (197 tokens, dim 384, 6 heads)."""
    out = run(
        device,
        repeats,
        batches=batches,
        runtimes=runtimes,
        models=build_small_models(device, depth),
        image_shape=(3, 224, 224),
        diagnosis=False,
    )
    out["models"] = {"ViT": "vitln_s16_224", "ViTBN folded": "vitbn_s16_224"}
    out["depth"] = depth or 12
    return out


def _without_layernorm(model: ViT) -> ViT:
    """The ViT with every LayerNorm replaced by Identity: not a valid model, the bound for any LN-free one."""
    stripped = copy.deepcopy(model)
    for parent in list(stripped.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, nn.Identity())
    return stripped


def diagnose(
    model: ViT, device: torch.device, repeats: int, batches: tuple[int, ...] = (1, 256, 5000), profile_batch: int = 256
) -> dict:
    """Why (not) faster: where the eager ViT's time goes, what removing its LayerNorms could gain at most.

    * `profile`: torch.profiler self time of the eager ViT by op group, at `profile_batch`;
    * `layernorm_free_bound`: throughput of the ViT with its LayerNorms deleted over the ViT's,
      eager, per batch (medians of interleaved rounds): no folded model can beat this;
    * `page_faults_per_forward`: minor page faults of one eager forward pass per batch size
      (CPU): the allocator returning large activation buffers to the OS, re-faulted every pass.
    """
    from torch.profiler import ProfilerActivity, profile

    vit = for_inference(model, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    groups = {
        "layer_norm": ("layer_norm",),
        "linear (mm/addmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "attention (sdpa)": ("scaled_dot_product", "flash_attention", "efficient_attention"),
        "gelu": ("gelu",),
        "copies": ("aten::copy_",),
    }
    images = torch.rand(profile_batch, 1, 28, 28, device=device)
    with torch.inference_mode():
        for _ in range(3):
            vit(images)
        with profile(activities=activities) as prof:
            for _ in range(max(5, 5000 // profile_batch)):  # enough calls to average out the machine's noise
                vit(images)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    shares = {
        group: sum(getattr(e, attr) for e in events if any(k in e.key for k in keys)) / total
        for group, keys in groups.items()
    }
    shares["other"] = 1 - sum(shares.values())

    stripped = _without_layernorm(vit)
    bound, faults = {}, {}
    for batch in batches:
        x = torch.rand(batch, 1, 28, 28, device=device)
        inner = 20 if batch == 1 else 1

        def run(m=None, x=x, inner=inner) -> None:
            for _ in range(inner):
                m(x)

        rounds = repeats if batch < 1000 else max(3, min(repeats, 5))
        with torch.inference_mode():
            seconds = interleaved({"ViT": lambda: run(vit), "no LN": lambda: run(stripped)}, device, rounds)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            vit(x)
            faults[f"batch {batch}"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        bound[f"batch {batch}"] = seconds["ViT"] / seconds["no LN"]
    return {
        "profile_batch": profile_batch,
        "profile_self_time_share": shares,
        "layernorm_free_bound": bound,
        "page_faults_per_forward": faults,
        "layer_norms_in_vit": sum(isinstance(m, nn.LayerNorm) for m in vit.modules()),
    }
