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
from bnvit.models.attention import takes_factored
from bnvit.training import resolve_precision
from common import interleaved_stats
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


def _train_step(net, opt, images, labels, device: torch.device, precision: str) -> None:
    """One optimizer step on one batch: what every training-speed row times."""
    with _autocast(device, precision):
        logits = net(images)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def precisions(device: torch.device) -> tuple[str, ...]:
    """The precisions compared: fp32, and `fit()`'s default on this device when that is not fp32."""
    default = resolve_precision("auto", device)
    return ("fp32",) if default == "fp32" else ("fp32", default)


def _ratios(seconds: dict[str, dict[str, float]], numerator: str, denominator: str) -> dict[str, float]:
    return {
        "speedup": seconds[numerator]["median"] / seconds[denominator]["median"],
        "speedup_of_minimums": seconds[numerator]["min"] / seconds[denominator]["min"],
    }


def training_step(device: torch.device, repeats: int, depth: int = 6, batch: int = 100) -> dict:
    """Seconds per training step (forward, backward, Adam) at the article's setting, at equal precision.

    Both models are timed in every precision of `precisions(device)` (fp32, and bf16 autocast where
    that is `fit()`'s default), the straightforward model under the same autocast as bnvit. Reported
    per model kind and precision: medians and minimums over interleaved rounds, and the ratio
    straightforward / bnvit; separately, what the precision alone gains for each model, and, labelled
    as such, `fit()`'s default against the straightforward model in fp32.
    """
    default = resolve_precision("auto", device)
    images, labels = _batches(1, batch, device)[0]
    configs = {}
    for kind in KINDS:
        reference, model = twins(kind, depth, device)
        for precision in precisions(device):
            for name, net in (("reference", copy.deepcopy(reference)), ("bnvit", copy.deepcopy(model))):
                opt = torch.optim.Adam(net.parameters(), lr=3e-3)

                def step(net=net, opt=opt, precision=precision) -> None:
                    _train_step(net, opt, images, labels, device, precision)

                configs[f"{kind} {name} {precision}"] = step
    seconds = interleaved_stats(configs, device, repeats, warmup=3)
    out = {}
    for kind in KINDS:
        row: dict = {"default_precision": default, "precisions": {}}
        for precision in precisions(device):
            ref, ours = seconds[f"{kind} reference {precision}"], seconds[f"{kind} bnvit {precision}"]
            row["precisions"][precision] = {
                "reference_ms": 1000 * ref["median"],
                "bnvit_ms": 1000 * ours["median"],
                "reference_min_ms": 1000 * ref["min"],
                "bnvit_min_ms": 1000 * ours["min"],
                **_ratios(seconds, f"{kind} reference {precision}", f"{kind} bnvit {precision}"),
            }
        if default != "fp32":
            row["precision_gain"] = {
                name: _ratios(seconds, f"{kind} {name} fp32", f"{kind} {name} {default}")
                for name in ("reference", "bnvit")
            }
        # Defaults against defaults (labelled so wherever shown): fit()'s default vs the straightforward model in fp32.
        row["defaults_vs_defaults"] = _ratios(seconds, f"{kind} reference fp32", f"{kind} bnvit {default}")
        # Flat keys kept for the GPU check's readers.
        row["reference_ms"] = row["precisions"]["fp32"]["reference_ms"]
        row["bnvit_fp32_ms"] = row["precisions"]["fp32"]["bnvit_ms"]
        row["bnvit_default_ms"] = row["precisions"][default]["bnvit_ms"]
        row["speedup_fp32"] = row["precisions"]["fp32"]["speedup"]
        row.update(agreement(kind, depth, device))
        out[kind] = row
    return out


@torch.inference_mode()
def inference(device: torch.device, repeats: int, depth: int = 6, batches: tuple[int, ...] = (1, 5000)) -> dict:
    """Eval-mode latency (batch 1) and throughput (large batches), at equal precision.

    Per batch: the straightforward model and bnvit in each precision of `precisions(device)` (the
    straightforward model under the same autocast), medians and minimums of interleaved rounds; the
    ratios straightforward / bnvit per precision, the precision's own gain per model, and folded
    ViTBNFFN against bnvit's LayerNorm ViT in the same precision.
    """
    models = {}
    for kind in KINDS:
        reference, model = twins(kind, depth, device)
        for precision in precisions(device):
            models[f"{kind} reference {precision}"] = (reference.eval(), precision)
            models[f"{kind} bnvit {precision}"] = (model.eval(), precision)
    folded = fold_batchnorm(models["ViTBNFFN bnvit fp32"][0])
    for precision in precisions(device):
        models[f"ViTBNFFN folded {precision}"] = (folded, precision)

    def forward(model, precision, images) -> None:
        with _autocast(device, precision):
            model(images)

    out = {}
    for batch in batches:
        images = torch.rand(batch, 1, 28, 28, device=device)
        inner = 20 if batch == 1 else 1  # batch 1 takes about a millisecond: time 20 calls per round

        def work(m, p, x=images, inner=inner) -> None:
            for _ in range(inner):
                forward(m, p, x)

        calls = {name: (lambda m=m, p=p: work(m, p)) for name, (m, p) in models.items()}
        rounds = repeats if batch < 1000 else max(3, min(repeats, 7))
        seconds = interleaved_stats(calls, device, rounds, warmup=2)
        seconds = {n: {k: v / inner for k, v in s.items()} for n, s in seconds.items()}
        row: dict = {
            name: {"ms": 1000 * s["median"], "min_ms": 1000 * s["min"], "images_per_s": batch / s["median"]}
            for name, s in seconds.items()
        }
        ratios = {}
        for precision in precisions(device):
            for kind in KINDS:
                ratios[f"{kind} bnvit / straightforward, {precision}"] = _ratios(
                    seconds, f"{kind} reference {precision}", f"{kind} bnvit {precision}"
                )
            ratios[f"ViTBNFFN folded / ViT (LayerNorm), {precision}"] = _ratios(
                seconds, f"ViT bnvit {precision}", f"ViTBNFFN folded {precision}"
            )
            if precision != "fp32":
                for kind in KINDS:
                    for name in ("reference", "bnvit"):
                        ratios[f"{kind} {name}: {precision} / fp32 (the precision's own gain)"] = _ratios(
                            seconds, f"{kind} {name} fp32", f"{kind} {name} {precision}"
                        )
        row["ratios"] = ratios
        out[f"batch {batch}"] = row
    return out


def attention_forms(device: torch.device, repeats: int, depth: int = 6, batches: tuple[int, ...] = (1, 100)) -> dict:
    """The two forms of attention (`attn_impl`) in the same ViTBNFFN, same weights, at equal precision.

    Per batch: a training step (Adam) and an eval forward of `attn_impl="standard"` and
    `"factored"`, in each precision of `precisions(device)`, medians and minimums of interleaved
    rounds; the ratios standard / factored; and the form `attn_impl="auto"` (the default) takes
    there, with the largest difference between the two forms' eval logits in fp32.
    """
    torch.manual_seed(0)
    models = {impl: ViT(norm="bn_ffn", depth=depth, attn_impl=impl).to(device) for impl in ("standard", "factored")}
    models["factored"].load_state_dict(models["standard"].state_dict())
    block = models["standard"].blocks[0].attn
    out = {}
    for batch in batches:
        images, labels = _batches(1, batch, device)[0]
        inner = 20 if batch == 1 else 1  # batch 1 takes about a millisecond: time 20 calls per round
        configs = {}
        for precision in precisions(device):
            for impl, model in models.items():
                net = copy.deepcopy(model)
                opt = torch.optim.Adam(net.parameters(), lr=3e-3)

                def step(net=net, opt=opt, precision=precision, images=images, labels=labels, inner=inner) -> None:
                    net.train()
                    for _ in range(inner):
                        _train_step(net, opt, images, labels, device, precision)

                @torch.inference_mode()
                def forward(model=model, precision=precision, images=images, inner=inner) -> None:
                    model.eval()
                    for _ in range(inner):
                        with _autocast(device, precision):
                            model(images)

                configs[f"{impl} step {precision}"] = step
                configs[f"{impl} eval {precision}"] = forward
        seconds = interleaved_stats(configs, device, repeats, warmup=2)
        seconds = {n: {k: v / inner for k, v in s.items()} for n, s in seconds.items()}
        row: dict = {name: {"ms": 1000 * s["median"], "min_ms": 1000 * s["min"]} for name, s in seconds.items()}
        row["ratios"] = {
            f"{what}, {precision}: standard / factored": _ratios(
                seconds, f"standard {what} {precision}", f"factored {what} {precision}"
            )
            for precision in precisions(device)
            for what in ("step", "eval")
        }
        tokens = torch.empty(batch, models["standard"].num_tokens, block.qkv.in_features, device="meta")
        row["auto_takes"] = "factored" if takes_factored("auto", tokens, block.heads, block.dim_head) else "standard"
        with torch.inference_mode():
            logits = [m.eval()(images) for m in models.values()]
        row["eval_max_abs_diff_fp32"] = float((logits[0] - logits[1]).abs().max())
        out[f"batch {batch}"] = row
    return out
