"""The article's BatchNorm FFN inside timm's ViTs: BatchNormMlp, BNFFNBlock, to_bn_ffn, the timmvit_* names.

Models are built small (depth 2, 32x32 or 28x28 inputs) unless the point is a full-size name.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnvit
from bnvit import BatchNormFFN, BatchNormMlp, BNFFNBlock, ViT, ViTBNFFN, fold_batchnorm, to_bn_ffn
from bnvit.experiments import TRANSFER, cli, load_results
from bnvit.experiments.transfer import transfer_section, transfer_verdicts
from bnvit.models import batchnorm as bnvit_batchnorm

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def tiny_timm_vit(**kwargs) -> VisionTransformer:
    """timm's ViT, small: 32x32x3 in, 16 patches + class token, width 48, 3 heads, depth 2."""
    return VisionTransformer(**{**TINY_VIT, **kwargs})


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def trained_a_little(model: nn.Module, shape=(8, 3, 32, 32), steps: int = 3) -> nn.Module:
    """`model` after a few SGD steps in training mode, so its BatchNorm statistics are not the initial ones."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(step)) * 3 - 1
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------- BatchNormMlp


def test_batchnorm_mlp_takes_timms_mlp_arguments():
    mlp = BatchNormMlp(
        in_features=12, hidden_features=20, out_features=7, act_layer="silu", bias=(True, False), drop=(0.1, 0.2)
    )
    assert isinstance(mlp, BatchNormFFN)  # the same modules, forward and fuse()
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (12, 20, 7)
    assert mlp.fc1.bias is not None and mlp.fc2.bias is None
    assert (mlp.drop1.p, mlp.drop2.p) == (0.1, 0.2)
    assert isinstance(mlp.act, nn.SiLU) and mlp.norm.bn.num_features == 20
    default = BatchNormMlp(12)
    assert default.fc1.out_features == default.fc2.out_features == 12 and isinstance(default.act, nn.GELU)
    # Every argument timm's Mlp has, BatchNormMlp has, with the same default.
    theirs, ours = inspect.signature(Mlp).parameters, inspect.signature(BatchNormMlp).parameters
    assert [(p.name, p.default) for p in theirs.values()] == [(p.name, ours[p.name].default) for p in theirs.values()]
    half = BatchNormMlp(8, 16, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float64} and half.norm.bn.running_var.dtype == torch.float64


def test_batchnorm_mlp_normalizes_each_hidden_feature_over_batch_and_tokens():
    """LeViT's idiom written out: BatchNorm1d of fc1(x).flatten(0, -2), reshaped back; statistics too."""
    torch.manual_seed(0)
    mlp = BatchNormMlp(6, 10, out_features=4).double().train()
    bn = copy.deepcopy(mlp.norm.bn)
    x = torch.randn(3, 5, 6, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6, dtype=torch.float64) + 1.0
    h = mlp.fc1(x)
    expected = mlp.fc2(F.gelu(bn(h.flatten(0, -2)).reshape_as(h)))
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mlp.norm.bn.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(mlp.norm.bn.running_var, bn.running_var, rtol=0, atol=0)
    # Not per token: the statistics of token 0 alone would give another output.
    alone = F.batch_norm(h[:, :1].flatten(0, -2), None, None, training=True).reshape(3, 1, 10)
    assert not torch.allclose(mlp.fc2(F.gelu(alone)), mlp(x)[:, :1])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(norm_layer=nn.LayerNorm), ValueError, "norm_layer must be None, got LayerNorm"),
        (dict(use_conv=True), ValueError, "use_conv=True (NCHW maps) is not supported"),
        (dict(in_features=0), ValueError, "in_features must be an int >= 1, got 0"),
        (dict(hidden_features=2.5), TypeError, "hidden_features must be an int >= 1, got 2.5"),
        (dict(drop=1.0), ValueError, "drop[0] must be in [0, 1), got 1.0"),
        (dict(drop=(0.0, -0.1)), ValueError, "drop[1] must be in [0, 1), got -0.1"),
        (dict(bias="yes"), TypeError, "bias[0] must be a bool, got 'yes'"),
        (dict(act_layer="no_such_act"), KeyError, "no_such_act"),
        (dict(act_layer=3), TypeError, "act_layer must be an activation class or name, got 3"),
    ],
)
def test_batchnorm_mlp_refuses_bad_arguments_in_one_line(kwargs, error, message):
    with pytest.raises(error) as info:
        BatchNormMlp(**{"in_features": 8, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batchnorm_mlp_folds_into_fc1():
    mlp = trained_a_little(BatchNormMlp(6, 12), shape=(4, 5, 6))
    x = torch.randn(2, 5, 6)
    folded = fold_batchnorm(mlp)
    assert not bn_modules(folded) and isinstance(folded.norm, nn.Identity)
    torch.testing.assert_close(folded(x), mlp(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- BNFFNBlock


def test_block_takes_every_argument_timms_block_takes():
    theirs = inspect.signature(Block.__init__).parameters
    ours = inspect.signature(BNFFNBlock.__init__).parameters
    assert list(theirs) == [n for n in ours if n != "unsupported"]  # **unsupported: refused with a sentence
    same_default = [n for n in theirs if n not in ("mlp_layer", "attn_layer")]
    assert [theirs[n].default for n in same_default] == [ours[n].default for n in same_default]
    assert list(inspect.signature(Block.forward).parameters) == list(inspect.signature(BNFFNBlock.forward).parameters)


def test_create_model_with_block_fn_gives_the_articles_form():
    model = timm.create_model("vit_small_patch16_224", block_fn=BNFFNBlock).eval()
    assert len(model.blocks) == 12 and all(isinstance(b, BNFFNBlock) for b in model.blocks)
    block = model.blocks[0]
    assert not hasattr(block, "norm2") and isinstance(block.norm1, nn.LayerNorm)
    assert type(block.attn) is timm.layers.Attention and block.attn.head_dim == 64
    assert isinstance(block.mlp, BatchNormMlp) and block.mlp.fc1.out_features == 4 * 384
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)


def test_block_is_timms_block_without_the_norm_before_the_ffn():
    """BNFFNBlock computes what timm's Block computes with norm2 removed and the BatchNorm FFN as its MLP."""
    torch.manual_seed(0)
    ours = BNFFNBlock(16, 4, mlp_ratio=2.0, qkv_bias=True, init_values=0.5).train()
    theirs = Block(16, 4, mlp_ratio=2.0, qkv_bias=True, init_values=0.5).train()
    theirs.norm2 = nn.Identity()
    theirs.mlp = copy.deepcopy(ours.mlp)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    by_hand = x + ours.ls1(ours.attn(ours.norm1(x)))
    torch.testing.assert_close(ours(x), by_hand + ours.ls2(ours.mlp(by_hand)), rtol=1e-6, atol=1e-6)


def test_block_honours_timms_options():
    block = BNFFNBlock(
        24,
        num_heads=3,
        mlp_ratio=3.0,
        qkv_bias=True,
        qk_norm=True,
        proj_bias=False,
        proj_drop=0.1,
        attn_drop=0.2,
        init_values=1e-3,
        drop_path=0.3,
        act_layer=nn.SiLU,
        depth=5,
    )
    assert block.attn.qkv.bias is not None and block.attn.proj.bias is None
    assert isinstance(block.attn.q_norm, nn.LayerNorm) and block.attn.attn_drop.p == 0.2
    assert torch.equal(block.ls1.gamma, torch.full((24,), 1e-3)) and torch.equal(block.ls2.gamma, block.ls1.gamma)
    assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == 0.3
    assert block.mlp.fc1.out_features == 72 and block.mlp.fc1.bias is None and isinstance(block.mlp.act, nn.SiLU)
    assert block.mlp.drop1.p == block.mlp.drop2.p == 0.1
    plain = BNFFNBlock(24, 3)
    assert isinstance(plain.ls1, nn.Identity) and isinstance(plain.drop_path1, nn.Identity)
    diff = BNFFNBlock(24, 4, attn_layer="diff", depth=3)  # an attention that takes the block's depth
    assert type(diff.attn).__name__ == "DiffAttention" and diff(torch.randn(2, 5, 24)).shape == (2, 5, 24)
    custom = type("MyBatchNormMlp", (BatchNormMlp,), {})
    assert type(BNFFNBlock(24, 3, mlp_ratio=2.0, mlp_layer=custom).mlp) is custom


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scale_mlp_norm=True), "scale_mlp_norm must be False, got True"),
        (dict(mlp_layer=SwiGLU), "mlp_layer=SwiGLU is not one"),
        (dict(mlp_layer=SwiGLUPacked), "mlp_layer=partial(GluMlp) is not one"),
        (dict(attn_layer="flash"), "unknown attn_layer 'flash'; valid names: '', 'attn', 'diff'"),
        (dict(drop_path=1.5), "drop_path must be in [0, 1), got 1.5"),
        (dict(mlp_ratio=0), "mlp_ratio must be a finite number > 0, got 0"),
    ],
)
def test_block_refuses_what_is_not_the_articles_form(kwargs, message):
    with pytest.raises(ValueError) as info:
        BNFFNBlock(16, 4, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_attn_mask_reaches_the_attention():
    """A token hidden by the mask does not change the class token's output (in eval mode the BatchNorm is per token)."""
    model = trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock, global_pool="token"))
    x = torch.rand(2, 3, 32, 32)
    other = x.clone()
    other[:, :, 24:, 24:] = 1.0 - other[:, :, 24:, 24:]  # only the last patch differs
    mask = torch.ones(17, 17, dtype=torch.bool)
    mask[:, -1] = False  # no token attends to the last patch
    mask[-1, -1] = True  # ... but itself, so that its row is not empty
    torch.testing.assert_close(model(x, attn_mask=mask), model(other, attn_mask=mask), rtol=0, atol=1e-6)
    assert not torch.allclose(model(x), model(other), atol=1e-4)
    features = model.forward_intermediates(x, attn_mask=mask, intermediates_only=True)
    assert len(features) == 2


def test_forward_intermediates_and_features_only():
    model = trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock))
    x = torch.rand(2, 3, 32, 32)
    final, feats = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [f.shape for f in feats] == [(2, 48, 4, 4)] * 2
    backbone = timm.create_model(
        "vit_tiny_patch16_224", block_fn=BNFFNBlock, img_size=32, depth=3, features_only=True, out_indices=(0, 2)
    ).eval()
    maps = backbone(x)
    assert [m.shape for m in maps] == [(2, 192, 2, 2)] * 2
    assert [info["module"] for info in backbone.feature_info.get_dicts()] == ["blocks.0", "blocks.2"]


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1234)  # the same dropout and drop-path draws in both runs
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_grad_checkpointing_keeps_batchnorm_statistics_exact(reentrant, monkeypatch):
    """timm's set_grad_checkpointing (checkpoint_seq, no context_fn) updates the statistics once per step."""
    monkeypatch.setattr("timm.models._manipulate.use_reentrant_ckpt", lambda: reentrant)  # timm's setting
    model = tiny_timm_vit(block_fn=BNFFNBlock, drop_path_rate=0.2, proj_drop_rate=0.1).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    opt, opt_ckpt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ckpt))
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    for step in range(2):
        if step:
            for o in (opt, opt_ckpt):
                o.step()
                o.zero_grad()
        torch.testing.assert_close(_step(ckpt, x, y), _step(model, x, y), rtol=0, atol=0)
    assert len(calls) == 4  # forward and recomputation, twice: checkpointing really ran
    for (name, b), b_ckpt in zip(model.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b_ckpt, b, rtol=0, atol=0, msg=name)
    assert all(int(bn.num_batches_tracked) == 2 for bn in bn_modules(ckpt))
    for (name, p), p_ckpt in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p_ckpt.grad, p.grad, rtol=0, atol=1e-7, msg=name)


def test_without_the_recomputation_check_checkpointing_would_double_count(monkeypatch):
    """Control for the test above: the recomputation does run the BatchNorm a second time."""
    monkeypatch.setattr(bnvit_batchnorm, "in_recomputation", lambda: False)
    model = tiny_timm_vit(block_fn=BNFFNBlock).train()
    model.set_grad_checkpointing(True)
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert all(int(bn.num_batches_tracked) == 2 for bn in bn_modules(model))


def test_torch_fx_feature_extraction():
    from timm.models import create_feature_extractor  # timm's, with its leaf modules

    model = trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock))
    x = torch.rand(2, 3, 32, 32)
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "last", "head": "logits"})
    out = extractor(x)
    torch.testing.assert_close(out["logits"], model(x))
    torch.testing.assert_close(out["last"], model.blocks(model._pos_embed(model.patch_embed(x))))
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))


def test_fold_batchnorm_leaves_no_batchnorm_and_the_same_logits():
    model = trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock, init_values=0.1))
    folded = fold_batchnorm(model)
    assert bn_modules(model) and not bn_modules(folded)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_export():
    model = fold_batchnorm(trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock)))
    x = torch.rand(3, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(program.module()(x[:2]), model(x[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_in_training_and_in_eval():
    """Compiled, a training step updates the statistics as eager does, and eval gives the same logits."""
    torch.manual_seed(0)
    eager = tiny_timm_vit(block_fn=BNFFNBlock).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    for b, b_eager in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, b_eager, rtol=1e-5, atol=1e-6)
    eager.eval(), model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_without_batchnorm(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = trained_a_little(tiny_timm_vit(block_fn=BNFFNBlock))
    path = bnvit.export_onnx(model, tmp_path / "bnffn.onnx", example_input=torch.rand(2, 3, 32, 32))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "LayerNormalization" in ops  # the attention's pre-norms stay
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32)
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- to_bn_ffn


def _kept_and_new(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], dropped: str, added: str):
    """Check the conversion's state dict: every key but the dropped norms kept as the same tensor, BatchNorms added."""
    kept = {k for k in before if dropped not in k}
    assert kept <= after.keys()
    for key in kept:
        assert after[key].data_ptr() == before[key].data_ptr() and torch.equal(after[key], before[key]), key
    new = after.keys() - kept
    buffers = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    blocks = {k.split(".")[1] for k in before if k.startswith("blocks.")}
    assert new == {f"blocks.{i}.{added}.{b}" for i in blocks for b in buffers}
    for key in new:
        expected = {"weight": 1.0, "running_var": 1.0}.get(key.rsplit(".", 1)[1], 0.0)
        assert torch.all(after[key] == expected), key  # initialised as a BatchNorm starting to train
    return kept


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_to_bn_ffn_keeps_every_weight_of_a_timm_vit(name):
    model = timm.create_model(name, pretrained=False).eval()
    before = dict(model.state_dict(keep_vars=True))
    assert to_bn_ffn(model) is model
    after = dict(model.state_dict(keep_vars=True))
    kept = _kept_and_new(before, after, dropped=".norm2.", added="mlp.norm.bn")
    assert {k.split(".")[2] for k in kept if k.startswith("blocks.")} == {"norm1", "attn", "mlp"}
    assert all(isinstance(b, BNFFNBlock) and not b.training for b in model.blocks)
    # The converted model is exactly the one timm builds with block_fn=BNFFNBlock.
    twin = timm.create_model(name, pretrained=False, block_fn=BNFFNBlock).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)


def test_to_bn_ffn_keeps_layer_scale_activation_and_dropouts():
    gelu_tanh = functools.partial(nn.GELU, approximate="tanh")  # an activation with a setting of its own
    model = tiny_timm_vit(init_values=0.3, act_layer=gelu_tanh, proj_drop_rate=0.1, drop_path_rate=0.2)
    blocks = list(model.blocks)
    parts = [(b.ls1, b.ls2, b.drop_path1, b.drop_path2, b.mlp.act, b.mlp.drop1, b.mlp.fc1, b.mlp.fc2) for b in blocks]
    to_bn_ffn(model)
    for block, (ls1, ls2, dp1, dp2, act, drop1, fc1, fc2) in zip(model.blocks, parts, strict=True):
        assert block.ls1 is ls1 and block.ls2 is ls2 and block.drop_path1 is dp1 and block.drop_path2 is dp2
        assert block.mlp.act is act and act.approximate == "tanh" and block.mlp.drop1 is drop1
        assert block.mlp.fc1 is fc1 and block.mlp.fc2 is fc2 and block.mlp.norm.bn.training


def test_to_bn_ffn_converts_a_layernorm_bnvit_vit():
    model = ViT(norm="ln", depth=2).eval()
    before = dict(model.state_dict(keep_vars=True))
    to_bn_ffn(model)
    after = dict(model.state_dict(keep_vars=True))
    _kept_and_new(before, after, dropped=".ffn.norm.", added="ffn.norm.bn")
    assert model.cfg.norm == "bn_ffn" and model.config["norm"] == "bn_ffn"
    assert all(type(b.ffn) is BatchNormFFN for b in model.blocks)
    twin = ViTBNFFN(depth=2).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    assert not bn_modules(fold_batchnorm(model))


def test_converted_model_fine_tunes_and_folds():
    model = to_bn_ffn(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3))
    model = trained_a_little(model)
    assert all(int(bn.num_batches_tracked) == 3 for bn in bn_modules(model))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fold_batchnorm(model)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: ViTBNFFN(depth=1), ValueError, "norm='bn_ffn', already in the article's form"),
        (lambda: ViT(norm="bn", depth=1), ValueError, "norm='bn', a ViTBN"),
        (lambda: to_bn_ffn(tiny_timm_vit()), ValueError, "already in the article's form (blocks.0 is a"),
        (lambda: tiny_timm_vit(block_fn=ResPostBlock), ValueError, "blocks.0 is a timm.models.vision_transformer"),
        (lambda: tiny_timm_vit(mlp_layer=SwiGLUPacked), ValueError, "blocks.0.mlp is a GluMlp"),
        (lambda: tiny_timm_vit(scale_mlp_norm=True), ValueError, "blocks.0.mlp has a norm inside"),
        (lambda: nn.Linear(3, 3), TypeError, "got Linear"),
        (lambda: torch.compile(tiny_timm_vit()), TypeError, "got OptimizedModule"),
    ],
)
def test_to_bn_ffn_refuses_what_it_cannot_convert(build, error, message):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        to_bn_ffn(model)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert model.state_dict().keys() == before.keys()  # nothing changed


def test_to_bn_ffn_changes_nothing_when_a_later_block_is_refused():
    model = tiny_timm_vit(depth=3)
    model.blocks[2] = ResPostBlock(48, 3)
    first = model.blocks[0]
    with pytest.raises(ValueError, match=r"blocks\.2 is a"):
        to_bn_ffn(model)
    assert model.blocks[0] is first and type(first) is Block


# ---------------------------------------------------------------------------- timmvitln_mnist, timmvitbnffn_mnist


@pytest.mark.parametrize(("name", "block"), [("timmvitln_mnist", Block), ("timmvitbnffn_mnist", BNFFNBlock)])
def test_timmvit_names_build_timms_vit_at_the_articles_scale(name, block):
    model = timm.create_model(name, depth=4)
    assert type(model) is VisionTransformer and len(model.blocks) == 4
    assert all(type(b) is block for b in model.blocks)
    attn = model.blocks[0].attn
    assert (model.embed_dim, attn.num_heads, attn.head_dim, attn.qkv.bias) == (64, 4, 16, None)
    assert model.patch_embed.patch_size == (7, 7) and model.pos_embed.shape == (1, 17, 64)
    assert model.blocks[0].mlp.fc1.out_features == 128 and model.global_pool == "token"
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert len(timm.create_model(name).blocks) == 6
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)


def test_timmvit_model_cards_say_which_blocks():
    from bnvit.weights.hub import model_card, model_stats

    assert "BNFFNBlock" in model_card("timmvitbnffn_mnist")["description"]
    assert "timm's LayerNorm Block" in model_card("timmvitln_mnist")["description"]
    assert model_stats("timmvitln_mnist")["Params (M)"] == 0.2


def test_timmvit_names_refuse_weights_they_do_not_have_and_another_block():
    with pytest.raises(ValueError, match="ships no trained weights; build it with pretrained=False"):
        timm.create_model("timmvitbnffn_mnist", pretrained=True)
    with pytest.raises(ValueError, match="fixes block_fn=BNFFNBlock"):
        timm.create_model("timmvitbnffn_mnist", block_fn=Block)


def test_layer_norm_and_batchnorm_twins_differ_only_in_the_ffn_norm():
    ln, bn = (timm.create_model(n, depth=2).state_dict() for n in ("timmvitln_mnist", "timmvitbnffn_mnist"))
    assert {k for k in ln if ".norm2." not in k} == {k for k in bn if ".mlp.norm." not in k}
    extra = sum(v.numel() for k, v in bn.items() if ".mlp.norm.bn." in k and v.is_floating_point())
    assert extra == 2 * 4 * 128  # per block: weight, bias, running mean and variance of 128 features
    assert math.isclose(sum(v.numel() for k, v in ln.items() if ".norm2." in k), 2 * 2 * 64)


# ---------------------------------------------------------------------------- the transfer study


def _result(model: str, depth: int, lr: float, seed: int, accs: list[float]) -> dict:
    records = [
        dict(epoch=i + 1, train_loss=1.0, train_acc=a, val_loss=1.0, val_acc=a, lr=lr, seconds=1.0, images_per_sec=1.0)
        for i, a in enumerate(accs)
    ]
    key = f"{model}-d{depth}-lr{lr:g}-s{seed}"
    history = dict(records=records, diverged_at=None, diverged_step=None, meta={})
    cell = dict(model=model, depth=depth, lr=lr, seed=seed)
    return dict(key=key, cell=cell, settings=dict(epochs=len(accs)), history=history, clean_test_acc=0.9)


def test_transfer_study_is_declared_as_asked():
    assert TRANSFER.models == ("timmvit_mnist", "timmvit_bnffn_mnist")
    assert TRANSFER.grid == {0.003: (4, 6), 0.005: (4, 6)} and TRANSFER.seeds == 10  # the ten-seed transfer protocol
    assert len(TRANSFER.cells(seeds=TRANSFER.seeds)) == 80
    settings = TRANSFER.settings
    assert (settings.epochs, settings.augment, settings.train_subset, settings.precision) == (10, "fast", None, "fp32")
    args = cli.build_parser(TRANSFER).parse_args(["--quick"])
    assert cli._grid_from_args(TRANSFER, args) == {0.003: (4,), 0.005: (4,)}
    assert cli._settings_from_args(TRANSFER, args).epochs == 3


def _transfer_results(gaps_by_cell: dict[tuple[float, int], list[float]]) -> list[dict]:
    """Two-epoch results whose BN-FFN model is ahead by `gap` points at both epochs of each seed."""
    results = []
    for (lr, depth), gaps in gaps_by_cell.items():
        for seed, gap in enumerate(gaps):
            results.append(_result("timmvit_mnist", depth, lr, seed, [0.60, 0.70]))
            results.append(_result("timmvit_bnffn_mnist", depth, lr, seed, [0.60 + gap / 100, 0.70 + gap / 100]))
    return results


AHEAD = [4.0, 6.0, 5.0, 7.0, 3.0, 5.5, 6.5, 4.5, 5.0, 6.0]  # mean +5.25, clearly shown above 0


def test_transfer_verdicts_follow_the_protocol():
    """Ahead shown in the three 'clearly ahead' cells and behind nowhere: it carries over."""
    level = [0.5, -0.5, 1.0, -1.0, 0.0, 0.3, -0.3, 0.2, -0.2, 0.1]
    results = _transfer_results({(0.003, 4): level, (0.003, 6): AHEAD, (0.005, 4): AHEAD, (0.005, 6): AHEAD})
    cells, verdict, undecided = transfer_verdicts(results, TRANSFER.models)
    by_cell = {(c.lr, c.depth): c for c in cells}
    assert verdict == "carries over" and undecided == []
    assert by_cell[(0.003, 4)].shown == "neither" and by_cell[(0.003, 4)].carries == "carries over"
    ahead = by_cell[(0.005, 6)]
    assert ahead.shown == "ahead" and ahead.seeds == list(range(10))
    assert ahead.gaps == pytest.approx(AHEAD)
    # Holm over four cells: the three equal smallest p-values are multiplied by 4, 3 and 2, then made monotone.
    assert ahead.p_ahead_holm == pytest.approx(4 * ahead.p_ahead, rel=1e-6)
    assert 1.0 >= ahead.power[1] >= ahead.power[0] > 0.9  # a spread of 1.3 points: +5 is all but certain to show


def test_transfer_verdicts_count_a_cell_behind_against_and_name_the_undecided():
    behind = [-g for g in AHEAD]
    noisy = [8.0, -6.0, 5.0, -4.0, 7.0, -5.0, 6.0, -3.0, 4.0, -2.0]
    results = _transfer_results({(0.003, 4): AHEAD, (0.003, 6): noisy, (0.005, 4): AHEAD, (0.005, 6): AHEAD})
    assert transfer_verdicts(results, TRANSFER.models)[1:] == ("inconclusive", ["lr 0.003 depth 6"])
    results = _transfer_results({(0.003, 4): behind, (0.003, 6): AHEAD, (0.005, 4): AHEAD, (0.005, 6): AHEAD})
    cells, verdict, _ = transfer_verdicts(results, TRANSFER.models)
    assert verdict == "does not carry over"
    assert [c.carries for c in cells if (c.lr, c.depth) == (0.003, 4)] == ["counts against"]


def test_transfer_section_says_when_it_is_provisional():
    results = _transfer_results({(0.003, 4): AHEAD[:3], (0.003, 6): AHEAD[:3], (0.005, 4): AHEAD[:3]})
    lines = transfer_section(results, TRANSFER.models, planned=10)
    assert any("provisional" in line for line in lines)
    (row,) = [line for line in lines if line.startswith("| lr 0.005, depth 6")]
    assert "| 0 |" in row  # not run yet: no seeds


@pytest.mark.slow
def test_transfer_example_quick_run_writes_results_figures_and_verdicts(mnist_root, tmp_path, capsys):
    out = tmp_path / "transfer"
    tiny = ["--train-subset", "200", "--test-subset", "100", "--no-progress", "--no-download", "--device", "cpu"]
    assert cli.run_cli(TRANSFER, ["--quick", "--epochs", "1", "--seeds", "1", "--out", str(out), *tiny]) == 0
    results = load_results(out)
    assert sorted(r["key"] for r in results) == sorted(c.key for c in TRANSFER.cells(TRANSFER.quick_grid, 1))
    for figure in ("depths_lr0.003.png", "depths_lr0.005.png", "lr_comparison.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "## The protocol's verdicts" in report and "(provisional: not every cell has its ten seeds yet)" in report
    assert "| lr 0.003, depth 4 | comparable | 1 |" in report  # one seed: nothing tested yet
    assert "estimated time" in capsys.readouterr().out


def test_block_speed_benchmark_runs_at_a_tiny_size(tmp_path):
    """The benchmark runs end to end (and checks that the folded stack equals the unfolded one); no timing asserted."""
    import block_speed  # benchmarks/, on the path through conftest.py

    result = block_speed.main(["--smoke", "--json", str(tmp_path / "speed.json")])
    assert set(result["batches"]) == {"batch 1", "batch 4"}
    for row in result["batches"].values():
        assert row["timm_ms"] > 0 and row["folded_ms"] > 0 and row["ratio_paired"] > 0 and row["rounds"] == 2
    assert json.loads((tmp_path / "speed.json").read_text())["size"] == block_speed.PRESETS["smoke"]
