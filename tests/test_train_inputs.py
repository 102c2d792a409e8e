"""Nothing wrong in the data passes silently: NaN/inf images, labels out of range, a last batch of one
image under BatchNorm, images of another dtype; and a resumed run says so."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bnvit import MLP, evaluate, fit
from toys import tiny_model, toy_data

FIT = dict(epochs=1, lr=3e-3, batch_size=16, device="cpu", seed=0, progress=False)


class Pairs(Dataset):
    """A map-style dataset that exposes neither `.labels` nor `.targets`: fit can only check it batch by batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels_ = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels_[i]


def batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# ----------------------------------------------------------------------------- NaN and inf in the images


def test_a_nan_in_a_training_batch_is_refused_before_batchnorm_sees_it():
    images, labels = toy_data(48)
    images[17, 0, 2, 2] = float("nan")  # batch 2 (batches of 16, unshuffled), image 1 of it
    model = tiny_model()
    with pytest.raises(ValueError) as info:
        fit(model, DataLoader(TensorDataset(images, labels), batch_size=16), **FIT)
    message = str(info.value)
    assert message.startswith("train data, batch 2 of epoch 1/1: image 1 of the batch holds a non-finite value (nan)")
    assert "\n" not in message
    # Batch 1 trained, batch 2 never reached the forward pass: one update of the statistics.
    stats = batchnorm_stats(model)
    assert all(int(v) == 1 for k, v in stats.items() if k.endswith("num_batches_tracked"))


def test_an_inf_in_the_first_batch_leaves_the_running_statistics_unchanged():
    images, labels = toy_data(32)
    images[0, 0, 0, 0] = float("inf")
    model = tiny_model()
    before = batchnorm_stats(model)
    with pytest.raises(ValueError, match=r"^train data, batch 1 of epoch 1/1: image 0 of the batch .* \(inf\)"):
        fit(model, DataLoader(TensorDataset(images, labels), batch_size=16), **FIT)
    after = batchnorm_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean, running_var, num_batches_tracked


def test_tensor_data_is_checked_whole_before_training():
    images, labels = toy_data(32)
    images[20, 0, 9, 9] = float("-inf")
    model = tiny_model()
    before = batchnorm_stats(model)
    with pytest.raises(ValueError, match=r"^train data: image 20 holds a non-finite value \(-inf\)"):
        fit(model, (images, labels), **FIT)
    assert all(torch.equal(before[k], v) for k, v in batchnorm_stats(model).items())


def test_a_nan_in_validation_is_an_error_not_a_nan_val_loss():
    images, labels = toy_data(32)
    bad = images.clone()
    bad[5, 0, 1, 1] = float("nan")
    val = DataLoader(Pairs(bad, labels), batch_size=16)
    with pytest.raises(ValueError, match=r"^validation data, batch 1: image 5 of the batch holds a non-finite"):
        fit(tiny_model(), (images, labels), val, **FIT)
    with pytest.raises(ValueError, match=r"^validation data: image 5 holds a non-finite value \(nan\)"):
        fit(tiny_model(), (images, labels), (bad, labels), **FIT)
    with pytest.raises(ValueError, match=r"^evaluation data, batch 1: image 5 of the batch"):
        evaluate(tiny_model(), val, device="cpu")


def test_a_diverged_run_from_finite_data_is_still_recorded_not_raised():
    torch.manual_seed(0)
    images, labels = toy_data(64)
    history = fit(tiny_model(), DataLoader(TensorDataset(images, labels), batch_size=16), **{**FIT, "lr": 1e6})
    assert history.diverged and history.diverged_at == 1


# ----------------------------------------------------------------------------- labels


def test_a_label_out_of_range_in_a_dataset_is_named_with_its_batch():
    images, labels = toy_data(48)
    labels[35] = 12  # batch 3, image 3 of it
    with pytest.raises(ValueError) as info:
        fit(tiny_model(), DataLoader(Pairs(images, labels), batch_size=16), **FIT)
    assert str(info.value) == (
        "train data, batch 3 of epoch 1/1: label 12 (image 3 of the batch) is outside [0, 10), "
        "the class indices of a model with 10 outputs"
    )
    labels[35] = -1
    with pytest.raises(ValueError, match=r"^validation data, batch 3: label -1 \(image 3 of the batch\) is outside"):
        fit(tiny_model(), toy_data(32), DataLoader(Pairs(images, labels), batch_size=16), **FIT)


# ----------------------------------------------------------------------------- a last batch of one image


def test_a_last_batch_of_one_image_is_dropped_for_a_batchnorm_mlp_with_one_warning():
    images, labels = toy_data(33)  # batches of 16, 16 and 1
    model = MLP(norm="bn", hidden=32)
    with pytest.warns(RuntimeWarning, match=r"last training batch .* single image.* dropped, 2 batches per epoch") as w:
        history = fit(model, (images, labels), **{**FIT, "epochs": 2})
    assert len([x for x in w if "single image" in str(x.message)]) == 1
    assert len(history) == 2 and not history.diverged
    tracked = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert tracked and all(t == 2 * 2 for t in tracked)
    model = MLP(norm="bn", hidden=32)
    with pytest.warns(RuntimeWarning, match="single image"):  # a DataLoader too
        fit(model, DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True), **FIT)


@pytest.mark.parametrize(
    ("n", "batch_size", "what"), [(1, 16, "the training data is a single image"), (8, 1, "the batch size is 1")]
)
def test_only_single_image_batches_for_a_batchnorm_mlp_are_refused_before_training(n, batch_size, what):
    images, labels = toy_data(n)
    model = MLP(norm="bn", hidden=32)
    before = batchnorm_stats(model)
    for data in ((images, labels), DataLoader(TensorDataset(images, labels), batch_size=batch_size)):
        with pytest.raises(ValueError, match=rf"^every training batch holds a single image \({what}\), and the model"):
            fit(model, data, **{**FIT, "batch_size": batch_size})
    after = batchnorm_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fit(tiny_model(), (images, labels), **{**FIT, "batch_size": batch_size})  # a ViT trains on one image


def test_a_vit_keeps_its_last_batch_of_one_image_silently():
    images, labels = toy_data(33)
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, (images, labels), **FIT)
    assert int(model.blocks[0].ffn.norm.bn.num_batches_tracked) == 3  # 16, 16 and 1 image


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_another_float_dtype_are_cast_to_the_model_dtype(dtype):
    images, labels = toy_data(32)
    loader = DataLoader(TensorDataset(images.to(dtype), labels), batch_size=16)
    for precision in ("fp32", "bf16"):
        history = fit(tiny_model(), loader, loader, **{**FIT, "precision": precision})
        assert not history.diverged and history.val_acc[-1] is not None
    assert 0.0 <= evaluate(tiny_model(), loader, device="cpu")["acc"] <= 1.0


def test_a_float64_model_keeps_float64_images():
    images, labels = toy_data(32)
    model = tiny_model(dtype=torch.float64)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    fit(model, DataLoader(TensorDataset(images, labels), batch_size=16), **{**FIT, "precision": "fp32"})
    assert set(seen) == {torch.float64}


# ----------------------------------------------------------------------------- resuming says so


def test_a_resumed_run_says_where_it_resumes(tmp_path, capsys):
    data = toy_data(32)
    fit(tiny_model(), data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    capsys.readouterr()
    fit(tiny_model(), data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 3, "progress": True})
    out = capsys.readouterr().out
    assert f"resuming from epoch 2 of 3 (checkpoint_dir {tmp_path}): epochs 3-3 to go" in out
    fit(tiny_model(), data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 3})  # progress=False: silent
    captured = capsys.readouterr()
    assert "resuming" not in captured.out + captured.err


# ----------------------------------------------------------------------------- configuration errors are errors


@pytest.mark.parametrize("weight_decay", [float("nan"), float("inf"), -0.1])
def test_a_weight_decay_that_is_not_finite_and_non_negative_is_refused_before_training(weight_decay):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"weight_decay must be a finite number >= 0, got {weight_decay}"):
        fit(model, toy_data(32), **{**FIT, "weight_decay": weight_decay})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda params: torch.optim.SGD(params, lr=float("inf")), "the optimizer's lr is inf"),
        (lambda params: torch.optim.Adam(params, lr=1e-3, eps=float("inf")), "the optimizer's eps is inf"),
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=float("nan")), "momentum is nan"),
    ],
)
def test_a_non_finite_hyperparameter_of_any_optimizer_is_refused_before_training(factory, message):
    with pytest.raises(ValueError, match=message):
        fit(tiny_model(), toy_data(32), **{**FIT, "optimizer": factory})


def test_a_model_with_every_parameter_frozen_is_refused_in_one_line():
    model = tiny_model().requires_grad_(False)
    for optimizer in ("adam", lambda params: torch.optim.SGD(params, lr=0.1)):
        with pytest.raises(ValueError, match=r"every one is frozen \(requires_grad=False\): there is nothing to train"):
            fit(model, toy_data(32), **{**FIT, "optimizer": optimizer})
    model.head.requires_grad_(True)  # a linear probe trains
    assert len(fit(model, toy_data(32), **FIT)) == 1


# ----------------------------------------------------------------------------- labels of the wrong type


class Labelled(Dataset):
    """Images with labels of whatever type the test gives."""

    def __init__(self, labels: list) -> None:
        self.images, self.labels_ = toy_data(len(labels))[0], labels

    def __len__(self) -> int:
        return len(self.labels_)

    def __getitem__(self, i: int):
        return self.images[i], self.labels_[i]


@pytest.mark.parametrize(
    ("labels", "got"),
    [
        (["3", "1"] * 16, "got str ('3')"),
        ([b"3", b"1"] * 16, "got bytes (b'3')"),
        ([None] * 32, "got NoneType"),
        ([{"digit": 3}] * 32, "got dict"),
        ([1.0, 2.5] * 16, "got dtype torch.float64"),
        ([True, False] * 16, "got dtype torch.bool"),
    ],
)
@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_of_the_wrong_type_are_one_value_error_naming_the_type(labels, got, split):
    data, good = Labelled(labels), toy_data(32)
    train, val = (data, good) if split == "train" else (good, data)
    message = rf"^{split} labels must be integer class indices.*, {re.escape(got)}( \(item 0\))?$"
    with pytest.raises(ValueError, match=message) as info:
        fit(tiny_model(), train, val, **FIT)
    assert "\n" not in str(info.value)


def test_a_later_batch_with_string_labels_is_refused_naming_the_type_and_batch():
    loader = DataLoader(Labelled([0, 1] * 8 + ["3"] * 16), batch_size=16)  # batch 1 is fine, batch 2 holds strings
    with pytest.raises(ValueError, match=r"^train data, batch 2 of epoch 1/1: labels must be .*got str \('3'\)$"):
        fit(tiny_model(), loader, **FIT)


def test_a_dataset_mixing_ints_and_strings_is_refused_naming_the_first_string():
    labels = [0, 1, 2] + ["3"] + [1] * 28  # collated together, they cannot be stacked
    with pytest.raises(ValueError, match=r"^train labels must be integer .*got str \('3'\) \(item 3\)$"):
        fit(tiny_model(), Labelled(labels), **{**FIT, "batch_size": 32})
