"""The article's reference checkpoints, on the real MNIST test set, and checkpoint files in general."""

from __future__ import annotations

import io
import pickle
import random
import re
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import bnvit
from bnvit import ViT
from reference_vit import ReferenceViT

# file -> (builder, norm, depth, qkv_bias)
CHECKPOINTS = {
    "VITBNFFN_d5_15.pth": ("vitbnffn_mnist", "bn_ffn", 5, False),
    "FinOptAug1_ViTBNFFN_30.pth": ("vitbnffn_mnist", "bn_ffn", 6, True),
    "FinOptAug1_ViT_30.pth": ("vitln_mnist", "ln", 6, False),
}
BATCH = 2000


@pytest.fixture(scope="module")
def mnist_test(mnist_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean MNIST test set as float images in [0, 1] (uint8 / 255) and labels."""
    data = torchvision.datasets.MNIST(root=str(mnist_root), train=False, download=False)
    images = data.data.unsqueeze(1).float().div(255)
    assert images.shape == (10_000, 1, 28, 28)
    return images, data.targets


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def _reference_model(path: Path) -> ReferenceViT:
    _, norm, depth, qkv_bias = CHECKPOINTS[path.name]
    model = ReferenceViT(bn_ffn=norm == "bn_ffn", depth=depth, qkv_bias=qkv_bias)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


@pytest.mark.parametrize("filename", list(CHECKPOINTS))
def test_load_model_reads_the_config_from_the_file(reference_checkpoints, filename):
    _, norm, depth, qkv_bias = CHECKPOINTS[filename]
    model = bnvit.load_model(reference_checkpoints / filename)
    assert isinstance(model, ViT) and not model.training
    c = model.config
    assert (c["norm"], c["depth"], c["qkv_bias"]) == (norm, depth, qkv_bias)
    assert (c["dim"], c["heads"], c["dim_head"], c["mlp_dim"], c["num_classes"]) == (64, 8, 64, 128, 10)
    assert (c["img_size"], c["patch_size"], c["in_chans"], c["pos_embed"]) == ((28, 28), 7, 1, "learn")
    assert len(model.blocks) == depth
    assert (model.blocks[0].attn.qkv.bias is not None) == qkv_bias


# The reference code is the slow half of a comparison (~7 s per 10,000 images on 2 cores). In the default
# run it sees the whole test set only where its accuracy is the expected value; for the two checkpoints
# with a known accuracy it sees the first REFERENCE_SUBSET images, and the `slow` test below runs it on all.
REFERENCE_ON_ALL = {"FinOptAug1_ViTBNFFN_30.pth"}
REFERENCE_SUBSET = 2000
MIN_ACCURACY = {"VITBNFFN_d5_15.pth": 0.975, "FinOptAug1_ViT_30.pth": 0.985}


def _compare_with_reference(path: Path, images: torch.Tensor, labels: torch.Tensor, n_reference: int) -> None:
    logits = _logits(bnvit.load_model(path), images)
    expected = _logits(_reference_model(path), images[:n_reference])
    assert (logits[:n_reference] - expected).abs().max() <= 1e-4
    assert torch.equal(logits[:n_reference].argmax(1), expected.argmax(1))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    if path.name in MIN_ACCURACY:
        assert accuracy >= MIN_ACCURACY[path.name]
    if n_reference == len(images):
        assert accuracy == (expected.argmax(1) == labels).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("filename", list(CHECKPOINTS))
def test_load_model_matches_reference_on_mnist(reference_checkpoints, mnist_test, filename):
    images, labels = mnist_test
    n_reference = len(images) if filename in REFERENCE_ON_ALL else REFERENCE_SUBSET
    _compare_with_reference(reference_checkpoints / filename, images, labels, n_reference)


@pytest.mark.slow
@pytest.mark.parametrize("filename", [f for f in CHECKPOINTS if f not in REFERENCE_ON_ALL])
def test_load_model_matches_reference_on_all_of_mnist(reference_checkpoints, mnist_test, filename):
    images, labels = mnist_test
    _compare_with_reference(reference_checkpoints / filename, images, labels, len(images))


@pytest.mark.slow
@pytest.mark.parametrize("filename", list(CHECKPOINTS))
def test_timm_pretrained_file_equals_load_model(reference_checkpoints, mnist_test, filename):
    builder, norm, depth, qkv_bias = CHECKPOINTS[filename]
    path = reference_checkpoints / filename
    model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert (model.config["norm"], model.config["depth"], model.config["qkv_bias"]) == (norm, depth, qkv_bias)
    loaded = bnvit.load_model(path)
    state, expected_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
    images = mnist_test[0][:500]
    reference = _reference_model(path)
    torch.testing.assert_close(_logits(model, images), _logits(reference, images), rtol=0, atol=1e-4)


def test_timm_pretrained_file_with_other_num_classes_keeps_the_backbone(reference_checkpoints):
    path = reference_checkpoints / "VITBNFFN_d5_15.pth"
    model = timm.create_model(
        "vitbnffn_mnist", pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=str(path))
    )
    loaded = bnvit.load_model(path)
    assert model.head.out_features == 4 and model.config["depth"] == 5
    torch.testing.assert_close(model.blocks[4].ffn.fc1.weight, loaded.blocks[4].ffn.fc1.weight, rtol=0, atol=0)


# ---------------------------------------------------------------------------- contradictions


def test_wrong_builder_for_the_file_raises(reference_checkpoints):
    path = reference_checkpoints / "FinOptAug1_ViT_30.pth"
    with pytest.raises(ValueError, match=r"norm='ln'.*vitbnffn_mnist.*norm='bn_ffn'"):
        timm.create_model("vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match=r"norm='bn_ffn'.*vitln_mnist.*norm='ln'"):
        timm.create_model(
            "vitln_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path.with_name("VITBNFFN_d5_15.pth")))
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(depth=4), r"depth=4 was asked.*depth=5"),
        (dict(qkv_bias=True), r"qkv_bias=True was asked.*qkv_bias=False"),
    ],
)
def test_timm_contradiction_with_the_file_raises(reference_checkpoints, kwargs, match):
    path = reference_checkpoints / "VITBNFFN_d5_15.pth"
    with pytest.raises(ValueError, match=match):
        timm.create_model("vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def test_timm_file_for_another_input_size_raises(reference_checkpoints):
    path = reference_checkpoints / "VITBNFFN_d5_15.pth"
    with pytest.raises(ValueError, match=r"patch_dim: checkpoint 49, model 48"):
        timm.create_model("vitbnffn_cifar", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dim=32), r"dim=32 was asked, the checkpoint has dim=64"),
        (dict(depth=4), r"depth=4 was asked, the checkpoint has depth=5"),
        (dict(norm="ln"), r"norm='ln' was asked, the checkpoint has norm='bn_ffn'"),
        (dict(qkv_bias=True), r"qkv_bias=True was asked, the checkpoint has qkv_bias=False"),
        (dict(mlp_dim=256), r"mlp_dim=256 was asked, the checkpoint has mlp_dim=128"),
        (dict(img_size=56), r"num_tokens: checkpoint 17, model 65"),
        (dict(in_chans=3), r"49 values.*in_chans=3"),
        (dict(heads=3), r"512.*heads=3"),
    ],
)
def test_load_model_contradiction_raises(reference_checkpoints, kwargs, match):
    path = reference_checkpoints / "VITBNFFN_d5_15.pth"
    with pytest.raises(ValueError, match=match) as info:
        bnvit.load_model(path, **kwargs)
    assert "VITBNFFN_d5_15.pth" in str(info.value)


def test_load_model_with_other_num_classes_drops_the_head(reference_checkpoints):
    model = bnvit.load_model(reference_checkpoints / "VITBNFFN_d5_15.pth", num_classes=3)
    assert model.head.out_features == 3
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_checkpoint_filter_fn_lists_every_mismatch(reference_checkpoints):
    state = torch.load(reference_checkpoints / "FinOptAug1_ViTBNFFN_30.pth", weights_only=True)
    with pytest.raises(ValueError, match=r"does not match") as info:
        bnvit.checkpoint_filter_fn(state, ViT(norm="ln", depth=2, dim_head=32))
    message = str(info.value)
    for line in ("norm: checkpoint 'bn_ffn', model 'ln'", "depth: checkpoint 6, model 2", "qkv_bias: checkpoint True"):
        assert line in message
    assert "attn_width: checkpoint 512, model 256" in message


# ---------------------------------------------------------------------------- files that are not checkpoints


class _Payload:
    """Unpickling this would run code (it calls _mark)."""

    def __reduce__(self):
        return (_mark, ("executed",))


_MARKS: list[str] = []


def _mark(value: str) -> str:
    _MARKS.append(value)
    return value


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return buffer.getvalue()


NOT_CHECKPOINTS = {
    # Random bytes: the weights-only unpickler fails in different ways depending on the bytes.
    "random-0": lambda: random.Random(0).randbytes(4096),
    "random-2": lambda: random.Random(2).randbytes(4096),  # IndexError inside torch.load
    "random-20": lambda: random.Random(20).randbytes(4096),  # KeyError inside torch.load
    "text": lambda: b"hello world\n",  # e.g. a README passed by mistake (KeyError inside torch.load)
    "empty": lambda: b"",
    "zip": _zip_bytes,
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_non_checkpoint_bytes_raise_value_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    path.write_bytes(NOT_CHECKPOINTS[kind]())
    with pytest.raises(ValueError, match=re.escape(path.name)):
        bnvit.load_model(path)


def test_truncated_checkpoint_raises_value_error(tmp_path, reference_checkpoints):
    data = (reference_checkpoints / "VITBNFFN_d5_15.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth"):
        bnvit.load_model(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path):
    for name, obj in (("code.pth", {"w": _Payload()}), ("plain.pkl", _Payload())):
        path = tmp_path / name
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, path)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            bnvit.load_model(path)
        with pytest.raises(ValueError):
            timm.create_model("vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert _MARKS == []


def test_non_state_dict_files_raise(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"state dict"):
        bnvit.load_model(tmp_path / "meta.pth")
    torch.save({"a": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing"):
        bnvit.load_model(tmp_path / "other.pth")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        bnvit.load_model(tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        timm.create_model(
            "vitbnffn_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nothing.pth"))
        )


# ---------------------------------------------------------------------------- bnvit's own files


def _trained_model(**kwargs) -> ViT:
    model = ViT(depth=2, **kwargs)
    model.train()
    for _ in range(2):
        model(torch.rand(4, model.in_chans, *model.patch_embed.img_size))
    return model.eval()


@pytest.mark.parametrize(
    ("kwargs", "wrap"),
    [
        (dict(norm="bn_ffn"), lambda sd: sd),
        (dict(norm="bn", qkv_bias=True), lambda sd: {"model": sd, "epoch": torch.tensor(3)}),
        (dict(norm="ln", num_classes=4), lambda sd: {f"module.{k}": v for k, v in sd.items()}),
        (dict(norm="bn_ffn", mlp_dim=96), lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),
        (dict(norm="bn", dim=32, dim_head=16), lambda sd: {"state_dict": sd}),
        (dict(norm="bn_ffn", num_classes=0), lambda sd: {"model_state_dict": sd}),
        (dict(norm="bn", pos_embed="sincos"), lambda sd: sd),
    ],
    ids=["bare", "model-key", "ddp-prefix", "compile-prefix", "state_dict-key", "headless", "sincos"],
)
def test_own_state_dict_round_trips(tmp_path, kwargs, wrap):
    model = _trained_model(**kwargs)
    path = tmp_path / "own.pth"
    torch.save(wrap(model.state_dict()), path)
    loaded = bnvit.load_model(path)
    for key in ("norm", "depth", "qkv_bias", "dim", "dim_head", "mlp_dim", "num_classes", "pos_embed"):
        assert loaded.config[key] == model.config[key], key
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_own_cifar_state_dict_round_trips(tmp_path):
    model = _trained_model(norm="bn_ffn", img_size=32, patch_size=4, in_chans=3)
    torch.save(model.state_dict(), tmp_path / "cifar.pth")
    loaded = bnvit.load_model(tmp_path / "cifar.pth", in_chans=3)
    assert loaded.config["img_size"] == (32, 32) and loaded.config["patch_size"] == 4
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_model_round_trips_non_square_model(tmp_path):
    """A model for 28x14 images (4x2 patches) must load when its image size is given.

    The loader guesses a square image from the number of tokens and then rejects the true size.
    """
    model = _trained_model(norm="bn_ffn", img_size=(28, 14))
    torch.save(model.state_dict(), tmp_path / "wide.pth")
    loaded = bnvit.load_model(tmp_path / "wide.pth", img_size=(28, 14))
    assert loaded.config["img_size"] == (28, 14)
    x = torch.rand(2, 1, 28, 14)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
