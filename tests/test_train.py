"""fit(), History, checkpoints and resume, callbacks, recalibrate_bn."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bnvit import MLP, JSONLLogger, ViT, fit, recalibrate_bn
from bnvit.data import DeviceLoader
from bnvit.training.callbacks import Callback
from bnvit.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint
from bnvit.training.history import EpochRecord, History
from toys import TINY, tiny_model, toy_data


def metrics(history: History) -> list[dict]:
    """Records without the wall-clock fields."""
    return [{k: v for k, v in asdict(r).items() if k not in ("seconds", "images_per_sec")} for r in history.records]


FIT = dict(epochs=3, lr=3e-3, batch_size=32, device="cpu", seed=0, progress=False)


# ----------------------------------------------------------------------------- basics


def test_fit_learns_and_records_every_epoch():
    data = toy_data()
    torch.manual_seed(0)
    history = fit(MLP(depth=1, hidden=32, norm="bn", num_classes=4), data, data, **FIT)
    assert len(history) == 3 and not history.diverged
    assert [r.epoch for r in history.records] == [1, 2, 3]
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] > 0.5  # 4 classes, chance is 0.25
    assert all(r.lr == pytest.approx(3e-3) for r in history.records)
    assert all(r.seconds > 0 and r.images_per_sec > 0 for r in history.records)
    assert history.meta["lr"] == 3e-3 and history.meta["batch_size"] == 32


@pytest.mark.parametrize("kind", ["tensors", "dataset", "dataloader", "deviceloader"])
def test_fit_accepts_every_data_kind(kind):
    images, labels = toy_data(64)
    data = {
        "tensors": (images, labels),
        "dataset": TensorDataset(images, labels),
        "dataloader": DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True),
        "deviceloader": DeviceLoader(images, labels, batch_size=16),
    }[kind]
    history = fit(tiny_model(), data, data, epochs=1, lr=1e-3, batch_size=16, device="cpu", progress=False)
    assert len(history) == 1
    assert 0.0 <= history.val_acc[0] <= 1.0


def test_same_seed_gives_the_same_history():
    data = toy_data()
    first = fit(tiny_model(seed=3), data, data, **FIT)
    second = fit(tiny_model(seed=3), data, data, **FIT)
    assert metrics(first) == metrics(second)
    other = fit(tiny_model(seed=3), data, data, **{**FIT, "seed": 1})
    assert metrics(other) != metrics(first)


def test_log_every_records_windows_that_add_up_to_the_epoch_and_leave_training_unchanged():
    images, labels = toy_data(128)  # 4 steps of 32 per epoch
    plain = fit(tiny_model(seed=3), (images, labels), **FIT)
    logged = fit(tiny_model(seed=3), (images, labels), **FIT, log_every=2)
    assert metrics(logged) == metrics(plain) and plain.steps == []
    assert [(r.step, r.epoch) for r in logged.steps] == [(2, 1), (4, 1), (6, 2), (8, 2), (10, 3), (12, 3)]
    for epoch, record in enumerate(logged.records, start=1):  # two windows of equal size: their mean is the epoch's
        windows = [r for r in logged.steps if r.epoch == epoch]
        assert sum(r.train_loss for r in windows) / 2 == pytest.approx(record.train_loss, rel=1e-12)
        assert sum(r.train_acc for r in windows) / 2 == pytest.approx(record.train_acc, rel=1e-12)
    assert History.from_dict(json.loads(json.dumps(logged.to_dict()))) == logged


def test_progress_false_is_silent_and_true_reports(capsys):
    data = toy_data(32)
    fit(tiny_model(), data, epochs=1, lr=1e-3, device="cpu", progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    fit(tiny_model(), data, epochs=1, lr=1e-3, device="cpu", progress=True)
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.out + captured.err


def test_scheduler_and_optimizer_choices():
    data = toy_data(64)
    history = fit(tiny_model(), data, scheduler="cosine", optimizer="adamw", weight_decay=0.05, **FIT)
    assert history.lr[0] == pytest.approx(3e-3) and history.lr[1] < history.lr[0]
    history = fit(tiny_model(), data, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **{**FIT, "epochs": 1})
    assert len(history) == 1


def test_max_grad_norm_clips(monkeypatch):
    seen = []
    original = nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        seen.append(max_norm)
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    fit(tiny_model(), toy_data(32), epochs=1, lr=1e-3, device="cpu", progress=False, max_grad_norm=0.5)
    assert seen and set(seen) == {0.5}


def test_callbacks_see_each_epoch_and_can_stop():
    class StopAfterTwo(Callback):
        def __init__(self):
            self.events = []

        def on_fit_start(self, state):
            self.events.append("start")

        def on_epoch_end(self, state, record):
            self.events.append(record.epoch)
            state.stop = record.epoch == 2

        def on_fit_end(self, state):
            self.events.append("end")

    callback = StopAfterTwo()
    history = fit(tiny_model(), toy_data(32), callbacks=[callback], **{**FIT, "epochs": 5})
    assert callback.events == ["start", 1, 2, "end"]
    assert len(history) == 2


# ----------------------------------------------------------------------------- divergence


class NaNAfter:
    """Cross-entropy that turns NaN from the `after`-th call on."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls >= self.after else loss


def test_divergence_ends_the_run_cleanly_and_keeps_the_past():
    images, labels = toy_data(64)  # 2 steps per epoch at batch 32
    loss_fn = NaNAfter(after=4)  # training step 2 of epoch 2 (validation also calls the loss)
    history = fit(tiny_model(), (images, labels), loss_fn=loss_fn, **{**FIT, "epochs": 5})
    assert history.diverged
    assert history.diverged_at == 2
    assert len(history) == 1 and history.records[0].epoch == 1
    assert history.diverged_step in (1, 2)
    assert "diverged in epoch 2" in repr(history)


def test_nan_inputs_are_refused_as_a_data_problem_not_recorded_as_divergence():
    images, labels = toy_data(32)
    images[3, 0, 5, 5] = float("nan")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^train data: image 3 holds a non-finite value \(nan\); .*not a divergence"):
        fit(model, (images, labels), **{**FIT, "epochs": 2})
    assert_untouched(model, before)


def test_huge_learning_rate_is_recorded_not_raised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    images, labels = toy_data(64)
    history = fit(model, (images * 1e30, labels), epochs=3, lr=1e30, device="cpu", progress=False, seed=0)
    assert history.diverged


# ----------------------------------------------------------------------------- bad input


def assert_untouched(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epochs=0), "epochs must be an int >= 1, got 0"),
        (dict(epochs=2.5), "epochs must be an int"),
        (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (dict(lr=-1e-3), "lr must be a finite number > 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(precision="fp8"), "unknown precision 'fp8'; valid choices"),
        (dict(optimizer="adamx"), "unknown optimizer 'adamx'"),
        (dict(scheduler="linear"), "unknown scheduler 'linear'"),
        (dict(log_every=0), "log_every must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_before_training(kwargs, match):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {**FIT, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        fit(model, toy_data(32), **args)
    assert_untouched(model, before)


def test_empty_data_fails():
    with pytest.raises(ValueError, match="empty"):
        fit(tiny_model(), TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), **FIT)


def test_labels_out_of_range_fail_before_training():
    images, labels = toy_data(32)
    labels[7] = 12
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*from 0 to 12"):
        fit(model, (images, labels), **FIT)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="val labels"):
        fit(model, toy_data(32), (images, labels), **FIT)
    with pytest.raises((ValueError, TypeError), match="integer class"):
        fit(model, (images, labels.float()), **FIT)
    with pytest.raises(ValueError, match="integer class indices"):
        fit(model, TensorDataset(images, labels.float()), **FIT)


def test_model_output_must_match_labels():
    images, labels = toy_data(32)
    with pytest.raises(ValueError, match="for a model with 3 outputs"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), (images, labels), **FIT)
    with pytest.raises(ValueError, match=r"\(batch, num_classes\) logits"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Flatten(0)), (images, labels), **FIT)


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write to the checkpoint_dir"):
        fit(tiny_model(), toy_data(32), checkpoint_dir=blocker / "sub", **FIT)


# ----------------------------------------------------------------------------- checkpoints and resume


def test_resume_gives_the_same_history_as_an_uninterrupted_run(tmp_path):
    data = toy_data()
    full = fit(tiny_model(), data, data, **{**FIT, "epochs": 4})
    first = fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    assert len(first) == 2
    resumed = fit(tiny_model(seed=99), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 4})
    assert metrics(resumed) == metrics(full)
    # a third call finds the run complete and trains nothing
    again = fit(tiny_model(seed=5), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 4})
    assert metrics(again) == metrics(full)


def test_checkpoint_holds_the_full_state(tmp_path):
    fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, scheduler="cosine", **FIT)
    saved = torch.load(tmp_path / LAST, weights_only=True)
    assert saved["epoch"] == 3
    assert {"model", "optimizer", "scheduler", "rng", "history", "run", "config"} <= set(saved)
    assert saved["scheduler"] is not None and len(saved["history"]["records"]) == 3
    previous = torch.load(tmp_path / PREVIOUS, weights_only=True)
    assert previous["epoch"] == 2


def test_a_different_run_in_the_same_folder_is_refused(tmp_path):
    fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    with pytest.raises(ValueError, match=r"(?s)different run.*lr: checkpoint 0.003, this call 0.01"):
        fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2, "lr": 0.01})
    with pytest.raises(ValueError, match=r"(?s)different run.*model\.norm: checkpoint 'bn_ffn', this call 'ln'"):
        fit(tiny_model(norm="ln"), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})


def _refused(folder: Path, model: nn.Module, data, *, expected: str, **kwargs) -> None:
    """A resume of the 1-epoch run in `folder` with something changed is refused, naming `expected`."""
    with pytest.raises(ValueError, match=r"(?s)holds a checkpoint of a different run.*\n  " + expected):
        fit(model, data, checkpoint_dir=folder, **{**FIT, "epochs": 2, **kwargs})


def test_a_resume_must_repeat_the_models_whole_configuration(tmp_path):
    fit(ViT(norm="bn_ffn", **TINY), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    _refused(
        tmp_path,
        ViT(norm="bn_ffn", drop_rate=0.1, **TINY),
        toy_data(32),
        expected="model.drop_rate: checkpoint 0.0, this call 0.1",
    )
    _refused(
        tmp_path, ViT(norm="bn_ffn", qkv_bias=True, **TINY), toy_data(32), expected="model.qkv_bias: checkpoint False"
    )


def test_a_resume_must_repeat_the_loss(tmp_path):
    fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    smoothed = functools.partial(nn.functional.cross_entropy, label_smoothing=0.1)
    default = "torch.nn.functional.cross_entropy"
    expected = f"loss_fn: checkpoint '{default}', this call '{default}\\(label_smoothing=0.1\\)'"
    _refused(tmp_path, tiny_model(), toy_data(32), loss_fn=smoothed, expected=expected)
    _refused(
        tmp_path,
        tiny_model(),
        toy_data(32),
        loss_fn=NaNAfter(5),
        expected="loss_fn: .* this call 'test_train.NaNAfter'",
    )
    module = nn.CrossEntropyLoss(label_smoothing=0.2)
    _refused(
        tmp_path,
        tiny_model(),
        toy_data(32),
        loss_fn=module,
        expected=r"loss_fn: .*CrossEntropyLoss\(.*label_smoothing=0\.2",
    )
    assert (
        len(fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})) == 2
    )  # the same: resumes


def test_a_resume_must_repeat_the_data_its_size_and_its_values(tmp_path):
    images, labels = toy_data(64)
    fit(tiny_model(), (images, labels), (images, labels), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    half = (images[:32], labels[:32])
    _refused(
        tmp_path, tiny_model(), half, val=(images, labels), expected="train_data.size: checkpoint 64, this call 32"
    )
    other = toy_data(64, seed=5)
    _refused(
        tmp_path,
        tiny_model(),
        other,
        val=(images, labels),
        expected="train_data.sample_sha256: checkpoint '[0-9a-f]{64}'",
    )
    _refused(tmp_path, tiny_model(), (images, labels), val=half, expected="val_data.size: checkpoint 64, this call 32")
    loader = DeviceLoader(images, labels, batch_size=32, seed=3)
    _refused(
        tmp_path,
        tiny_model(),
        loader,
        val=(images, labels),
        expected="train_data.kind: checkpoint 'tensors', this call 'DeviceLoader'",
    )
    changed = images.clone()
    changed[-1] += 0.5  # the last image is always in the sample
    _refused(tmp_path, tiny_model(), (changed, labels), val=(images, labels), expected="train_data.sample_sha256")


class Jittered(Dataset):
    """A dataset whose items pass through a random transform, as an augmenting dataset's do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i] + 0.01 * torch.rand(self.images[i].shape), self.labels[i]


def test_a_dataset_with_a_random_transform_still_resumes_and_changed_data_is_still_seen(tmp_path):
    images, labels = toy_data(48)
    run = dict(batch_size=16, epochs=1)
    fit(tiny_model(), Jittered(images, labels), checkpoint_dir=tmp_path, **{**FIT, **run})
    resumed = fit(tiny_model(), Jittered(images, labels), checkpoint_dir=tmp_path, **{**FIT, **run, "epochs": 2})
    assert len(resumed) == 2
    _refused(
        tmp_path,
        tiny_model(),
        Jittered(images.flip(0), labels.flip(0)),
        epochs=3,
        batch_size=16,
        expected="train_data.sample_sha256",
    )


def test_reading_the_data_for_the_fingerprint_draws_nothing_from_the_random_generators(tmp_path):
    images, labels = toy_data(48)

    def run(**kwargs) -> History:  # no seed: the shuffling and the transform draw from the global generators
        torch.manual_seed(0)
        loader = DataLoader(Jittered(images, labels), batch_size=16, shuffle=True)
        return fit(tiny_model(), loader, **{**FIT, "epochs": 1, "seed": None, **kwargs})

    assert metrics(run(checkpoint_dir=tmp_path)) == metrics(run())


def test_a_checkpoint_written_before_the_fingerprint_still_resumes(tmp_path):
    data = toy_data()
    full = fit(tiny_model(), data, data, **{**FIT, "epochs": 2})
    fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    saved = load_checkpoint(tmp_path)
    for key in ("model", "loss_fn", "train_data", "val_data"):  # what checkpoints of older versions lack
        del saved["run"][key]
    save_checkpoint(tmp_path, {k: v for k, v in saved.items() if k not in ("format",)})
    resumed = fit(tiny_model(), data, data, checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    assert metrics(resumed) == metrics(full)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    (tmp_path / LAST).write_bytes((tmp_path / LAST).read_bytes()[:1000])  # truncate
    with pytest.warns(RuntimeWarning, match="ignoring damaged checkpoint"):
        saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1


def test_a_diverged_run_is_not_retrained_on_resume(tmp_path):
    images, labels = toy_data(32)
    first = fit(tiny_model(), (images, labels), checkpoint_dir=tmp_path, loss_fn=NaNAfter(2), **FIT)
    again = fit(tiny_model(), (images, labels), checkpoint_dir=tmp_path, loss_fn=NaNAfter(2), **FIT)
    assert first.diverged and again.diverged and again.diverged_at == first.diverged_at


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import FIT, tiny_model, toy_data
    from bnvit import fit

    kill_at = int(sys.argv[2])
    steps = 0
    def count(module, args):  # the loss stays the default: a resume must repeat the run's loss
        global steps
        steps += module.training
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    data = toy_data()
    model = tiny_model()
    model.register_forward_pre_hook(count)
    fit(model, data, data, checkpoint_dir=sys.argv[1], **{{**FIT, "epochs": 4, "threads": 1}})
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent)))
    folder = tmp_path / "ckpt"
    # 96 samples / batch 32 = 3 training steps per epoch: step 8 is step 2 of epoch 3
    proc = subprocess.run([sys.executable, str(script), str(folder), "8"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(folder)["epoch"] == 2
    data = toy_data()
    run = {**FIT, "epochs": 4, "threads": 1}  # one count in both processes: the float rounding is the same
    resumed = fit(tiny_model(), data, data, checkpoint_dir=folder, **run)
    full = fit(tiny_model(), data, data, **run)
    assert metrics(resumed) == metrics(full)


# ----------------------------------------------------------------------------- History and loggers


def test_history_round_trips_through_json_and_csv(tmp_path):
    history = History(meta={"lr": 0.003})
    history.append(EpochRecord(1, 0.5, 0.8, 0.4, 0.85, 0.003, 10.0, 6000.0))
    history.append(EpochRecord(2, 0.3, 0.9, None, None, 0.003, 9.0, 6500.0))
    history.diverged_at, history.diverged_step = 3, 17
    assert History.from_json(history.to_json()) == history
    history.to_json(tmp_path / "h.json")
    assert History.from_json(tmp_path / "h.json") == history
    rows = history.to_csv(tmp_path / "h.csv").splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc") and rows[2].startswith("2,0.3,0.9,,")
    assert (tmp_path / "h.csv").read_text().splitlines() == rows
    text = repr(history)
    assert "2 epochs" in text and "diverged in epoch 3 at step 17" in text and "85.00%" in text
    with pytest.raises(ValueError, match="unknown History column 'acc'"):
        history.column("acc")


def test_history_json_is_strict_even_with_nan():
    history = History()
    history.append(EpochRecord(1, float("nan"), 0.1, float("inf"), 0.1, 0.003, 1.0, 1.0))
    data = json.loads(history.to_json())
    assert data["records"][0]["train_loss"] is None and data["records"][0]["val_loss"] is None


def test_jsonl_logger_logs_each_epoch_once_across_a_resume(tmp_path):
    data = toy_data(32)
    log = tmp_path / "log.jsonl"
    fit(tiny_model(), data, data, checkpoint_dir=tmp_path / "c", callbacks=[JSONLLogger(log)], **{**FIT, "epochs": 2})
    fit(tiny_model(), data, data, checkpoint_dir=tmp_path / "c", callbacks=[JSONLLogger(log)], **FIT)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line.get("epoch") for line in lines[:-1]] == [1, 2, 3]
    assert lines[-1] == {"end": True, "diverged_at": None, "diverged_step": None}


# ----------------------------------------------------------------------------- recalibrate_bn


def test_recalibrate_bn_computes_exact_statistics_with_weights_frozen():
    model = tiny_model().eval()
    bn = model.blocks[0].ffn.norm.bn
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    images, labels = toy_data(64)
    recalibrate_bn(model, (images, labels), batch_size=32, device="cpu")
    # expected: the mean over the two batches of the per-batch statistics of the fc1 output
    captured = []
    handle = model.blocks[0].ffn.fc1.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        model(images[:32])
        model(images[32:])
    handle.remove()
    flat = [c.reshape(-1, c.shape[-1]) for c in captured]
    mean = torch.stack([f.mean(0) for f in flat]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in flat]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var, atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.1 and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_recalibrate_bn_needs_a_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(tiny_model(norm="ln"), toy_data(32), device="cpu")


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


def test_fit_precise_bn_trains_the_same_weights_and_recalibrates_the_statistics(tmp_path):
    """precise_bn changes what is evaluated and saved, never the training: the same weights bit for bit."""
    data, val = toy_data(96), toy_data(64, seed=2)
    plain, precise = tiny_model(), tiny_model()
    fit(plain, data, val, threads=1, **FIT)
    history = fit(precise, data, val, threads=1, precise_bn=3, checkpoint_dir=tmp_path, **FIT)  # 3: every batch
    assert all(torch.equal(v, _weights(precise)[k]) for k, v in _weights(plain).items())
    # over every batch (of equal size) the mean statistic is the data's, whatever the order
    expected = recalibrate_bn(copy.deepcopy(precise), data, batch_size=32, device="cpu")
    bn, bn_plain, bn_expected = (m.blocks[0].ffn.norm.bn for m in (precise, plain, expected))
    torch.testing.assert_close(bn.running_mean, bn_expected.running_mean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bn_plain.running_mean, bn_expected.running_mean, atol=1e-3)
    assert history.meta["precise_bn"] == 3
    with pytest.raises(ValueError, match="precise_bn"):  # a resume must repeat it
        fit(tiny_model(), data, val, checkpoint_dir=tmp_path, **{**FIT, "epochs": 4})


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_fit_refuses_a_bad_precise_bn(bad, error):
    with pytest.raises(error, match=r"precise_bn must be an int >= 1, got"):
        fit(tiny_model(), toy_data(32), precise_bn=bad, **FIT)


def test_checkpoint_files_are_never_half_written(tmp_path, monkeypatch):
    """A crash inside torch.save leaves the previous checkpoint intact and loadable."""
    fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    good = (tmp_path / LAST).read_bytes()

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny_model(), toy_data(32), checkpoint_dir=tmp_path, **{**FIT, "epochs": 2})
    assert (tmp_path / LAST).read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
