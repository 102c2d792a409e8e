"""Inference copies (`for_inference`) and ONNX export (`export_onnx`), on real MNIST test images."""

from __future__ import annotations

import copy
import errno
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bnvit
from bnvit import MLP, ViT, ViTBN, ViTBNFFN, export_onnx, for_inference
from bnvit.data import load_mnist
from bnvit.models.blocks import TokenBatchNorm

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, TokenBatchNorm, nn.GroupNorm, nn.InstanceNorm1d)
CALIBRATION_DEPTH = 3


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _graph_ops(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The ATen ops of `model`'s graph, as traced by torch.export."""
    graph = torch.export.export(model, (example,)).graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images)


@pytest.fixture(scope="module")
def test_images(mnist_root: Path) -> torch.Tensor:
    """The first 257 real MNIST test images, float in [0, 1], (257, 1, 28, 28)."""
    images, _ = load_mnist(mnist_root, train=False)
    return images[:257].float().div(255).unsqueeze(1)


@pytest.fixture(scope="module")
def labels(mnist_root: Path) -> torch.Tensor:
    return load_mnist(mnist_root, train=False)[1][:257]


@pytest.fixture(scope="module")
def calibrated_vitbn(mnist_root: Path) -> ViTBN:
    """A ViTBN (article widths) whose BatchNorms hold real statistics of MNIST training images.

    The affine parameters are drawn away from their defaults and the running statistics are
    the exact averages over 1,000 training images (momentum None), so that every BatchNorm is a
    non-trivial affine map.
    """
    torch.manual_seed(1)
    model = ViTBN(depth=CALIBRATION_DEPTH)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
                m.momentum = None
    images, _ = load_mnist(mnist_root, train=True)
    model.train()
    with torch.no_grad():
        for start in range(0, 1000, 500):
            model(images[start : start + 500].float().div(255).unsqueeze(1))
    return model.eval()


@pytest.fixture(scope="module")
def reference_vitbnffn(reference_checkpoints: Path) -> ViT:
    return bnvit.load_model(reference_checkpoints / "VITBNFFN_d5_15.pth")


@pytest.fixture(scope="module")
def reference_vit(reference_checkpoints: Path) -> ViT:
    return bnvit.load_model(reference_checkpoints / "FinOptAug1_ViT_30.pth")


# ---------------------------------------------------------------------- for_inference: folding


def test_folded_vitbn_has_no_normalization_module_or_op(calibrated_vitbn, test_images):
    model = calibrated_vitbn
    depth = CALIBRATION_DEPTH
    # The unfolded model has one BatchNorm per norm (2 in the patch embedding, 2 per block, 1 final) ...
    assert _count(model, TokenBatchNorm) == 2 * depth + 3
    ops = _graph_ops(model, test_images[:2])
    assert sum("batch_norm" in op for op in ops) == 2 * depth + 3
    # ... the inference copy none at all: no module, no op in its traced graph.
    folded = for_inference(model)
    assert _count(folded, NORM_TYPES) == 0
    assert not [m for m in folded.modules() if re.search(r"Norm(\dd)?$", type(m).__name__)]  # any *Norm, *Norm1d
    ops = _graph_ops(folded, test_images[:2])
    assert not [op for op in ops if "norm" in op], ops
    assert any("linear" in op for op in ops) and any("scaled_dot_product_attention" in op for op in ops)


def test_folded_vitbnffn_keeps_exactly_the_layernorms(reference_vitbnffn, test_images):
    model = reference_vitbnffn
    depth = model.config["depth"]
    assert depth == 5
    folded = for_inference(model)
    assert _count(folded, nn.modules.batchnorm._BatchNorm) == 0
    assert _count(folded, TokenBatchNorm) == 0
    # 2 in the patch embedding, 1 before each attention, 1 final: per-token statistics cannot fold.
    assert _count(folded, nn.LayerNorm) == depth + 3
    assert isinstance(folded.patch_embed.pre_norm, nn.LayerNorm) and isinstance(folded.patch_embed.norm, nn.LayerNorm)
    assert all(isinstance(block.attn.norm, nn.LayerNorm) for block in folded.blocks)
    ops = _graph_ops(folded, test_images[:2])
    assert not [op for op in ops if "batch_norm" in op]
    assert sum("layer_norm" in op for op in ops) == depth + 3
    assert sum("batch_norm" in op for op in _graph_ops(model, test_images[:2])) == depth


def test_folding_a_layernorm_vit_changes_nothing(reference_vit):
    folded = for_inference(reference_vit)
    assert _count(folded, nn.LayerNorm) == _count(reference_vit, nn.LayerNorm) == 2 * 6 + 3
    reference = reference_vit.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in folded.state_dict().items())


@pytest.mark.parametrize("kind", ["ViTBN", "ViTBNFFN", "ViTBNFFN qkv bias", "ViT"])
def test_inference_copy_gives_the_same_logits_on_real_mnist(
    kind, calibrated_vitbn, reference_checkpoints, test_images, labels
):
    if kind == "ViTBN":
        model = calibrated_vitbn
    else:
        name = {"ViTBNFFN": "VITBNFFN_d5_15.pth", "ViTBNFFN qkv bias": "FinOptAug1_ViTBNFFN_30.pth"}
        model = bnvit.load_model(reference_checkpoints / name.get(kind, "FinOptAug1_ViT_30.pth"))
    expected = _logits(model, test_images)
    out = _logits(for_inference(model), test_images)
    assert out.dtype == torch.float32 and out.shape == (257, 10)
    assert (out - expected).abs().max() <= 1e-5
    assert torch.equal(out.argmax(1), expected.argmax(1))
    if kind != "ViTBN":  # trained checkpoints: the copy is still the classifier (the qkv-bias one is the weakest)
        assert (out.argmax(1) == labels).float().mean() >= 0.9


def test_folded_logits_are_not_trivially_equal(calibrated_vitbn, test_images):
    """Leaving the BatchNorms out instead of folding them changes the logits a lot."""
    dropped = copy.deepcopy(calibrated_vitbn)
    for parent in dropped.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, TokenBatchNorm):
                setattr(parent, name, nn.Identity())
    diff = (_logits(dropped, test_images) - _logits(calibrated_vitbn, test_images)).abs().max()
    assert diff > 0.1


# ---------------------------------------------------------------------- for_inference: the copy


def test_the_original_is_untouched(calibrated_vitbn):
    model = copy.deepcopy(calibrated_vitbn).train()  # even a model in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    fast = for_inference(model)
    assert fast is not model
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert [type(m) for m in model.modules()] == modules_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # The copy shares no storage with the original.
    original_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not original_ptrs & {p.data_ptr() for p in fast.parameters()}


def test_the_copy_is_frozen_in_eval_mode():
    fast = for_inference(ViTBNFFN(depth=1).train())
    assert not fast.training and not any(m.training for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    out = fast(torch.rand(2, 1, 28, 28))
    assert not out.requires_grad


def test_fold_false_keeps_the_batchnorms():
    model = ViTBNFFN(depth=2)
    kept = for_inference(model, fold=False)
    assert _count(kept, TokenBatchNorm) == 2 and not kept.training
    assert _count(for_inference(model), TokenBatchNorm) == 0


def test_device_argument():
    fast = for_inference(ViTBN(depth=1), device="cpu")
    assert all(p.device.type == "cpu" for p in fast.parameters())
    with pytest.raises(ValueError, match="'gpu7'"):
        for_inference(ViTBN(depth=1), device="gpu7")


@pytest.mark.slow
def test_compile_returns_a_compiled_copy(test_images):
    torch.manual_seed(0)
    model = ViTBN(depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32).eval()
    compiled = for_inference(model, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert _count(compiled, TokenBatchNorm) == 0
    torch.testing.assert_close(_logits(compiled, test_images[:8]), _logits(model, test_images[:8]), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_script_explains_why_a_vit_cannot_be_scripted():
    with pytest.raises(NotImplementedError, match=r"einops\.rearrange") as info:
        for_inference(ViTBN(depth=1), script=True)
    message = str(info.value)
    assert "compile=True" in message and "export_onnx" in message and "torch.export" in message


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning", "ignore::UserWarning")
def test_script_works_for_a_scriptable_module():
    seq = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[1].running_var.uniform_(0.5, 2)
    seq.eval()
    scripted = for_inference(seq, script=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    x = torch.randn(4, 6)
    torch.testing.assert_close(scripted(x), seq(x), atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="MLP"):
        for_inference(MLP(), script=True)


def test_bad_arguments():
    model = ViTBN(depth=1)
    with pytest.raises(ValueError, match="exclude each other"):
        for_inference(model, compile=True, script=True)
    with pytest.raises(TypeError, match="'yes'"):
        for_inference(model, fold="yes")
    with pytest.raises(TypeError, match="OrderedDict"):
        for_inference(model.state_dict())


# ---------------------------------------------------------------------- ONNX export

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason='ONNX export needs the optional extra: pip install "bnvit[onnx]"',
)
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None,
    reason='running the exported file needs onnxruntime: pip install "bnvit[onnx]"',
)


def _op_types(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.slow
@needs_onnx
@needs_onnxruntime
@pytest.mark.parametrize("kind", ["ViT", "ViTBNFFN", "ViTBN"])
def test_onnx_file_matches_pytorch_in_onnxruntime(kind, tmp_path, calibrated_vitbn, reference_checkpoints, test_images):
    import onnxruntime

    if kind == "ViTBN":
        model = calibrated_vitbn
    else:
        name = "FinOptAug1_ViT_30.pth" if kind == "ViT" else "FinOptAug1_ViTBNFFN_30.pth"
        model = bnvit.load_model(reference_checkpoints / name)
    depth = model.config["depth"]
    path = export_onnx(model, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary or external-data files left

    ops = _op_types(path)
    norms = {"ViT": 2 * depth + 3, "ViTBNFFN": depth + 3, "ViTBN": 0}[kind]
    assert ops.count("LayerNormalization") == norms
    assert "BatchNormalization" not in ops
    if kind == "ViTBN":
        assert not [op for op in ops if "Norm" in op], ops

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str)  # a named, dynamic batch axis
    assert session.get_outputs()[0].name == "logits"
    for batch in (1, 257):  # the export traced a batch of 2: both must work
        images = test_images[:batch]
        (logits,) = session.run(None, {"images": images.numpy()})
        assert logits.shape == (batch, 10)
        expected = _logits(model, images)
        assert (torch.from_numpy(logits) - expected).abs().max() <= 1e-4


@pytest.mark.slow
@needs_onnx
def test_onnx_export_without_folding_keeps_batchnorm(tmp_path):
    model = ViTBNFFN(depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32).eval()
    ops = _op_types(export_onnx(model, tmp_path / "unfolded.onnx", fold=False))
    assert ops.count("BatchNormalization") == 1  # folded, it is gone (see the onnxruntime test)


@needs_onnx
def test_onnx_export_with_a_fixed_batch(tmp_path):
    import onnx

    model = ViTBN(depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32)
    path = export_onnx(model, tmp_path / "b1.onnx", opset=18, batch_size_dynamic=False)
    graph = onnx.load(str(path))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 28, 28]
    assert any(op.domain in ("", "ai.onnx") and op.version == 18 for op in graph.opset_import)


@needs_onnx
def test_onnx_export_of_another_module_needs_an_example_input(tmp_path):
    mlp = MLP(norm="bn").eval()
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(mlp, tmp_path / "mlp.onnx")
    with pytest.raises(ValueError, match=r"\(1, 1, 28, 28\)"):
        export_onnx(mlp, tmp_path / "mlp.onnx", example_input=torch.rand(1, 1, 28, 28))
    path = export_onnx(mlp, tmp_path / "mlp.onnx", example_input=torch.rand(4, 1, 28, 28))
    assert "BatchNormalization" not in _op_types(path)


@needs_onnx
def test_a_failed_export_leaves_no_half_file(tmp_path, monkeypatch):
    class HalfWritten:
        """An exported program whose save dies halfway, as on a full disk."""

        def save(self, destination, **kwargs):
            Path(destination).write_bytes(b"half a mod")
            raise OSError("disk full")

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: HalfWritten())
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous file")
    with pytest.raises(OSError, match="disk full"):
        export_onnx(ViTBN(depth=1), path)
    assert path.read_bytes() == b"the previous file"
    with pytest.raises(OSError, match="disk full"):
        export_onnx(ViTBN(depth=1), tmp_path / "new.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no new file, no temporary file


def test_export_without_onnx_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "bnvit\[onnx\]"') as info:
        export_onnx(ViTBN(depth=1), tmp_path / "model.onnx")
    assert "onnx" in str(info.value)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("opset", [17, 0, "20", 18.0, True])
def test_export_rejects_a_bad_opset(tmp_path, opset):
    with pytest.raises(ValueError, match=f"got {opset!r}"):
        export_onnx(ViTBN(depth=1), tmp_path / "model.onnx", opset=opset)


def test_export_to_a_folder_is_an_error(tmp_path):
    pytest.importorskip("onnx", reason='needs the optional extra: pip install "bnvit[onnx]"')
    pytest.importorskip("onnxscript", reason='needs the optional extra: pip install "bnvit[onnx]"')
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        export_onnx(ViTBN(depth=1), tmp_path)


# ---------------------------------------------------------------------- impossible weights, unwritable paths


def _negative_variance() -> nn.Module:
    model = ViTBN(depth=1).eval()
    with torch.no_grad():
        model.blocks[0].attn.norm.bn.running_var[2] = -3.0
    return model


@pytest.mark.parametrize("fold", [True, False])
def test_for_inference_refuses_a_negative_running_variance_folded_or_not(fold):
    with pytest.raises(ValueError, match=r"for_inference: the model holds .*running_var has 1 negative value"):
        for_inference(_negative_variance(), fold=fold)


@needs_onnx
def test_export_refuses_a_negative_running_variance_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"export_onnx: the model holds impossible BatchNorm statistics"):
        export_onnx(_negative_variance(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_export_to_an_unwritable_folder_names_the_path_asked_for(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_open = os.open

    def read_only_folder(path, flags, *args, **kwargs):  # as a folder without write permission (tests may run as root)
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_folder)
    with pytest.raises(PermissionError, match=re.escape(str(folder))) as info:
        export_onnx(ViTBN(depth=1), folder / "model.onnx")
    assert ".tmp" not in str(info.value) and "write-test" not in str(info.value)
    # every atomic writer names its target, not its hidden temporary file
    from bnvit._util.io import atomic_write_text

    with pytest.raises(PermissionError, match=re.escape(f"cannot write {folder / 'notes.txt'}: Permission denied")):
        atomic_write_text(folder / "notes.txt", "hello")
