"""Training-step and inference speed: bnvit against the straightforward reference-style model.

Both models get the same weights (bnvit's through `checkpoint_filter_fn`, exactly as a reference
checkpoint is loaded), so the benchmark also checks that bnvit computes the same thing: after
a few Adam steps on the same batches, the losses and weights of the two must agree to fp32
rounding.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from bnvit import ViT, checkpoint_filter_fn, fold_batchnorm
from bnvit.training import resolve_precision
from common import interleaved
from reference_vit import ReferenceViT

KINDS = {"ViTBNFFN": ("bn_ffn", True), "ViT": ("ln", False)}


def twins(kind: str, depth: int, device: torch.device) -> tuple[torch.nn.Module, ViT]:
    """A reference model and a bnvit model with identical weights."""
    norm, bn_ffn = KINDS[kind]
    torch.manual_seed(0)
    reference = ReferenceViT(bn_ffn=bn_ffn, depth=depth).to(device)
    model = ViT(norm=norm, depth=depth).to(device)
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model))
    return reference, model


def _batches(n: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(batch, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
        for _ in range(n)
    ]


def agreement(kind: str, depth: int, device: torch.device, steps: int = 3) -> dict[str, float]:
    """Max abs differences of loss and weights after `steps` Adam steps from the same start."""
    reference, model = twins(kind, depth, device)
    losses = []
    for net in (reference, model):
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        per_step = []
        for images, labels in _batches(steps, 100, device):
            loss = F.cross_entropy(net(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            per_step.append(loss.item())
        losses.append(per_step)
    converted = checkpoint_filter_fn(reference.state_dict(), model)
    ours = model.state_dict()
    diffs = {k: (converted[k].float() - ours[k].float()).abs().max().item() for k in ours}
    # The bias of a Linear followed by BatchNorm has a gradient of exactly zero in exact arithmetic
    # (the BatchNorm subtracts the batch mean); Adam normalizes its rounding noise into lr-sized
    # steps, so that bias (and the running mean that tracks it) differs at the level of lr.
    before_bn = {k for k in ours if k.endswith("ffn.fc1.bias") or k.endswith("ffn.norm.bn.running_mean")}
    return {
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(*losses, strict=True)),
        "weight_max_abs_diff": max(v for k, v in diffs.items() if k not in before_bn),
        "bias_before_bn_max_abs_diff": max((diffs[k] for k in before_bn), default=0.0),
    }


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def training_step(device: torch.device, repeats: int, depth: int = 6, batch: int = 100) -> dict:
    """Median seconds per training step (forward, backward, Adam) at the article's setting.

    bnvit is timed in fp32 (the same arithmetic as the reference) and in `fit()`'s default
    precision on this device (`resolve_precision("auto")`: bf16 autocast on CUDA and on CPUs
    with native bf16).
    """
    default = resolve_precision("auto", device)
    images, labels = _batches(1, batch, device)[0]
    configs, out = {}, {}
    for kind in KINDS:
        reference, model = twins(kind, depth, device)
        for name, net, precision in (
            ("reference", reference, "fp32"),
            ("bnvit fp32", model, "fp32"),
            (f"bnvit {default}", copy.deepcopy(model), default),
        ):
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)

            def step(net=net, opt=opt, precision=precision) -> None:
                with _autocast(device, precision):
                    logits = net(images)
                loss = F.cross_entropy(logits.float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            configs[f"{kind} {name}"] = step
    seconds = interleaved(configs, device, repeats)
    for kind in KINDS:
        ref, fp32, fast = (seconds[f"{kind} {n}"] for n in ("reference", "bnvit fp32", f"bnvit {default}"))
        out[kind] = {
            "reference_ms": 1000 * ref,
            "bnvit_fp32_ms": 1000 * fp32,
            "bnvit_default_ms": 1000 * fast,
            "default_precision": default,
            "speedup_fp32": ref / fp32,
            "speedup_default": ref / fast,
            **agreement(kind, depth, device),
        }
    return out


@torch.inference_mode()
def inference(device: torch.device, repeats: int, depth: int = 6, batches: tuple[int, ...] = (1, 5000)) -> dict:
    """Latency (batch 1) and throughput (large batches) in eval mode: reference vs bnvit, and BN folded vs LN.

    bnvit runs in fp32 and in the default precision of `fit()` on this device.
    """
    default = resolve_precision("auto", device)
    models = {}
    for kind in KINDS:
        reference, model = twins(kind, depth, device)
        models[f"{kind} reference"] = (reference.eval(), "fp32")
        models[f"{kind} bnvit fp32"] = (model.eval(), "fp32")
        models[f"{kind} bnvit {default}"] = (model, default)
    folded = fold_batchnorm(models["ViTBNFFN bnvit fp32"][0])
    models["ViTBNFFN bnvit folded fp32"] = (folded, "fp32")
    models[f"ViTBNFFN bnvit folded {default}"] = (folded, default)

    def forward(model, precision, images) -> None:
        with _autocast(device, precision):
            model(images)

    out = {}
    for batch in batches:
        images = torch.rand(batch, 1, 28, 28, device=device)
        work = {name: (lambda m=m, p=p, x=images: forward(m, p, x)) for name, (m, p) in models.items()}
        seconds = interleaved(work, device, repeats)
        row = {name: {"ms": 1000 * s, "images_per_s": batch / s} for name, s in seconds.items()}
        for kind in KINDS:
            reference = seconds[f"{kind} reference"]
            row[f"speedup {kind} bnvit fp32 vs reference"] = reference / seconds[f"{kind} bnvit fp32"]
            row[f"speedup {kind} bnvit {default} vs reference"] = reference / seconds[f"{kind} bnvit {default}"]
        row["speedup ViTBNFFN folded vs ViT (LayerNorm), fp32"] = (
            seconds["ViT bnvit fp32"] / seconds["ViTBNFFN bnvit folded fp32"]
        )
        out[f"batch {batch}"] = row
    return out
