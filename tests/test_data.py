"""bnvit.data: the IDX reader, data location, the torchvision reference, the fast augmentation,
DeviceLoader, the frozen augmented test set and mnist_loaders.

Reader tests write their own small IDX files; tests on real MNIST use the `mnist_root` fixture.
"""

from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2

from bnvit.data import (
    AugmentParams,
    DeviceLoader,
    MNISTDataset,
    apply_augment,
    article_transform,
    augment_batch,
    augment_matrices,
    augmented_test_set,
    cache_dir,
    find_mnist_root,
    load_mnist,
    mnist_loaders,
    read_idx,
    sample_augment_params,
)
from bnvit.data import augment as augment_module
from bnvit.data import sets as sets_module


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never write into the real user cache from tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


# --------------------------------------------------------------------------------------------
# IDX files of our own


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def make_mnist(root: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0) -> dict:
    """Write a tiny MNIST in `root/MNIST/raw`; returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_round_trips_idx_files(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_mnist(tmp_path, train=train)
        assert images.dtype == torch.uint8 and images.shape == (len(arrays[prefix][0]), 28, 28)
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), arrays[prefix][0])
        np.testing.assert_array_equal(labels.numpy(), arrays[prefix][1])


def test_read_idx_shapes_and_ndim(tmp_path):
    path = tmp_path / "x-idx2-ubyte"
    path.write_bytes(idx_bytes(np.arange(6).reshape(2, 3)))
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match=r"x-idx2-ubyte has 2 dimensions.*expected 3"):
        read_idx(path, ndim=3)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_idx(tmp_path / "nothing-here")


def _corrupt(tmp_path: Path, name: str, data: bytes) -> Path:
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / name
    path.write_bytes(data)
    return path


def test_truncated_images_file_raises_naming_it(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is truncated.*\(12, 28, 28\)"):
        load_mnist(tmp_path, train=True)


def test_truncated_header_raises(tmp_path):
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", bytes([0, 0, 8]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is truncated"):
        load_mnist(tmp_path, train=False)
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", bytes([0, 0, 8, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is truncated.*header"):
        load_mnist(tmp_path, train=False)


def test_extra_bytes_raise(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte is longer than its header says"):
        load_mnist(tmp_path, train=False)


@pytest.mark.parametrize("magic", [b"\x12\x34\x08\x03", b"\x00\x00\x0d\x03"])
def test_bad_magic_raises_naming_file(tmp_path, magic):
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(magic + path.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte has magic number 0x[0-9a-f]{8}, not a uint8 IDX"):
        load_mnist(tmp_path, train=True)


def test_wrong_dims_raise(tmp_path):
    _corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros((12, 2))))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte has 2 dimensions.*expected 1"):
        load_mnist(tmp_path, train=True)
    _corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(np.zeros((12, 28, 27))))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte holds images of shape \(28, 27\)"):
        load_mnist(tmp_path, train=True)


def test_count_mismatch_names_both_files(tmp_path):
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(4)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte holds 5 images but .*t10k-labels-idx1-ubyte holds 4"):
        load_mnist(tmp_path, train=False)


def test_bad_label_values_raise(tmp_path):
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.array([1, 2, 10, 3, 4])))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds label 10 at index 2; MNIST labels are 0-9"):
        load_mnist(tmp_path, train=False)


def test_corrupt_gzip_raises_naming_it(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is not a readable gzip file"):
        load_mnist(tmp_path, train=False)


def test_missing_folder_names_folder_files_and_fixes(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(root, train=True)
    message = str(info.value)
    assert str(root / "MNIST" / "raw") in message
    for expected in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "BNVIT_DATA", "root=", "download=True"):
        assert expected in message


def test_missing_one_file_names_it(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: t10k-labels-idx1-ubyte\."):
        load_mnist(tmp_path, train=False)
    load_mnist(tmp_path, train=True)  # the other split is complete


def test_missing_message_hints_at_layout_one_level_off(tmp_path):
    make_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"pass root='{tmp_path}'"):
        load_mnist(tmp_path / "MNIST" / "raw", train=True)
    with pytest.raises(FileNotFoundError, match=rf"pass root='{tmp_path}'"):
        load_mnist(tmp_path / "MNIST", train=True)


def test_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BNVIT_DATA", str(tmp_path / "env"))
    assert find_mnist_root(tmp_path / "arg") == tmp_path / "arg"
    assert find_mnist_root() == tmp_path / "env"
    monkeypatch.delenv("BNVIT_DATA")
    assert find_mnist_root() == tmp_path / "xdg" / "bnvit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_mnist_root() == tmp_path / "home" / ".cache" / "bnvit" == cache_dir()
    with pytest.raises(TypeError, match=r"root must be a str or os\.PathLike, got 3"):
        find_mnist_root(3)


def test_load_mnist_reads_bnvit_data_and_cache_folder(tmp_path, monkeypatch):
    env_arrays = make_mnist(tmp_path / "env", seed=1)
    cache_arrays = make_mnist(tmp_path / "xdg" / "bnvit", seed=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BNVIT_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_mnist(train=False)[0].numpy(), env_arrays["t10k"][0])
    monkeypatch.delenv("BNVIT_DATA")
    np.testing.assert_array_equal(load_mnist(train=False)[0].numpy(), cache_arrays["t10k"][0])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(
        FileNotFoundError, match=r"elsewhere/bnvit/MNIST/raw \(the user cache folder; \$BNVIT_DATA is not set\)"
    ):
        load_mnist(train=False)


def test_load_mnist_caches_and_notices_changed_files(tmp_path):
    make_mnist(tmp_path, seed=0)
    first = load_mnist(tmp_path, train=False)
    assert load_mnist(tmp_path, train=False)[0] is first[0]
    new = make_mnist(tmp_path, seed=5, n_test=7)
    images, labels = load_mnist(tmp_path, train=False)
    assert images.shape[0] == 7
    np.testing.assert_array_equal(labels.numpy(), new["t10k"][1])


def test_train_must_be_bool(tmp_path):
    with pytest.raises(TypeError, match="train must be a bool"):
        load_mnist(tmp_path, train="yes")


def _fake_torchvision_mnist(monkeypatch, init):
    module = types.SimpleNamespace(MNIST=type("MNIST", (), {"__init__": init}))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)


def test_download_failure_offline_is_a_clear_file_not_found(tmp_path, monkeypatch):
    def offline(self, root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    _fake_torchvision_mnist(monkeypatch, offline)
    with pytest.raises(
        FileNotFoundError, match=r"MNIST is not in .*MNIST/raw and downloading it there failed.*no network"
    ):
        load_mnist(tmp_path, train=True, download=True)


def test_download_fetches_missing_files_into_the_root(tmp_path, monkeypatch):
    calls = []

    def fetch(self, root, train, download):
        calls.append((root, train, download))
        make_mnist(Path(root), n_train=3)

    _fake_torchvision_mnist(monkeypatch, fetch)
    images, _ = load_mnist(tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)] and images.shape == (3, 28, 28)
    load_mnist(tmp_path, train=True, download=True)  # present now: no second download
    assert len(calls) == 1


def test_real_mnist(mnist_root):
    images, labels = load_mnist(mnist_root, train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_images, test_labels = load_mnist(mnist_root, train=False)
    assert test_images.shape == (10000, 28, 28) and test_labels[:3].tolist() == [7, 2, 1]


# --------------------------------------------------------------------------------------------
# The torchvision reference


def test_article_transform_is_the_articles_pipeline():
    steps = article_transform().transforms
    assert [type(t) for t in steps] == [
        transforms.RandomRotation,
        transforms.RandomAffine,
        v2.RandomZoomOut,
        transforms.Resize,
        transforms.ToTensor,
    ]
    rotation, affine, zoom, resize, _ = steps
    assert rotation.degrees == [-20.0, 20.0] and rotation.interpolation == InterpolationMode.NEAREST
    assert affine.degrees == [0.0, 0.0] and affine.translate == (0.2, 0.2) and affine.scale is None
    assert tuple(zoom.side_range) == (2.0, 3.0) and zoom.p == 0.2 and zoom.fill == 0
    assert resize.size == 28 and resize.interpolation == InterpolationMode.BILINEAR


def test_mnist_dataset(mnist_root):
    plain = MNISTDataset(mnist_root, train=False)
    images, labels = load_mnist(mnist_root, train=False)
    image, label = plain[3]
    assert len(plain) == 10000 and isinstance(label, int) and label == int(labels[3])
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.equal(image[0], images[3].float() / 255)
    augmented = MNISTDataset(mnist_root, train=False, transform=article_transform())
    torch.manual_seed(0)
    out, _ = augmented[3]
    assert out.shape == (1, 28, 28) and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, image)
    assert "split='test'" in repr(augmented)
    with pytest.raises(TypeError, match="transform must be callable"):
        MNISTDataset(mnist_root, train=False, transform="flip")


# --------------------------------------------------------------------------------------------
# The fast augmentation


def torchvision_reference(image: torch.Tensor, params: AugmentParams, i: int) -> torch.Tensor:
    """The torchvision steps of `article_transform` with the parameters of image `i` fixed."""
    height, width = image.shape
    pil = TF.rotate(Image.fromarray(image.numpy()), float(params.angle[i]), InterpolationMode.NEAREST)
    tx, ty = (int(v) for v in params.translate[i])
    pil = TF.affine(pil, 0.0, [tx, ty], 1.0, [0.0, 0.0], InterpolationMode.NEAREST)
    if params.zoom[i]:
        (cw, ch), (left, top) = params.canvas[i].tolist(), params.offset[i].tolist()
        pil = TF.resize(TF.pad(pil, [left, top, cw - width - left, ch - height - top], fill=0), [height, width])
    return TF.to_tensor(pil)


def fixed_params(angle=0.0, tx=0.0, ty=0.0, zoom=False, canvas=(56, 56), offset=(0, 0)) -> AugmentParams:
    return AugmentParams(
        angle=torch.tensor([float(angle)]),
        translate=torch.tensor([[float(tx), float(ty)]]),
        zoom=torch.tensor([zoom]),
        canvas=torch.tensor([canvas]),
        offset=torch.tensor([offset]),
    )


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Synthetic digit-like uint8 images (no real data needed)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    noise = torch.randint(0, 256, (64, 20, 20), generator=generator, dtype=torch.uint8)
    images[:, 4:24, 4:24] = noise * (noise > 120)
    return images


@pytest.mark.parametrize("shape", [(16, 28, 28), (16, 1, 28, 28)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_augment_batch_shape_dtype_range_device(digits, shape, dtype):
    images = digits[:16].reshape(shape)
    images = images if dtype == torch.uint8 else images.to(dtype) / 255
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 28, 28) and out.dtype == torch.float32 and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1 and out.sum() > 0


def test_augment_batch_is_reproducible_with_a_generator(digits):
    a = augment_batch(digits, torch.Generator().manual_seed(3))
    b = augment_batch(digits, torch.Generator().manual_seed(3))
    c = augment_batch(digits, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = augment_batch(digits)
    torch.manual_seed(0)
    assert torch.equal(d, augment_batch(digits))  # None: torch's global generator


def test_identity_parameters_return_the_input_exactly(digits):
    params = fixed_params()
    assert torch.equal(augment_matrices(params), torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    image = digits[:1]
    assert torch.equal(apply_augment(image, params), image.unsqueeze(1) / 255)
    floats = torch.rand(1, 1, 28, 28)
    assert torch.equal(apply_augment(floats, params), floats)


def test_translation_moves_right_and_down(digits):
    image = digits[:1]
    out = apply_augment(image, fixed_params(tx=3, ty=-2))[0, 0]
    expected = torch.zeros(28, 28)
    expected[:-2, 3:] = image[0, 2:, :-3] / 255
    assert torch.equal(out, expected)


def test_rotation_is_counter_clockwise_about_the_image_centre(digits):
    image = digits[:1]
    out = apply_augment(image, fixed_params(angle=90))
    assert torch.equal(out, torch.rot90(image, 1, dims=(-2, -1)).unsqueeze(1) / 255)


def test_augment_matrices_follow_affine_grid_convention(digits):
    """`augment_matrices` + F.affine_grid + F.grid_sample reproduce the unzoomed fast path."""
    params = sample_augment_params(64, generator=torch.Generator().manual_seed(1))
    params = params._replace(zoom=torch.zeros(64, dtype=torch.bool))
    grid = F.affine_grid(augment_matrices(params), (64, 1, 28, 28), align_corners=False)
    expected = F.grid_sample(digits.unsqueeze(1) / 255, grid, mode="nearest", align_corners=False)
    out = apply_augment(digits, params)
    assert (out == expected).float().mean() > 0.9999  # the two grids differ in the last bit only


def test_params_follow_torchvisions_draws():
    params = sample_augment_params(200_000, generator=torch.Generator().manual_seed(0))
    assert -20 <= params.angle.min() < -19.9 and 19.9 < params.angle.max() <= 20
    tx = params.translate[:, 0]
    assert torch.equal(tx, tx.round()) and tx.min() == -6 and tx.max() == 6
    # round(uniform(-5.6, 5.6)): each of -5..5 has probability 1/11.2, -6 and 6 have 0.1/11.2
    freq = torch.bincount((tx + 6).long(), minlength=13).double() / len(tx)
    expected = torch.full((13,), 1 / 11.2, dtype=torch.float64)
    expected[[0, 12]] = 0.1 / 11.2
    assert torch.allclose(freq, expected, atol=0.002)
    assert abs(params.zoom.double().mean() - 0.2) < 0.003
    canvas, offset = params.canvas, params.offset
    assert canvas.min() == 56 and canvas.max() <= 84 and (canvas >= 83).any()
    assert torch.equal(canvas[:, 0], canvas[:, 1])  # one ratio r for both sides
    assert (offset >= 0).all() and (offset <= canvas - 28).all()


def test_fast_path_matches_torchvision_pixel_for_pixel(mnist_root):
    """Same parameters, same output: the rotation centre and sign, the translation and the zoom-out
    placement and filter are torchvision's. Only exact rounding ties may differ."""
    images = load_mnist(mnist_root, train=True)[0][:600]
    params = sample_augment_params(600, generator=torch.Generator().manual_seed(0))
    out = apply_augment(images, params)
    reference = torch.stack([torchvision_reference(images[i], params, i) for i in range(600)])
    same = (out == reference).flatten(1).float()
    assert params.zoom.sum() > 80
    assert same[~params.zoom].mean() > 0.9999
    assert same[params.zoom].mean() > 0.998
    assert (out - reference).abs().mean() < 1e-4


def test_zoomed_out_images_match_pils_antialiased_resize(digits):
    params = fixed_params(zoom=True, canvas=(70, 70), offset=(20, 5))
    out = apply_augment(digits[:1], params)
    assert torch.equal(out[0], torchvision_reference(digits[0], params, 0))
    # the ink shrinks by 70 / 28 = 2.5 per side: its mass by about 2.5 ** 2
    assert float(out.sum()) * 6.25 == pytest.approx(float(digits[0].double().sum()) / 255, rel=0.02)


@pytest.mark.parametrize(("canvas", "offset"), [((56, 56), (0, 0)), ((84, 84), (56, 56)), ((71, 71), (3, 40))])
def test_zoom_out_of_full_frame_images_matches_pil(canvas, offset):
    """Ink up to the image border (unlike MNIST's empty margins) exercises every band row and column."""
    noise = torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    params = fixed_params(zoom=True, canvas=canvas, offset=offset)
    out = apply_augment(noise, params)
    reference = torchvision_reference(noise[0], params, 0)
    # PIL rounds its filter weights to 22-bit fixed point: a few pixels differ by one grey level
    assert (out[0] == reference).float().mean() > 0.95 and (out[0] - reference).abs().max() <= 1 / 255 + 1e-6


def test_cpu_subset_and_device_paths_agree(digits):
    """The GPU path resizes every image and selects with torch.where; the CPU path only the zoomed."""
    params = sample_augment_params(64, generator=torch.Generator().manual_seed(2))
    assert params.zoom.any() and not params.zoom.all()
    stage_one = apply_augment(digits, params._replace(zoom=torch.zeros_like(params.zoom)))
    subset, everything = stage_one.clone(), stage_one.clone()
    augment_module._zoom_out(subset, params, True, subset=True)
    augment_module._zoom_out(everything, params, True, subset=False)
    assert torch.equal(subset, everything) and torch.equal(subset, apply_augment(digits, params))
    assert not torch.equal(subset, stage_one)


@pytest.mark.parametrize(("chunk", "block"), [(50, 100), (7, 300), (1000, 1000)])
def test_large_batches_are_chunked_identically(digits, monkeypatch, chunk, block):
    images = digits.repeat(8, 1, 1)
    params = sample_augment_params(len(images), generator=torch.Generator().manual_seed(0))
    whole = apply_augment(images, params)
    monkeypatch.setattr(augment_module, "_CPU_CHUNK", chunk)
    monkeypatch.setattr(augment_module, "_CPU_BLOCK", block)
    assert torch.equal(apply_augment(images, params), whole)


def test_non_square_and_empty_batches(digits):
    out = augment_batch(digits[:4, :20, :24], torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 20, 24)
    assert augment_batch(digits[:0]).shape == (0, 1, 28, 28)


def test_augment_rejects_bad_input(digits):
    with pytest.raises(TypeError, match=r"uint8.*or floating point.*got dtype torch\.int32"):
        augment_batch(digits.int())
    with pytest.raises(ValueError, match=r"shape \(B, H, W\) or \(B, 1, H, W\), got \(2, 3, 28, 28\)"):
        augment_batch(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"image height must be an int in \[1, 32\], got 40"):
        augment_batch(torch.zeros(2, 40, 28))
    with pytest.raises(TypeError, match=r"images must be a torch\.Tensor"):
        augment_batch(np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        augment_batch(digits, generator=0)
    with pytest.raises(ValueError, match=r"params are for \(1,\) images, the batch has 64"):
        apply_augment(digits, fixed_params())
    with pytest.raises(ValueError, match="batch_size must be an int >= 0, got -1"):
        sample_augment_params(-1)


# --------------------------------------------------------------------------------------------
# DeviceLoader


def loader(n=30, **kwargs) -> DeviceLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    kwargs.setdefault("batch_size", 4)
    return DeviceLoader(images, torch.arange(n), **kwargs)


def epoch_labels(dl: DeviceLoader, epoch: int | None = None) -> list[int]:
    if epoch is not None:
        dl.set_epoch(epoch)
    return torch.cat([y for _, y in dl]).tolist()


def test_every_sample_once_per_epoch():
    dl = loader(30)
    for epoch in range(3):
        assert sorted(epoch_labels(dl, epoch)) == list(range(30))


def test_order_is_a_pure_function_of_seed_and_epoch():
    dl = loader(30, seed=7)
    first, second = epoch_labels(dl, 0), epoch_labels(dl, 1)
    assert first != second and first != list(range(30))
    assert epoch_labels(dl, 0) == first and epoch_labels(loader(30, seed=7), 1) == second
    assert epoch_labels(loader(30, seed=8), 0) != first


def test_iterating_advances_the_epoch():
    dl = loader(30)
    first, second = epoch_labels(dl), epoch_labels(dl)
    assert first != second and dl.epoch == 2
    assert epoch_labels(dl, 0) == first


def test_augmentation_is_a_pure_function_of_seed_and_epoch(digits):
    dl = DeviceLoader(digits, torch.arange(64), batch_size=16, augment=True, seed=1)
    batches = [torch.cat([x for x, _ in dl]) for _ in range(2)]
    assert not torch.equal(batches[0], batches[1])
    dl.set_epoch(1)
    assert torch.equal(torch.cat([x for x, _ in dl]), batches[1])
    plain = torch.cat([x for x, _ in DeviceLoader(digits, torch.arange(64), batch_size=16, shuffle=False)])
    assert torch.equal(plain, digits.unsqueeze(1) / 255)


def test_batches_hold_matching_images_and_labels():
    dl = loader(30, augment=False)
    for images, labels in dl:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0], labels.float() / 255)


def test_no_shuffle_keeps_the_stored_order():
    assert epoch_labels(loader(30, shuffle=False), 5) == list(range(30))


@pytest.mark.parametrize("n", [30, 31, 32])
def test_rank_shards_are_disjoint_and_cover_the_data(n):
    shards = [epoch_labels(loader(n, rank=r, world_size=3, seed=2), 4) for r in range(3)]
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen)) == 3 * (n // 3)
    assert all(len(shard) == n // 3 for shard in shards)
    assert len({len(loader(n, rank=r, world_size=3)) for r in range(3)}) == 1
    if n == 30:
        assert sorted(seen) == list(range(30))


def test_drop_last():
    assert [len(y) for _, y in loader(10, batch_size=4)] == [4, 4, 2]
    dl = loader(10, batch_size=4, drop_last=True)
    assert len(dl) == 2 and [len(y) for _, y in dl] == [4, 4]
    assert len(loader(10, batch_size=4)) == 3 and loader(10).num_samples == 10


def test_float_images_pass_through_without_division():
    images = torch.full((6, 1, 28, 28), 0.5, dtype=torch.float64)
    (x, _), *_ = DeviceLoader(images, torch.zeros(6, dtype=torch.long), batch_size=6)
    assert x.dtype == torch.float32 and torch.all(x == 0.5)


def test_state_dict_round_trip():
    dl = loader(30, seed=3)
    epoch_labels(dl), epoch_labels(dl)
    fresh = loader(30, seed=3)
    fresh.load_state_dict(dl.state_dict())
    assert epoch_labels(fresh) == epoch_labels(dl)
    with pytest.raises(ValueError, match="seed=3, this loader has seed=4"):
        loader(30, seed=4).load_state_dict({"epoch": 1, "seed": 3})


def test_repr():
    text = repr(loader(30, batch_size=8, world_size=2, rank=1))
    for part in ("DeviceLoader(", "samples=15", "batch_size=8", "batches=2", "rank=1/2", "device='cpu'"):
        assert part in text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, world_size=2\), got 2"),
        ({"world_size": 0}, ValueError, "world_size must be an int >= 1"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"batch_size": 40, "drop_last": True}, ValueError, "drop_last=True with batch_size=40 leaves no batch"),
        ({"shuffle": "yes"}, TypeError, "shuffle must be a bool"),
    ],
)
def test_device_loader_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        loader(30, **kwargs)


def test_device_loader_rejects_bad_data():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="4 images, 3 labels"):
        DeviceLoader(images, torch.zeros(3, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError, match="images is empty"):
        DeviceLoader(images[:0], torch.zeros(0, dtype=torch.long), batch_size=2)
    with pytest.raises(TypeError, match=r"integer class labels.*torch\.float32"):
        DeviceLoader(images, torch.zeros(4), batch_size=2)
    with pytest.raises(TypeError, match="images must be uint8"):
        DeviceLoader(images.int(), torch.zeros(4, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, 1, H, W\)"):
        DeviceLoader(torch.zeros(4, 3, 28, 28), torch.zeros(4, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError, match="augment=True supports image sides up to 32"):
        DeviceLoader(torch.zeros(4, 64, 64), torch.zeros(4, dtype=torch.long), batch_size=2, augment=True)
    with pytest.raises(ValueError, match="cannot be shared by world_size=5"):
        DeviceLoader(images, torch.zeros(4, dtype=torch.long), batch_size=2, world_size=5)


# --------------------------------------------------------------------------------------------
# The frozen augmented test set and mnist_loaders


@pytest.mark.slow
def test_augmented_test_set_torchvision_is_frozen_cached_and_restores_the_rng(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sets_module, "_memory", {})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    images, labels = augmented_test_set(mnist_root, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32 and labels[0] == 7
    assert images.min() >= 0 and images.max() <= 1
    # the same draw as article_transform under torch.manual_seed(0), image by image
    raw_images = load_mnist(mnist_root, train=False)[0]
    torch.manual_seed(0)
    transform = article_transform()
    for i in range(5):
        assert torch.equal(images[i], transform(Image.fromarray(raw_images[i].numpy())))
    files = list((tmp_path / "bnvit" / "augmented").iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist-test-torchvision-seed0-")
    # a second process would read the file instead of transforming again
    monkeypatch.setattr(sets_module, "_memory", {})
    monkeypatch.setattr(sets_module, "_torchvision_augment", lambda *a: pytest.fail("recomputed despite the cache"))
    assert torch.equal(augmented_test_set(mnist_root, seed=0)[0], images)


def test_augmented_test_set_regenerates_a_corrupt_cache(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sets_module, "_memory", {})
    monkeypatch.setattr(sets_module, "_torchvision_augment", lambda images, seed: torch.zeros(10000, 1, 28, 28).byte())
    augmented_test_set(mnist_root, seed=1)
    (path,) = (tmp_path / "bnvit" / "augmented").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setattr(sets_module, "_memory", {})
    with pytest.warns(RuntimeWarning, match="unreadable cache file"):
        images, _ = augmented_test_set(mnist_root, seed=1)
    assert images.shape == (10000, 1, 28, 28) and torch.load(path, weights_only=True)["images"].shape[0] == 10000


def test_augmented_test_set_warns_when_the_cache_is_not_writable(mnist_root, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(sets_module, "_memory", {})
    monkeypatch.setattr(sets_module, "_torchvision_augment", lambda images, seed: torch.zeros(10000, 1, 28, 28).byte())
    with pytest.warns(RuntimeWarning, match="could not cache the augmented test set"):
        augmented_test_set(mnist_root, seed=2)


def test_augmented_test_set_fast_is_seeded_and_device_independent(mnist_root):
    a, labels = augmented_test_set(mnist_root, seed=0, method="fast")
    b, _ = augmented_test_set(mnist_root, seed=0, method="fast")
    c, _ = augmented_test_set(mnist_root, seed=1, method="fast")
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (10000, 1, 28, 28) and len(labels) == 10000
    with pytest.raises(ValueError, match="unknown method 'pil'"):
        augmented_test_set(mnist_root, method="pil")


def test_mnist_loaders_fast(mnist_root):
    train, test = mnist_loaders(
        mnist_root, batch_size=100, eval_batch_size=300, test="clean", train_subset=1000, test_subset=500, seed=3
    )
    assert isinstance(train, DeviceLoader) and train.augment and len(train) == 10 and len(test) == 2
    images, labels = next(iter(train))
    assert images.shape == (100, 1, 28, 28) and labels.dtype == torch.int64
    clean = load_mnist(mnist_root, train=False)[0][:500]
    assert torch.equal(torch.cat([x for x, _ in test]), clean.unsqueeze(1) / 255)
    # the train subset is a fixed random draw from seed, not the first 1000 images
    again = mnist_loaders(mnist_root, test="clean", train_subset=1000, test_subset=10, seed=3)[0]
    other = mnist_loaders(mnist_root, test="clean", train_subset=1000, test_subset=10, seed=4)[0]
    assert torch.equal(again.images, train.images) and not torch.equal(other.images, train.images)
    assert not torch.equal(train.images, load_mnist(mnist_root, train=True)[0][:1000])


def test_mnist_loaders_torchvision_and_none(mnist_root):
    train, _ = mnist_loaders(mnist_root, augment="torchvision", test="clean", train_subset=200, test_subset=10)
    assert isinstance(train, torch.utils.data.DataLoader) and len(train) == 2
    images, labels = next(iter(train))
    assert images.shape == (100, 1, 28, 28) and labels.shape == (100,)
    plain, _ = mnist_loaders(mnist_root, augment=None, test="clean", train_subset=200, test_subset=10)
    assert isinstance(plain, DeviceLoader) and not plain.augment
    with pytest.raises(ValueError, match="unknown augment 'pil'"):
        mnist_loaders(mnist_root, augment="pil")
    with pytest.raises(ValueError, match="train_subset=70000 is larger than the 60000 images"):
        mnist_loaders(mnist_root, train_subset=70000)


@pytest.mark.slow
def test_mnist_loaders_augmented_test_set_ignores_the_training_seed(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, a = mnist_loaders(mnist_root, seed=0, train_subset=100, test_subset=50)
    _, b = mnist_loaders(mnist_root, seed=1, train_subset=100, test_subset=50)
    x, _ = next(iter(a))
    assert torch.equal(x, next(iter(b))[0]) and not torch.equal(
        x, load_mnist(mnist_root, train=False)[0][:50, None] / 255
    )
