"""The building blocks, checked against computations written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnvit import Attention, BatchNormFFN, EncoderBlock, FeedForward, TokenBatchNorm

EPS = 1e-5
MOMENTUM = 0.1


def _tokens(b: int = 4, n: int = 5, c: int = 6, dtype=torch.float64) -> torch.Tensor:
    """Token tensor whose statistics differ per token and per feature, so that wrong axes show."""
    x = torch.randn(b, n, c, dtype=dtype)
    return x * torch.linspace(0.5, 3.0, c, dtype=dtype) + torch.arange(n, dtype=dtype)[:, None] * 2.0 - 1.0


def _randomize_bn(bn: nn.BatchNorm1d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _batch_norm_train(x: torch.Tensor, weight, bias, running_mean, running_var):
    """Per-feature batch norm over every axis but the last, by hand.

    Returns the output and the expected running statistics after the update.
    """
    C = x.shape[-1]
    flat = [x[..., c].reshape(-1) for c in range(C)]
    n = flat[0].numel()
    mean = torch.stack([f.sum() / n for f in flat])
    var_biased = torch.stack([((f - f.sum() / n) ** 2).sum() / n for f in flat])
    var_unbiased = var_biased * n / (n - 1)
    out = (x - mean) / torch.sqrt(var_biased + EPS) * weight + bias
    new_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean
    new_var = (1 - MOMENTUM) * running_var + MOMENTUM * var_unbiased
    return out, new_mean, new_var


def _batch_norm_eval(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + EPS) * bn.weight + bn.bias


# ---------------------------------------------------------------------------- TokenBatchNorm


def test_token_batchnorm_train_equals_hand_computation_over_batch_and_tokens():
    norm = TokenBatchNorm(6).double()
    _randomize_bn(norm.bn)
    old_mean, old_var = norm.bn.running_mean.clone(), norm.bn.running_var.clone()
    x = _tokens()
    expected, new_mean, new_var = _batch_norm_train(x, norm.bn.weight, norm.bn.bias, old_mean, old_var)
    out = norm.train()(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(norm.bn.running_mean, new_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.bn.running_var, new_var, rtol=0, atol=1e-12)
    assert int(norm.bn.num_batches_tracked) == 1

    # A second step compounds the momentum on top of the first update.
    x2 = _tokens(b=3, n=5) * 0.5 + 0.3
    _, mean2, var2 = _batch_norm_train(x2, norm.bn.weight, norm.bn.bias, new_mean, new_var)
    norm(x2)
    torch.testing.assert_close(norm.bn.running_mean, mean2, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.bn.running_var, var2, rtol=0, atol=1e-12)
    assert int(norm.bn.num_batches_tracked) == 2


def test_token_batchnorm_eval_uses_running_stats():
    norm = TokenBatchNorm(6).double()
    _randomize_bn(norm.bn)
    stats = norm.bn.running_mean.clone(), norm.bn.running_var.clone()
    x = _tokens()
    out = norm.eval()(x)
    torch.testing.assert_close(out, _batch_norm_eval(x, norm.bn), rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.bn.running_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(norm.bn.running_var, stats[1], rtol=0, atol=0)


def test_token_batchnorm_normalizes_the_flat_view_without_a_copy():
    norm = TokenBatchNorm(6).double()
    seen = []
    norm.bn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = _tokens(b=4, n=5, c=6)
    out = norm(x)
    (inp,) = seen
    assert inp.shape == (4 * 5, 6)
    # The (B*N, C) input of the BatchNorm is a view of x: no channels-first copy was made.
    assert inp.data_ptr() == x.data_ptr()
    assert inp.stride() == (6, 1)
    assert out.shape == x.shape and out.is_contiguous()


def test_batchnorm_ffn_feeds_a_view_of_fc1_output_to_batchnorm():
    ffn = BatchNormFFN(6, 10)
    fc1_out, bn_in = [], []
    ffn.fc1.register_forward_hook(lambda module, args, output: fc1_out.append(output))
    ffn.norm.bn.register_forward_pre_hook(lambda module, args: bn_in.append(args[0]))
    ffn(torch.randn(3, 7, 6))
    assert bn_in[0].shape == (3 * 7, 10)
    assert bn_in[0].data_ptr() == fc1_out[0].data_ptr()


def test_token_batchnorm_converts_to_syncbatchnorm_inside_its_wrapper():
    ffn = BatchNormFFN(6, 8)
    _randomize_bn(ffn.norm.bn)
    x = torch.randn(3, 5, 6)
    expected_eval = ffn.eval()(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(ffn)
    assert isinstance(synced.norm, TokenBatchNorm)
    assert isinstance(synced.norm.bn, nn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm1d for m in synced.modules())
    # Single process, no process group: the converted model computes the same thing.
    torch.testing.assert_close(synced.eval()(x), expected_eval)
    reference = BatchNormFFN(6, 8)
    reference.load_state_dict(synced.state_dict())
    torch.testing.assert_close(synced.train()(x), reference.train()(x))


# ---------------------------------------------------------------------------- BatchNormFFN


def test_batchnorm_ffn_train_equals_hand_computation():
    ffn = BatchNormFFN(6, 10).double()
    _randomize_bn(ffn.norm.bn)
    bn = ffn.norm.bn
    x = _tokens()
    h = x @ ffn.fc1.weight.T + ffn.fc1.bias
    normed, new_mean, new_var = _batch_norm_train(
        h, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone()
    )
    expected = _gelu_erf(normed) @ ffn.fc2.weight.T + ffn.fc2.bias
    out = ffn.train()(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, new_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, new_var, rtol=0, atol=1e-12)


def test_batchnorm_ffn_eval_equals_hand_computation():
    ffn = BatchNormFFN(6, 10).double().eval()
    _randomize_bn(ffn.norm.bn)
    x = _tokens()
    h = x @ ffn.fc1.weight.T + ffn.fc1.bias
    expected = _gelu_erf(_batch_norm_eval(h, ffn.norm.bn)) @ ffn.fc2.weight.T + ffn.fc2.bias
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "make",
    [lambda: TokenBatchNorm(6), lambda: BatchNormFFN(6, 12), lambda: EncoderBlock(6, 2, 4, 12, norm="bn")],
    ids=["TokenBatchNorm", "BatchNormFFN", "EncoderBlock-bn"],
)
def test_eval_output_of_one_image_does_not_depend_on_the_batch(make):
    module = make()
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm1d):
                _randomize_bn(bn)
    x = torch.randn(6, 5, 6)
    others = torch.randn(6, 5, 6) * 3 + 1

    module.eval()
    alone = module(x[:1])
    torch.testing.assert_close(module(x)[:1], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(module(torch.cat([x[:1], others]))[:1], alone, rtol=0, atol=1e-6)

    module.train()
    in_batch = module(x)[:1]
    with_others = module(torch.cat([x[:1], others]))[:1]
    assert (in_batch - with_others).abs().max() > 1e-2


# ---------------------------------------------------------------------------- Attention


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_equals_explicit_softmax_attention(qkv_bias):
    dim, heads, dim_head = 12, 3, 5  # dim_head != dim / heads
    attn = Attention(dim, heads, dim_head, qkv_bias=qkv_bias).double().eval()
    with torch.no_grad():
        attn.norm.weight.uniform_(0.5, 1.5)
        attn.norm.bias.uniform_(-0.5, 0.5)
    assert attn.qkv.weight.shape == (3 * heads * dim_head, dim)
    assert attn.proj.weight.shape == (dim, heads * dim_head)
    assert (attn.qkv.bias is not None) == qkv_bias

    B, N = 2, 7
    x = torch.randn(B, N, dim, dtype=torch.float64)
    xn = _layer_norm(x, attn.norm)
    qkv = xn @ attn.qkv.weight.T
    if qkv_bias:
        qkv = qkv + attn.qkv.bias
    inner = heads * dim_head
    q_all, k_all, v_all = qkv[..., :inner], qkv[..., inner : 2 * inner], qkv[..., 2 * inner :]
    outputs = []
    for h in range(heads):  # heads-major: head h owns columns h*dim_head .. (h+1)*dim_head
        cols = slice(h * dim_head, (h + 1) * dim_head)
        q, k, v = q_all[..., cols], k_all[..., cols], v_all[..., cols]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
        outputs.append(weights @ v)
    expected = torch.cat(outputs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-10)


def test_attention_dropout_is_active_in_training_only():
    attn = Attention(8, 2, 4, attn_dropout=0.5)
    x = torch.randn(2, 5, 8)
    assert not torch.equal(attn.train()(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)
    attn.attn_dropout = 0.0
    reference = attn(x)
    attn.attn_dropout = 0.5
    torch.testing.assert_close(attn(x), reference, rtol=0, atol=0)


# ---------------------------------------------------------------------------- FFN structure


def test_feedforward_structure_and_values():
    ffn = FeedForward(6, 10).double().eval()
    children = list(ffn.children())
    assert isinstance(children[0], nn.LayerNorm) and children[0].normalized_shape == (6,)
    linears = [m for m in children if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 10), (10, 6)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ffn.modules())
    with torch.no_grad():
        ffn.norm.weight.uniform_(0.5, 1.5)
        ffn.norm.bias.uniform_(-0.5, 0.5)
    x = _tokens()
    h = _layer_norm(x, ffn.norm) @ ffn.fc1.weight.T + ffn.fc1.bias
    expected = _gelu_erf(h) @ ffn.fc2.weight.T + ffn.fc2.bias
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-10)


def test_batchnorm_ffn_structure():
    ffn = BatchNormFFN(6, 10)
    assert not any(isinstance(m, nn.LayerNorm) for m in ffn.modules())
    children = list(ffn.children())
    assert isinstance(children[0], nn.Linear)
    assert (children[0].in_features, children[0].out_features) == (6, 10)
    assert isinstance(children[1], TokenBatchNorm)
    assert children[1].bn.num_features == 10
    assert children[1].bn.momentum == MOMENTUM and children[1].bn.eps == EPS
    bns = [m for m in ffn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1


@pytest.mark.parametrize("ffn_type", [FeedForward, BatchNormFFN])
def test_gelu_is_exact_erf_gelu(ffn_type):
    ffn = ffn_type(6, 10)
    gelus = [m for m in ffn.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 1
    assert gelus[0].approximate == "none"
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(gelus[0](x), _gelu_erf(x), rtol=0, atol=1e-12)
    # The tanh approximation differs by more than this tolerance somewhere in the range.
    tanh_gelu = nn.functional.gelu(x, approximate="tanh")
    assert (tanh_gelu - _gelu_erf(x)).abs().max() > 1e-5


# ---------------------------------------------------------------------------- EncoderBlock


@pytest.mark.parametrize(
    ("norm", "attn_norm", "ffn_type"),
    [("ln", nn.LayerNorm, FeedForward), ("bn_ffn", nn.LayerNorm, BatchNormFFN), ("bn", TokenBatchNorm, BatchNormFFN)],
)
def test_encoder_block_picks_norms(norm, attn_norm, ffn_type):
    block = EncoderBlock(8, heads=2, dim_head=5, mlp_dim=16, norm=norm)
    assert type(block.attn.norm) is attn_norm
    assert type(block.ffn) is ffn_type
    has_ln = any(isinstance(m, nn.LayerNorm) for m in block.modules())
    has_bn = any(isinstance(m, nn.BatchNorm1d) for m in block.modules())
    assert (has_ln, has_bn) == {"ln": (True, False), "bn_ffn": (True, True), "bn": (False, True)}[norm]
    if norm == "ln":
        assert isinstance(block.ffn.norm, nn.LayerNorm)


@pytest.mark.parametrize("norm", ["ln", "bn_ffn", "bn"])
def test_encoder_block_is_two_residual_branches(norm):
    block = EncoderBlock(8, heads=2, dim_head=5, mlp_dim=16, norm=norm).eval()
    for bn in block.modules():
        if isinstance(bn, nn.BatchNorm1d):
            _randomize_bn(bn)
    x = torch.randn(3, 4, 8)
    h = x + block.attn(x)
    torch.testing.assert_close(block(x), h + block.ffn(h), rtol=0, atol=1e-6)
