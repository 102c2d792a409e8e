"""Calibrated probabilities: the temperature fit, the calibration error, and where temperatures live."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

from _bnvit_cli import main
from bnvit.data import load_mnist
from bnvit.weights import calibration as cal
from bnvit.weights.hub import model_card
from bnvit.weights.loading import SHIPPED, WEIGHTS_DIR, shipped_record

REFERENCE = "FinOptAug1_ViT_30.pth"
ERRING = "FinOptAug1_ViTBNFFN_30.pth"  # wrong on 27 of MNIST's training images 59000-59999 at even positions


def _sampled(temperature: float, n: int = 20_000, classes: int = 10, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): calibrated at exactly that temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 4
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=g)[:, 0]
    return logits, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_the_fit_recovers_the_temperature_the_labels_were_drawn_at(temperature):
    logits, labels = _sampled(temperature)
    assert cal.fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.04)


def test_the_fit_minimizes_the_negative_log_likelihood():
    logits, labels = _sampled(1.7, n=3000)
    t = cal.fit_temperature(logits, labels)

    def nll(value: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / value, labels))

    assert nll(t) < min(nll(t * 0.98), nll(t * 1.02))
    assert cal.fit_temperature(logits.float(), labels) == pytest.approx(t, rel=1e-5)  # float32 in, same answer


def test_degenerate_data_gives_the_bounds_not_an_error():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert cal.fit_temperature(logits, torch.tensor([0, 1])) == pytest.approx(1e-3)  # right at any sharpness
    assert cal.fit_temperature(torch.zeros(2, 2), torch.tensor([0, 1])) == pytest.approx(1e3)  # no information


@pytest.mark.parametrize(
    ("logits", "labels", "error", "message"),
    [
        ([[1.0, 0.0]], torch.tensor([0]), TypeError, "expected tensors, got list"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), ValueError, r"logits \(N, classes\) and labels \(N,\)"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ValueError, "N >= 1"),
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), ValueError, "NaN or infinite"),
        (torch.zeros(1, 2), torch.tensor([2]), ValueError, r"integers in 0\.\.1"),
        (torch.zeros(1, 2), torch.tensor([0.0]), ValueError, r"integers in 0\.\.1"),
    ],
)
def test_bad_input_is_a_one_line_error(logits, labels, error, message):
    with pytest.raises(error, match=message):
        cal.fit_temperature(logits, labels)


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_measures_the_gap():
    logits, labels = _sampled(1.0, n=50_000)
    assert cal.expected_calibration_error(logits.softmax(1), labels) < 0.01
    assert cal.expected_calibration_error((logits / 0.5).softmax(1), labels) > 0.05  # overconfident
    right = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)  # 80% stated, 60% right
    assert cal.expected_calibration_error(right, labels) == pytest.approx(0.2)


def test_reliability_bins_cover_every_image_once():
    logits, labels = _sampled(1.0, n=1000)
    probabilities = logits.softmax(1)
    table = cal.reliability(probabilities, labels, bins=10)
    assert sum(b["count"] for b in table) == 1000
    assert all(b["lower"] < b["confidence"] <= b["upper"] for b in table)
    certain = cal.reliability(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bins=4)
    assert [(b["lower"], b["upper"], b["count"]) for b in certain] == [(0.75, 1.0, 1)]
    with pytest.raises(ValueError, match="bins must be a positive int, got 0"):
        cal.reliability(probabilities, labels, bins=0)


# ---------------------------------------------------------------------------- the shipped weights


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_carry_their_temperature_in_record_file_and_card(name):
    calibration = shipped_record(name)["calibration"]
    t = calibration["temperature"]
    assert cal.shipped_temperature(name) == t and 0.3 < t < 0.7  # label smoothing 0.1: the logits were timid
    with safe_open(str(WEIGHTS_DIR / f"{name}.safetensors"), framework="pt") as f:
        assert float(f.metadata()["temperature"]) == t
    assert "training images 50000-59999" in calibration["fitted_on"] and "test" not in calibration["fitted_on"]
    test = calibration["test"]
    assert test["after"]["ece"] < 0.005 < 0.05 < test["before"]["ece"]
    assert test["after"]["nll"] < test["before"]["nll"]
    card = model_card(name)
    assert card["details"]["Calibration"]["temperature"].startswith(f"{t}: ")
    assert f"/ {t}).softmax(-1)" in card["usage"]
    assert any(f"softmax(logits / {t})" in note for note in timm.get_pretrained_cfg(name).notes)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_recorded_test_set_effect_is_what_the_weights_do(name, mnist_root):
    """The record's before/after calibration error on the test set, recomputed from the shipped file."""
    model = timm.create_model(name, pretrained=True)
    images, labels = load_mnist(mnist_root, train=False)
    logits = cal.model_logits(model, images)
    test = shipped_record(name)["calibration"]["test"]
    t = cal.shipped_temperature(name)
    assert cal.expected_calibration_error(logits.softmax(1), labels) == pytest.approx(test["before"]["ece"], abs=2e-4)
    after = cal.expected_calibration_error((logits / t).softmax(1), labels)
    assert after == pytest.approx(test["after"]["ece"], abs=2e-4)


# ---------------------------------------------------------------------------- a user's checkpoint


@pytest.fixture
def checkpoint(tmp_path, reference_checkpoints):
    """A copy of a reference checkpoint, so that the calibration file lands in a temporary folder."""
    path = tmp_path / REFERENCE
    shutil.copy(reference_checkpoints / REFERENCE, path)
    return path


@pytest.fixture
def erring_checkpoint(tmp_path, reference_checkpoints):
    """A copy of the reference checkpoint that makes enough mistakes on 1,000 training images to fit T on."""
    path = tmp_path / ERRING
    shutil.copy(reference_checkpoints / ERRING, path)
    return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory, mnist_root):
    images, labels = load_mnist(mnist_root, train=False)
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    Image.fromarray(images[0].numpy()).save(path)
    return str(path), int(labels[0])


@pytest.mark.slow
def test_bnvit_calibrate_writes_what_predict_then_applies(erring_checkpoint, mnist_root, digit_png, capsys):
    checkpoint = erring_checkpoint
    path, label = digit_png
    assert main(["predict", path, "--checkpoint", str(checkpoint), "--json"]) == 0
    (raw,) = json.loads(capsys.readouterr().out)
    assert raw["temperature"] == 1.0  # nothing calibrated yet: the raw softmax

    argv = ["calibrate", str(checkpoint), "--images", "59000:60000", "--data-dir", str(mnist_root), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads(cal.calibration_path(checkpoint).read_text())
    assert stored["temperature"] == printed["temperature"] and stored["images"] == 1000
    assert stored["source"] == "MNIST training images 59000-59999"
    assert stored["held_out"] == 500 and stored["errors"] >= cal.MIN_ERRORS
    assert stored["nll_after"] <= stored["nll_before"] and stored["ece_after"] <= stored["ece_before"]

    assert main(["predict", path, "--checkpoint", str(checkpoint), "--json"]) == 0
    (calibrated,) = json.loads(capsys.readouterr().out)
    assert calibrated["temperature"] == stored["temperature"] and calibrated["digit"] == raw["digit"] == label
    logit_gap = torch.tensor(raw["probabilities"]).log()
    expected = (logit_gap / stored["temperature"]).softmax(0)  # log-softmax is the logits up to a constant
    torch.testing.assert_close(torch.tensor(calibrated["probabilities"]), expected, atol=1e-5, rtol=1e-4)


def test_a_stale_calibration_is_refused_not_applied(checkpoint, mnist_root, digit_png, capsys):
    result = cal.Calibration(0.5, 8, "noise", 1.0, 0.9, 0.1, 0.05, held_out=4, errors=4)
    cal.write_calibration(checkpoint, result)
    state = torch.load(checkpoint, weights_only=True)
    state = state.get("model_state_dict", state.get("state_dict", state)) if isinstance(state, dict) else state
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1  # the checkpoint changes after its calibration
    torch.save(state, checkpoint)
    assert main(["predict", digit_png[0], "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "fitted for other weights" in err and f"bnvit calibrate {checkpoint}" in err
    cal.calibration_path(checkpoint).write_text("{not json")
    assert main(["predict", digit_png[0], "--checkpoint", str(checkpoint)]) == 2
    assert "is not a calibration file bnvit wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--images", "10:5"], "expected 0 <= START < STOP"),
        (["--images", "50000"], "expected START:STOP"),
        (["--images", "59000:60001"], "MNIST has 60,000 training images"),
    ],
)
def test_bnvit_calibrate_refuses_bad_ranges(checkpoint, mnist_root, flags, message, capsys):
    try:
        status = main(["calibrate", str(checkpoint), "--data-dir", str(mnist_root), *flags])
    except SystemExit as exit_:  # refused by the argument parser
        status = exit_.code
    assert status == 2 and message in capsys.readouterr().err
    assert not cal.calibration_path(checkpoint).exists()


def test_bnvit_calibrate_without_mnist_says_where_it_looked(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", str(checkpoint), "--data-dir", str(tmp_path / "empty")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bnvit calibrate: error: MNIST training files not found") and "empty" in line
    assert not cal.calibration_path(checkpoint).exists()


def test_the_summary_line_says_mnist_and_where_the_fit_was_checked(erring_checkpoint, mnist_root, capsys):
    argv = ["calibrate", str(erring_checkpoint), "--images", "59000:60000", "--data-dir", str(mnist_root)]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "fitted on 500 of the 1,000 MNIST training images 59000-59999 and checked on the other 500:" in line


def test_a_range_without_mistakes_is_too_few_errors_and_nothing_is_written(checkpoint, mnist_root, capsys):
    argv = ["calibrate", str(checkpoint), "--images", "59900:60000", "--data-dir", str(mnist_root)]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bnvit calibrate: error: too few errors to fit a temperature on MNIST training images")
    assert f"wrong on 0 of the 50 images it would be fitted on, and needs at least {cal.MIN_ERRORS}" in line
    assert line.endswith("nothing was written") and not cal.calibration_path(checkpoint).exists()


class _Table(torch.nn.Module):
    """A 'model' whose logits for image i are row i of `table` (i is stored in the image's first pixel)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()]


def _images(n: int) -> torch.Tensor:
    images = torch.zeros(n, 1, 28, 28)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return images


def test_a_temperature_that_raises_the_calibration_error_on_the_held_out_images_is_refused():
    fit_logits, fit_labels = _sampled(3.0, n=1000, seed=1)  # images at even positions: calibrated at T = 3
    check_logits, check_labels = _sampled(1.0, n=1000, seed=2)  # at odd positions: calibrated as they are
    table = torch.stack([fit_logits, check_logits], 1).reshape(2000, -1).float()
    labels = torch.stack([fit_labels, check_labels], 1).reshape(2000)
    with pytest.raises(
        ValueError,
        match=r"^refusing the temperature fit on table: T = 3\.0541 raises the expected "
        r"calibration error on the 1,000 held-out images from 3\.04% to 35\.89% \(",
    ) as info:
        cal.calibrate(_Table(table), _images(2000), labels, source="table")
    assert "\n" not in str(info.value)
    # the same images, both halves calibrated at T = 3: accepted, and the check improves
    both, both_labels = _sampled(3.0, n=2000, seed=3)
    result = cal.calibrate(_Table(both.float()), _images(2000), both_labels, source="table")
    assert result.temperature == pytest.approx(3.0, rel=0.1) and result.ece_after < result.ece_before
    assert (result.images, result.held_out) == (2000, 1000)


def test_a_fit_that_ends_at_a_bound_is_refused_with_the_numbers():
    labels = torch.arange(40) // 2 % 4  # logits that say nothing: 30 of 40 wrong, T runs to the upper bound
    with pytest.raises(
        ValueError,
        match=r"ended at T = 1000, a bound of its search \(0\.001 to 1000\), with 15 of "
        r"20 images wrong: the probabilities would be flattened to chance \(accuracy 25\.0%\)",
    ):
        cal.calibrate(_Table(torch.zeros(40, 4)), _images(40), labels, source="table")
