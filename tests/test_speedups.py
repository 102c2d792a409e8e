"""The faster attention computes what the straightforward one does, forward and backward, folded or not.

`self_attention` picks the factored form when it takes fewer multiply-adds (the article's model:
`dim = dim_head = 64`, 8 heads, at more than a few images per batch) and the standard one
otherwise; both are checked here against the textbook formula in float64, forward and backward,
with and without a qkv bias, and whole models against the straightforward reference model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bnvit
import bnvit.models.attention
from bnvit import ViT, ViTBN, fold_batchnorm
from bnvit.models.attention import factored_attention, factored_pays, self_attention, standard_attention
from reference_vit import ReferenceViT


def _textbook(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    B, N, _ = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias)
    dim_head = qkv_weight.shape[0] // (3 * heads)
    q, k, v = qkv.view(B, N, 3, heads, dim_head).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(B, N, -1), proj_weight, proj_bias)


def _params(dim: int, heads: int, dim_head: int, qkv_bias: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    inner = heads * dim_head

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) / math.sqrt(shape[-1])).requires_grad_()

    return [r(3 * inner, dim), r(3 * inner) if qkv_bias else None, r(dim, inner), r(dim)]


def test_the_factored_form_is_chosen_when_it_takes_fewer_multiply_adds():
    assert factored_pays(64, 8, 64, tokens=100 * 17, seq=17)  # the article's model, batch 100
    assert factored_pays(64, 8, 64, tokens=0, seq=17)  # per token (tracing for export or compile)
    assert not factored_pays(64, 8, 64, tokens=17, seq=17)  # one image: forming the weights costs more
    assert not factored_pays(384, 6, 64, tokens=16 * 197, seq=197)  # ViT-S/16: dim > 2 dim_head
    assert not factored_pays(16, 2, 8, tokens=1000, seq=17)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("form", [factored_attention, standard_attention, self_attention])
def test_attention_forms_equal_the_textbook_formula_with_gradients(form, qkv_bias):
    dim, heads, dim_head, B, N = 24, 3, 16, 5, 9
    x = torch.randn(B, N, dim, dtype=torch.float64, requires_grad=True)
    params = _params(dim, heads, dim_head, qkv_bias)
    leaves = [x, *[p for p in params if p is not None]]
    out = form(x, *params, heads, 0.0)
    expected = _textbook(x, *params, heads)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, cotangent)
    expected_grads = torch.autograd.grad(expected, leaves, cotangent)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_factored_attention_under_cpu_autocast_is_close_to_fp32():
    dim, heads, dim_head, B, N = 64, 8, 64, 8, 17
    x = torch.randn(B, N, dim)
    params = [p if p is None else p.detach().float() for p in _params(dim, heads, dim_head, False)]
    exact = factored_attention(x, *params, heads, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = factored_attention(x, *params, heads, 0.0)
    assert fast.dtype == torch.bfloat16  # the bf16 path really ran
    assert (fast.float() - exact).abs().max() < 0.03 * exact.abs().max()


def test_factored_attention_dropout_is_on_the_attention_weights():
    dim, heads, dim_head = 16, 2, 16
    x = torch.randn(3, 5, dim)
    params = [p if p is None else p.detach().float() for p in _params(dim, heads, dim_head, False)]
    torch.manual_seed(0)
    dropped = factored_attention(x, *params, heads, 0.5)
    assert not torch.allclose(dropped, factored_attention(x, *params, heads, 0.0))
    torch.manual_seed(0)
    torch.testing.assert_close(factored_attention(x, *params, heads, 0.5), dropped, rtol=0, atol=0)


@pytest.mark.parametrize(("norm", "qkv_bias"), [("bn_ffn", False), ("ln", False), ("bn_ffn", True)])
def test_article_size_model_trains_like_the_reference(norm, qkv_bias):
    """The article's size (where the factored form runs): same logits and same gradients as the reference."""
    torch.manual_seed(0)
    reference = ReferenceViT(bn_ffn=norm == "bn_ffn", depth=2, qkv_bias=qkv_bias).double()
    model = ViT(norm=norm, depth=2, qkv_bias=qkv_bias).double()
    model.load_state_dict(bnvit.checkpoint_filter_fn(reference.state_dict()), strict=True)
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(12) % 10
    assert factored_pays(64, 8, 64, 12 * 17, 17)
    losses = [F.cross_entropy(net(x), y) for net in (reference, model)]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-12)
    for loss in losses:
        loss.backward()
    grads = {**reference.state_dict(), **{k: p.grad for k, p in reference.named_parameters()}}
    converted = bnvit.checkpoint_filter_fn(grads)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, converted[name], rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=1e-12)


def _calibrated_vitbn(depth: int = 2) -> ViTBN:
    torch.manual_seed(0)
    model = ViTBN(depth=depth).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28) * 3 + 0.5)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 64])  # standard and factored attention
def test_folded_vitbn_keeps_the_logits_in_both_attention_forms(batch):
    """The folded pre-qkv BatchNorm gives the qkv projection a bias: the factored form carries it exactly."""
    model = _calibrated_vitbn()
    folded = fold_batchnorm(model)
    assert all(block.attn.qkv.bias is not None for block in folded.blocks)
    assert factored_pays(64, 8, 64, batch * 17, 17) == (batch > 1)
    x = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-5)


def test_fx_traced_model_keeps_the_runtime_choice():
    model = ViT(norm="bn_ffn", depth=1).eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for batch in (1, 16):  # standard, then factored
            x = torch.rand(batch, 1, 28, 28)
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_the_fused_kernel_branch_equals_the_textbook_formula(monkeypatch, qkv_bias):
    """The branch taken on GPUs and when compiling or exporting: one fused attention over all heads."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dim, heads, dim_head, B, N = 24, 3, 16, 5, 9
    x = torch.randn(B, N, dim, dtype=torch.float64, requires_grad=True)
    params = _params(dim, heads, dim_head, qkv_bias)
    out = factored_attention(x, *params, heads, 0.0)
    expected = _textbook(x, *params, heads)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    leaves = [x, *[p for p in params if p is not None]]
    grads, expected_grads = (torch.autograd.grad(y.sum(), leaves) for y in (out, expected))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------- attn_impl: which form runs

IMPLS = ("standard", "factored", "auto")


def _attention_pair(norm: str, qkv_bias: bool) -> dict[str, bnvit.Attention]:
    torch.manual_seed(0)
    forms = {impl: bnvit.Attention(24, 3, 16, norm=norm, qkv_bias=qkv_bias, attn_impl=impl).double() for impl in IMPLS}
    for attn in forms.values():
        attn.load_state_dict(forms["standard"].state_dict(), strict=True)  # the same keys in every form
    return forms


@pytest.mark.parametrize(("norm", "qkv_bias"), [("ln", False), ("ln", True), ("bn", True)])
def test_attention_module_forms_agree_with_gradients(norm, qkv_bias):
    forms = _attention_pair(norm, qkv_bias)
    x = torch.randn(6, 9, 24, dtype=torch.float64)
    outputs, grads = {}, {}
    for impl, attn in forms.items():
        out = attn(x)
        out.square().sum().backward()
        outputs[impl], grads[impl] = out, {k: p.grad for k, p in attn.named_parameters()}
    for impl in ("factored", "auto"):
        torch.testing.assert_close(outputs[impl], outputs["standard"], rtol=0, atol=1e-12)
        for name, grad in grads["standard"].items():
            torch.testing.assert_close(grads[impl][name], grad, rtol=0, atol=1e-11, msg=f"{impl}: {name}")


@pytest.mark.parametrize(
    ("impl", "batch", "factored"),
    [
        ("standard", 100, False),  # where auto would take the factored form
        ("factored", 1, True),  # where auto would take the standard form
        ("auto", 1, False),
        ("auto", 100, True),
    ],
)
def test_attn_impl_picks_the_form(monkeypatch, impl, batch, factored):
    ran = []
    real = bnvit.models.attention.factored_attention
    monkeypatch.setattr(bnvit.models.attention, "factored_attention", lambda *args: ran.append(True) or real(*args))
    attn = bnvit.Attention(64, 8, 64, attn_impl=impl).eval()
    with torch.no_grad():
        attn(torch.randn(batch, 17, 64))
    assert bool(ran) is factored


def test_attn_impl_is_a_config_field_and_a_create_model_argument():
    import timm

    torch.manual_seed(0)
    standard = timm.create_model("vitbnffn_mnist", depth=2, attn_impl="standard").double().eval()
    factored = timm.create_model("vitbnffn_mnist", depth=2, attn_impl="factored").double().eval()
    assert standard.cfg.attn_impl == "standard" and standard.config["attn_impl"] == "standard"
    assert {block.attn.attn_impl for block in factored.blocks} == {"factored"}
    assert ViT().cfg.attn_impl == "auto"
    factored.load_state_dict(standard.state_dict(), strict=True)  # checkpoints load into either form
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(factored(x), standard(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"unknown attn_impl 'fast'; valid choices: 'auto', 'standard', 'factored'"):
        ViT(attn_impl="fast")
    with pytest.raises(ValueError, match=r"unknown attn_impl"):
        bnvit.Attention(64, attn_impl="textbook")
