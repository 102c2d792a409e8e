"""The ViT model: shapes, sizes, embeddings, initialization, timm's model API, and equality with the reference."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnvit
from bnvit import EncoderBlock, TokenBatchNorm, ViT, ViTBN, ViTBNFFN
from reference_vit import ReferenceViT

SMALL = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)


def _bn_modules(model: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# ---------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "out_shape", "tokens"),
    [
        (dict(norm="bn_ffn"), (3, 1, 28, 28), (3, 10), 17),
        (dict(norm="ln", img_size=32, patch_size=4, in_chans=3), (2, 3, 32, 32), (2, 10), 65),
        (dict(norm="bn", pool="mean", num_classes=7), (2, 1, 28, 28), (2, 7), 17),
        (dict(norm="bn_ffn", pos_embed="sincos", img_size=(28, 14)), (2, 1, 28, 14), (2, 10), 9),
        (dict(norm="ln", num_classes=0), (2, 1, 28, 28), (2, 16), 17),
    ],
    ids=["mnist", "cifar", "mean-pool", "sincos-nonsquare", "features"],
)
def test_output_shapes(kwargs, x_shape, out_shape, tokens):
    model = ViT(depth=1, **SMALL, **kwargs)
    x = torch.rand(*x_shape)
    assert model(x).shape == out_shape
    assert model.forward_features(x).shape == (x_shape[0], tokens, 16)
    assert model.num_tokens == tokens
    if kwargs.get("num_classes") == 0:
        assert isinstance(model.head, nn.Identity)
        assert model.num_classes == 0


@pytest.mark.parametrize(("norm", "count"), [("ln", 893_164), ("bn_ffn", 893_932)])
def test_parameter_counts_of_the_article_config(norm, count):
    model = ViT(norm=norm, depth=6)
    assert sum(p.numel() for p in model.parameters()) == count
    name = {"ln": "vitln_mnist", "bn_ffn": "vitbnffn_mnist"}[norm]
    assert sum(p.numel() for p in timm.create_model(name).parameters()) == count
    reference = ReferenceViT(bn_ffn=norm == "bn_ffn", depth=6)
    assert sum(p.numel() for p in reference.parameters()) == count


# ---------------------------------------------------------------------------- embeddings


def test_sincos_embedding_matches_formula():
    dim, img = 8, (21, 14)
    model = ViT(depth=1, img_size=img, patch_size=7, dim=dim, heads=2, dim_head=4, mlp_dim=8, pos_embed="sincos")
    num_tokens = 3 * 2 + 1
    half = dim // 2
    expected = torch.zeros(1, num_tokens, dim, dtype=torch.float64)
    for t in range(num_tokens):
        for i in range(1, half + 1):
            w = 10000.0 ** (-i / half)
            expected[0, t, i - 1] = math.sin(t * w)
            expected[0, t, half + i - 1] = math.cos(t * w)
    assert model.pos_embed.shape == (1, num_tokens, dim)
    torch.testing.assert_close(model.pos_embed.double(), expected, rtol=0, atol=1e-6)
    # Fixed: not a parameter, not trained.
    assert all(p is not model.pos_embed for p in model.parameters())
    assert "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(bnvit.models.vit.sincos_pos_embed(num_tokens, dim).double(), expected, rtol=0, atol=1e-6)


def test_sincos_embedding_is_added_to_tokens():
    model = ViT(depth=1, **SMALL, pos_embed="sincos").eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(2, 1, 28, 28)
    model(x)
    patches = model.patch_embed(x)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + model.pos_embed
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


def test_patch_flattening_order_is_row_column_channel():
    p, C, H, W = 2, 2, 4, 6
    model = ViT(depth=1, img_size=(H, W), patch_size=p, in_chans=C, **SMALL)
    seen = []
    model.patch_embed.pre_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    img = torch.arange(C * H * W, dtype=torch.float32).reshape(1, C, H, W)
    model(img)
    patches = seen[0]
    assert patches.shape == (1, (H // p) * (W // p), p * p * C)
    for gr in range(H // p):
        for gc in range(W // p):
            hand = [img[0, ch, gr * p + r, gc * p + c].item() for r in range(p) for c in range(p) for ch in range(C)]
            n = gr * (W // p) + gc  # patches in row-major grid order
            assert patches[0, n].tolist() == hand


# ---------------------------------------------------------------------------- initialization


def test_reference_initialization():
    model = ViT(depth=2, weight_init="reference")
    pos = model.pos_embed.detach()
    assert 0.9 < pos.std() < 1.1 and abs(pos.mean()) < 0.1
    cls = model.cls_token.detach()
    assert 0.7 < cls.std() < 1.3 and cls.abs().max() > 1.5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 + 2 * 4  # patch proj, head, and qkv, proj, fc1, fc2 per block
    for lin in linears:
        bound = 1 / math.sqrt(lin.in_features)  # PyTorch's default (kaiming_uniform with a=sqrt(5))
        w = lin.weight.detach()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        if lin.bias is not None:
            assert lin.bias.abs().max() <= bound
            assert lin.bias.abs().max() > 0.5 * bound
    for norm in model.modules():
        if isinstance(norm, nn.LayerNorm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    for bn in _bn_modules(model):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_timm_initialization_differs_from_reference():
    model = ViT(depth=1, weight_init="timm")
    assert model.pos_embed.std() < 0.05
    assert model.cls_token.abs().max() < 1e-3
    for lin in (m for m in model.modules() if isinstance(m, nn.Linear)):
        assert lin.weight.std() < 0.03
        if lin.bias is not None:
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))


# ---------------------------------------------------------------------------- the aliases


@pytest.mark.parametrize(("cls", "norm"), [(ViTBNFFN, "bn_ffn"), (ViTBN, "bn")])
def test_aliases_are_vit_with_fixed_norm(cls, norm):
    assert issubclass(cls, ViT)
    assert cls.forward is ViT.forward and cls.forward_features is ViT.forward_features
    model = cls(depth=1, **SMALL)
    assert isinstance(model, ViT)
    assert model.config["norm"] == norm
    assert all(type(b.ffn).__name__ == "BatchNormFFN" for b in model.blocks)
    assert cls(depth=1, norm=norm, **SMALL).config["norm"] == norm
    other = "ln"
    with pytest.raises(ValueError, match=rf"norm='{other}'.*{norm}|{norm}.*norm='{other}'"):
        cls(depth=1, norm=other)


def test_vitbn_has_no_layernorm_and_bn_ffn_keeps_attention_layernorm():
    vitbn = ViTBN(depth=2, **SMALL)
    assert not any(isinstance(m, nn.LayerNorm) for m in vitbn.modules())
    assert isinstance(vitbn.patch_embed.pre_norm, TokenBatchNorm)
    assert isinstance(vitbn.patch_embed.norm, TokenBatchNorm)
    assert isinstance(vitbn.norm, TokenBatchNorm)
    bnffn = ViTBNFFN(depth=2, **SMALL)
    assert isinstance(bnffn.norm, nn.LayerNorm)
    assert isinstance(bnffn.patch_embed.pre_norm, nn.LayerNorm)
    assert all(isinstance(b.attn.norm, nn.LayerNorm) for b in bnffn.blocks)
    assert len(_bn_modules(bnffn)) == 2


# ---------------------------------------------------------------------------- timm model API


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_features_and_head(pool):
    model = ViT(depth=1, **SMALL, pool=pool).eval()
    x = torch.rand(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (3, 17, 16)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (3, 16)
    torch.testing.assert_close(pooled, feats[:, 0] if pool == "cls" else feats.mean(1))
    torch.testing.assert_close(model.forward_head(feats), model(x))
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
    assert model.num_features == 16


def test_get_and_reset_classifier():
    model = ViT(depth=1, **SMALL).eval()
    x = torch.rand(2, 1, 28, 28)
    head = model.get_classifier()
    assert head is model.head and isinstance(head, nn.Linear) and head.out_features == 10

    model.reset_classifier(5)
    assert model.get_classifier() is not head and model.num_classes == 5
    assert model(x).shape == (2, 5)

    feats = model.forward_features(x)
    # timm's "avg" excludes the CLS token; the article's "mean" includes it
    for name, pooled in (("avg", feats[:, 1:].mean(1)), ("mean", feats.mean(1)), ("token", feats[:, 0])):
        model.reset_classifier(3, global_pool=name)
        assert model.pool == ("cls" if name == "token" else name)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
        assert model(x).shape == (2, 3)
    assert not torch.allclose(feats[:, 1:].mean(1), feats.mean(1))
    model.reset_classifier(3, global_pool="")  # no pooling: the head on every token, as timm's ""
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats)
    assert model(x).shape == (2, 17, 3)
    model.reset_classifier(3, global_pool="token")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])

    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, 16)

    with pytest.raises(ValueError, match=r"'max'.*'cls', 'avg', 'mean', ''"):
        model.reset_classifier(3, global_pool="max")
    assert model.pool == "cls" and model.num_classes == 0


def test_no_weight_decay_names_parameters_excluded_by_timm_optimizer():
    model = ViT(depth=1, **SMALL)
    names = model.no_weight_decay()
    assert names == {"cls_token", "pos_embed"}
    assert names <= dict(model.named_parameters()).keys()
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(model.cls_token)] == 0.0
    assert decay_of[id(model.pos_embed)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_group_matcher_with_timm_group_parameters():
    model = ViT(depth=3, **SMALL)
    groups = group_parameters(model, model.group_matcher())
    order = sorted(groups)
    group_of = {name: g for g, names in groups.items() for name in names}
    assert sorted(group_of) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    stem = group_of["cls_token"]
    assert group_of["pos_embed"] == stem == group_of["patch_embed.proj.weight"] == order[0]
    block_groups = [group_of[f"blocks.{i}.attn.qkv.weight"] for i in range(3)]
    assert stem < block_groups[0] < block_groups[1] < block_groups[2]
    for i in range(3):
        assert {g for n, g in group_of.items() if n.startswith(f"blocks.{i}.")} == {block_groups[i]}
    assert group_of["head.weight"] == order[-1] > block_groups[-1]


def test_create_optimizer_v2_with_layer_decay():
    model = ViT(depth=2, **SMALL)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert len(scale_of) == len(list(model.parameters()))
    stem = scale_of[id(model.cls_token)]
    b0, b1 = scale_of[id(model.blocks[0].ffn.fc1.weight)], scale_of[id(model.blocks[1].ffn.fc1.weight)]
    head = scale_of[id(model.head.weight)]
    assert stem < b0 < b1 < head == 1.0
    assert b0 == pytest.approx(b1 * 0.5)
    loss = F.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    before = model.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.head.weight)


def _loss_and_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1234)  # same dropout / drop-path draws for both runs
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("norm", ["bn_ffn", "bn", "ln"])
def test_grad_checkpointing_is_exact_including_batchnorm_stats(norm):
    model = ViT(depth=2, **SMALL, norm=norm, drop_path_rate=0.2, drop_rate=0.1).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not model.grad_checkpointing
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ckpt = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    for step in range(2):
        if step:  # a training step in between: the second pass runs on updated weights
            opt.step()
            opt_ckpt.step()
            opt.zero_grad()
            opt_ckpt.zero_grad()
        loss = _loss_and_backward(model, x, y)
        loss_ckpt = _loss_and_backward(ckpt, x, y)
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert len(calls) == 4  # forward + recomputation in backward, twice: checkpointing really ran
    for (name, p), p_ckpt in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p_ckpt, p, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(p_ckpt.grad, p.grad, rtol=0, atol=1e-7, msg=name)
    for (name, b), b_ckpt in zip(model.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(b_ckpt[1], b, rtol=0, atol=0, msg=name)
    if norm != "ln":
        assert all(int(bn.num_batches_tracked) == 2 for bn in _bn_modules(ckpt))


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpointing_is_exact_too(reentrant):
    """Without bnvit's context_fn (timm's checkpoint passes none) the recomputation is recognised as well."""
    block = EncoderBlock(16, 2, 8, 32, norm="bn_ffn").train()
    plain = copy.deepcopy(block)
    x = torch.randn(4, 5, 16, requires_grad=True)
    block(x).sum().backward()
    checkpoint(plain, x, use_reentrant=reentrant).sum().backward()
    for b, b_plain in zip(block.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b_plain, b, rtol=0, atol=0)


def test_naive_checkpointing_would_double_count_batchnorm_stats(monkeypatch):
    """Control for the tests above: were the recomputation not recognised, the running statistics would differ."""
    monkeypatch.setattr(bnvit.models.batchnorm, "in_recomputation", lambda: False)
    block = EncoderBlock(16, 2, 8, 32, norm="bn_ffn").train()
    naive = copy.deepcopy(block)
    x = torch.randn(4, 5, 16, requires_grad=True)
    block(x).sum().backward()
    checkpoint(naive, x, use_reentrant=False).sum().backward()
    assert int(naive.ffn.norm.bn.num_batches_tracked) == 2
    assert not torch.allclose(naive.ffn.norm.bn.running_mean, block.ffn.norm.bn.running_mean)


@pytest.mark.slow
def test_drop_path_trains():
    model = ViT(depth=3, **SMALL, norm="bn_ffn", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for b in model.blocks[1:]]
    assert rates == pytest.approx([0.15, 0.3])
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic depth is active
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    initial = F.cross_entropy(model(x), y).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    model.eval()
    assert F.cross_entropy(model(x), y).item() < 0.6 * initial


def _compile_check(backend: str) -> None:
    model = ViT(depth=1, **SMALL, norm="bn_ffn").train()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    out = model(x)
    F.cross_entropy(out, y).backward()
    out_c = compiled(x)
    F.cross_entropy(out_c, y).backward()
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-4)
    for (name, p), p_c in zip(model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=0, atol=1e-4, msg=name)
    for b, b_c in zip(model.buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b_c, b, rtol=0, atol=1e-5)
    compiled.eval()
    torch.testing.assert_close(compiled(x), model.eval()(x), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_smoke_aot_eager():
    """Dynamo tracing and AOT autograd, without the slow C++ code generation."""
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_smoke_inductor():
    _compile_check("inductor")


# ---------------------------------------------------------------------------- the reference implementation


def _reference_pair(norm: str, qkv_bias: bool) -> tuple[ReferenceViT, ViT]:
    reference = ReferenceViT(bn_ffn=norm == "bn_ffn", depth=2, qkv_bias=qkv_bias, **SMALL)
    _randomize_norms(reference)
    model = ViT(norm=norm, depth=2, qkv_bias=qkv_bias, **SMALL)
    model.load_state_dict(bnvit.checkpoint_filter_fn(reference.state_dict()), strict=True)
    return reference, model


@pytest.mark.parametrize(("norm", "qkv_bias"), [("bn_ffn", False), ("bn_ffn", True), ("ln", False)])
def test_identical_to_reference_implementation(norm, qkv_bias):
    reference, model = _reference_pair(norm, qkv_bias)
    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(model.train()(x), reference.train()(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=1e-5)

    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    initial_head = model.head.weight.detach().clone()
    reference.train()
    model.train()
    for _ in range(3):
        batch = torch.rand(6, 1, 28, 28)
        for net, opt_ in ((reference, opt_ref), (model, opt)):
            opt_.zero_grad()
            F.cross_entropy(net(batch), y).backward()
            opt_.step()
    assert (model.head.weight - initial_head).abs().max() > 1e-3  # the weights did move
    converted = bnvit.checkpoint_filter_fn(reference.state_dict())
    state = model.state_dict()
    assert converted.keys() == state.keys()
    for key, value in converted.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=1e-5)
