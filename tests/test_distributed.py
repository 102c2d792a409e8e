"""Training with several processes: DDP on the CPU (gloo), SyncBatchNorm, sharding, rank 0's duties, resume.

Two processes are started once for the module (`ddp_runs`) with torchrun's environment and run
the scenarios of `ddp_worker.py`; each test checks one property of what they wrote, against
each other or against a single process. Starting the two processes (importing torch and timm
twice on 2 cores) is most of the ~15 s this costs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import bnvit
from bnvit import fit
from bnvit.data import DeviceLoader
from bnvit.training.checkpoint import load_checkpoint
from bnvit.training.distributed import CPUSyncBatchNorm, Distributed, convert_batchnorm, restore_batchnorm, setup, shard
from ddp_worker import EQUIVALENCE, float64_loader, metrics, tiny_model, toy_data

WORKER = Path(__file__).with_name("ddp_worker.py")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# In float64, two processes of 50 images and one process of 100 compute the same numbers up to
# the order of floating-point sums: after 6 Adam steps the weights differ by 1e-12 (bn_ffn) and
# 1e-10 (bn), measured.
FLOAT64_TOLERANCE = 1e-9
# fit() computes the loss in float32 whatever the model's dtype (`logits.float()`), so the
# recorded losses agree to float32 rounding (~1e-7 for losses near 1).
LOSS_TOLERANCE = 1e-6
# Without SyncBatchNorm each process normalizes with the statistics of its own 50 images: after
# 6 steps the parameters differ by 3.7e-3 (bn_ffn) and 3.4e-3 (bn), measured; 1e-4 is far above
# the float64 agreement and far below the measured gap.
WITHOUT_SYNC_MIN_DIFFERENCE = 1e-4
# In float32 the shuffled DeviceLoader path agrees to ~1e-7 except where a gradient is zero in
# exact arithmetic: the bias of the Linear layer just before a BatchNorm (the BatchNorm removes
# any constant). There the gradient is rounding noise (~1e-10) and Adam, which divides by its
# running magnitude, turns noise into steps of up to ~lr: those differ by up to steps * lr, and
# so does the running mean of that BatchNorm, which tracks the bias.
FLOAT32_TOLERANCE = 1e-5
ZERO_GRADIENT = ("blocks.0.ffn.fc1.bias", "blocks.0.ffn.norm.bn.running_mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *args: str, world_size: int = 2, timeout: float = 120) -> list[int]:
    """Run `ddp_worker.py out args` as `world_size` processes; their output goes to `out/rank*.log`.

    Fails the test if a process hangs past `timeout` (all are killed) or exits with an error.
    """
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(out), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        codes = None
    finally:
        for log in logs:
            log.close()
    output = "\n".join(f"--- rank {r}\n{(out / f'rank{r}.log').read_text()[-3000:]}" for r in range(world_size))
    if codes is None:
        pytest.fail(f"the processes hung for {timeout} s (a collective no other process joined?)\n{output}")
    return codes if args[0] == "killed" else _check(codes, output)


def _check(codes: list[int], output: str) -> list[int]:
    if any(codes):
        pytest.fail(f"worker exit codes {codes}\n{output}")
    return codes


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    launch(out, "equivalence", "checkpoints", "agreement", "syncbn")
    return out


def load_rank(out: Path, name: str, rank: int):
    path = out / f"{name}-rank{rank}"
    if path.with_suffix(".json").exists():
        return json.loads(path.with_suffix(".json").read_text())
    return torch.load(path.with_suffix(".pt"), weights_only=True)


def max_difference(a: dict, b: dict, keys=None) -> dict[str, float]:
    keys = a.keys() if keys is None else keys
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in keys if a[k].is_floating_point()}


# ----------------------------------------------------------------------------- SyncBatchNorm: 2 x 50 = 1 x 100


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
def test_syncbn_two_processes_of_50_equal_one_process_of_100(ddp_runs, norm):
    single_model = tiny_model(norm, dtype=torch.float64)
    single = fit(single_model, float64_loader(), distributed=False, **EQUIVALENCE)
    ddp_metrics, ddp_state, _ = load_rank(ddp_runs, "equivalence", 0)[f"{norm}-True-float64"]
    assert len(ddp_metrics) == 3
    for mine, theirs in zip(ddp_metrics, metrics(single), strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=LOSS_TOLERANCE)
        assert mine["train_acc"] == theirs["train_acc"]
    differences = max_difference(ddp_state, single_model.state_dict())
    assert max(differences.values()) <= FLOAT64_TOLERANCE, sorted(differences.items(), key=lambda kv: -kv[1])[:3]
    assert single_model.state_dict().keys() == ddp_state.keys()


@pytest.mark.parametrize("norm", ["bn_ffn", "bn"])
def test_without_syncbn_the_weights_measurably_differ(ddp_runs, norm):
    single_model = tiny_model(norm, dtype=torch.float64)
    fit(single_model, float64_loader(), distributed=False, **EQUIVALENCE)
    _, local_state, _ = load_rank(ddp_runs, "equivalence", 0)[f"{norm}-False-float64"]
    parameters = [name for name, _ in single_model.named_parameters()]
    differences = max_difference(local_state, single_model.state_dict(), parameters)
    assert max(differences.values()) > WITHOUT_SYNC_MIN_DIFFERENCE


def test_syncbn_float32_shuffled_device_loader_matches_one_process(ddp_runs):
    """The default path: tensors -> a shuffled DeviceLoader, sharded; 2 steps of 2 x 50 per epoch."""
    single_model = tiny_model("bn_ffn")
    single = fit(single_model, toy_data(200), distributed=False, **EQUIVALENCE)
    ddp_metrics, ddp_state, _ = load_rank(ddp_runs, "equivalence", 0)["bn_ffn-True-float32"]
    for mine, theirs in zip(ddp_metrics, metrics(single), strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=FLOAT32_TOLERANCE)
    differences = max_difference(ddp_state, single_model.state_dict())
    steps = 2 * EQUIVALENCE["epochs"]
    for name, difference in differences.items():
        bound = steps * EQUIVALENCE["lr"] if name in ZERO_GRADIENT else FLOAT32_TOLERANCE
        assert difference <= bound, (name, difference)


def test_every_process_ends_with_the_same_plain_model(ddp_runs):
    first, second = load_rank(ddp_runs, "equivalence", 0), load_rank(ddp_runs, "equivalence", 1)
    for case, (_, state, types) in first.items():
        assert all(torch.equal(state[k], second[case][1][k]) for k in state), case
        assert types == ["BatchNorm1d"], case  # the SyncBatchNorms were swapped back


# ----------------------------------------------------------------------------- the same History, rank 0 writes


def test_history_is_identical_on_both_ranks(ddp_runs):
    first, second = load_rank(ddp_runs, "checkpoints", 0), load_rank(ddp_runs, "checkpoints", 1)
    assert first["full"] == second["full"]  # every field, timings included
    assert len(first["full"]["records"]) == 4
    assert first["full"]["meta"]["world_size"] == 2 and first["full"]["meta"]["device"] == "cpu"
    losses = [r["train_loss"] for r in first["full"]["records"]]
    assert losses[-1] < losses[0]


def test_only_rank_0_writes_checkpoints_logs_and_progress(ddp_runs):
    first, second = load_rank(ddp_runs, "checkpoints", 0), load_rank(ddp_runs, "checkpoints", 1)
    assert first["full_saves"] == [1, 2, 3, 4]
    assert second["full_saves"] == [] and second["all_saves"] == []
    log = [json.loads(line) for line in (ddp_runs / "log-rank0.jsonl").read_text().splitlines()]
    assert [line.get("epoch") for line in log[:-1]] == [1, 2, 3, 4] and log[-1]["end"]
    assert not (ddp_runs / "log-rank1.jsonl").exists()
    assert "epoch 4/4" in (ddp_runs / "rank0.log").read_text()
    assert "epoch" not in (ddp_runs / "rank1.log").read_text()


def test_checkpoint_loads_into_a_plain_model(ddp_runs):
    saved = load_checkpoint(ddp_runs / "full")
    assert saved["epoch"] == 4
    plain = tiny_model(seed=5)
    plain.load_state_dict(saved["model"])  # strict: the same keys as a model without SyncBatchNorm
    for rank in (0, 1):
        trained = load_rank(ddp_runs, "model", rank)
        assert all(torch.equal(trained[k], saved["model"][k]) for k in trained)


def test_resume_under_ddp_gives_the_uninterrupted_history(ddp_runs):
    for rank in (0, 1):
        record = load_rank(ddp_runs, "checkpoints", rank)
        assert len(record["stopped"]) == 2  # rank 0's callback stopped both processes
        assert record["resumed"] == record["full_metrics"]
    assert load_rank(ddp_runs, "checkpoints", 0)["all_saves"] == [1, 2, 3, 4, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- no process is left waiting


def test_a_setup_error_on_one_process_raises_on_all(ddp_runs):
    first, second = load_rank(ddp_runs, "agreement", 0), load_rank(ddp_runs, "agreement", 1)
    assert second["error"].startswith("ValueError: val labels must lie in [0, 10)")
    assert first["error"].startswith("RuntimeError: process(es) of rank [1] failed")


def test_a_non_finite_loss_on_one_process_stops_both_at_the_same_step(ddp_runs):
    """Were the processes not to agree, the other one would wait forever in its next step's collective."""
    first, second = load_rank(ddp_runs, "agreement", 0), load_rank(ddp_runs, "agreement", 1)
    assert first["diverged_at"] == 1 and first["history"]["diverged_step"] is not None
    assert first["history"] == second["history"]


def test_a_nan_image_in_one_process_batch_raises_on_both_before_its_forward_pass(ddp_runs):
    """Raised on one process only, the other would wait in its next collective: both raise, at the same batch."""
    first, second = load_rank(ddp_runs, "agreement", 0), load_rank(ddp_runs, "agreement", 1)
    assert second["data_error"].startswith(
        "ValueError: train data, batch 2 of epoch 1/1: image 4 of the batch holds a non-finite value (nan)"
    )
    expected = (
        "RuntimeError: process(es) of rank [1] found bad data in train data, batch 2 of epoch 1/1; see their error"
    )
    assert first["data_error"] == expected


@pytest.mark.parametrize("case", ["2d", "4d"])
def test_cpu_syncbatchnorm_equals_batchnorm_over_the_whole_batch(ddp_runs, case):
    """Unequal shares (3 and 5 samples): forward, running statistics and gradients as for all 8 at once."""
    shape, momentum = ((8, 6), 0.1) if case == "2d" else ((8, 6, 3, 2), None)
    torch.manual_seed(0)
    full = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    upstream = torch.randn(*shape, dtype=torch.float64)
    bn = (nn.BatchNorm1d if case == "2d" else nn.BatchNorm2d)(6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    y = bn(full)
    (y * upstream).sum().backward()
    ranks = [load_rank(ddp_runs, "syncbn", r)[case] for r in (0, 1)]
    close = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), full.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_weight"] + ranks[1]["grad_weight"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_bias"] + ranks[1]["grad_bias"], bn.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"], bn.running_var, **close)


@pytest.mark.slow
def test_sigkill_under_ddp_then_rerun_resumes(ddp_runs, tmp_path):
    # 96 samples, global batch 32: 3 steps and 1 validation call per epoch on each process;
    # call 10 of rank 0 is step 2 of epoch 3. Rank 1 is then stuck in a collective: launch kills it.
    codes = launch(tmp_path, "killed", "10", timeout=60)
    assert codes[0] == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "killed")["epoch"] == 2
    launch(tmp_path, "killed", "0")
    expected = load_rank(ddp_runs, "checkpoints", 0)["full_metrics"]
    assert [json.loads((tmp_path / f"killed-rank{r}.json").read_text()) for r in (0, 1)] == [expected, expected]


# ----------------------------------------------------------------------------- the example, under torchrun


@pytest.mark.slow
def test_example_train_ddp_under_torchrun(mnist_root, tmp_path):
    out = tmp_path / "out"
    args = ["--quick", "--epochs", "1", "--train-subset", "400", "--test-subset", "200", "--depth", "1"]
    args += ["--test", "clean", "--device", "cpu", "--no-progress", "--data-dir", str(mnist_root), "--out", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    proc = subprocess.run([*torchrun, str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("History(1 epochs)") == 1  # printed by rank 0 only
    history = bnvit.History.from_json(out / "history.json")
    assert len(history) == 1 and history.meta["world_size"] == 2 and history.meta["sync_bn"] is True
    assert history.records[0].val_acc is not None
    model = bnvit.load_model(out / "model.pt")  # a plain state dict
    assert model.config["depth"] == 1 and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert load_checkpoint(out / "checkpoint")["epoch"] == 1


# ----------------------------------------------------------------------------- in one process: arguments and rules


def fake(rank: int, world_size: int = 2) -> Distributed:
    """A `Distributed` for the functions that need no process group (sharding)."""
    return Distributed(rank, world_size, rank, torch.device("cpu"), "gloo")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _alone_on_cpu(world: Distributed) -> bool:
    return (world.rank, world.world_size, world.device, world.backend) == (0, 1, torch.device("cpu"), "none")


def test_auto_is_a_single_process_without_torchrun(no_torchrun, monkeypatch):
    assert _alone_on_cpu(setup("auto", "cpu"))
    assert _alone_on_cpu(setup(False, "cpu"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _alone_on_cpu(setup("auto", "cpu"))  # torchrun with one process: nothing to distribute


def test_a_world_of_one_answers_every_call_at_once():
    """The loop never asks how many processes there are: a world of one does each thing the trivial way."""
    world = setup(False, "cpu")
    model, loader = nn.Linear(2, 2), DeviceLoader(*toy_data(8), batch_size=4)
    assert world.wrap(model) is model and world.shard(loader, name="train", train=True, seed=0) is loader
    assert world.sum(torch.tensor(2.0), 3) == (2.0, 3.0) and world.gather(5) == [5] and world.all_true(True)
    with world.synced_batchnorm(bn := nn.Sequential(nn.BatchNorm1d(2)), enabled=True):
        assert type(bn[0]) is nn.BatchNorm1d  # nothing to synchronize with
    with pytest.raises(KeyError, match="raised as it is"), world.fail_together():
        raise KeyError("raised as it is")
    many = fake(0)
    assert world.describe(True) == {"device": "cpu"} and many.describe(True)["world_size"] == 2


def test_distributed_arguments_are_checked(no_torchrun, monkeypatch):
    images, labels = toy_data(32)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"distributed must be True, False or 'auto', got 'yes'"):
        fit(model, (images, labels), epochs=1, lr=1e-3, device="cpu", distributed="yes")
    with pytest.raises(ValueError, match=r"distributed=True needs several processes: start them with torchrun"):
        fit(model, (images, labels), epochs=1, lr=1e-3, device="cpu", distributed=True)
    with pytest.raises(TypeError, match=r"sync_bn must be a bool, got 'no'"):
        fit(model, (images, labels), epochs=1, lr=1e-3, device="cpu", sync_bn="no")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "two"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' must be an integer"):
        setup("auto", "cpu")


def test_global_batch_must_divide_among_processes():
    loader = DeviceLoader(*toy_data(60), batch_size=100)
    with pytest.raises(ValueError, match=r"batch size 100 is the global batch .* world size 3; use e.g. 99 or 102"):
        shard(loader, fake(0, 3), name="train", train=True, seed=0)


def test_sharded_device_loader_batches_are_the_single_process_batches():
    images, _ = toy_data(40)
    single = DeviceLoader(images, torch.arange(40), batch_size=8, seed=3)
    shards = [shard(single, fake(r), name="train", train=True, seed=0) for r in (0, 1)]
    assert [s.batch_size for s in shards] == [4, 4] and [s.rank for s in shards] == [0, 1]
    for loader in (single, *shards):
        loader.set_epoch(2)
    together = [torch.cat([a[1], b[1]]) for a, b in zip(*shards, strict=True)]
    assert [set(t.tolist()) for t in together] == [set(y.tolist()) for _, y in single]
    assert set(torch.cat(together).tolist()) == set(range(40))


def test_validation_shards_cover_every_sample_once():
    images, labels = toy_data(11)
    for data in (DeviceLoader(images, torch.arange(11), batch_size=4, shuffle=False),
                 DataLoader(TensorDataset(images, torch.arange(11)), batch_size=4)):  # fmt: skip
        seen = [y for r in (0, 1) for _, ys in shard(data, fake(r), name="val", train=False, seed=0) for y in ys]
        assert sorted(int(y) for y in seen) == list(range(11))
    with pytest.raises(ValueError, match=r"val data has 1 samples, fewer than the 2 processes"):
        shard(DeviceLoader(images[:1], labels[:1], batch_size=4), fake(0), name="val", train=False, seed=0)


def test_data_loaders_get_a_distributed_sampler_or_a_clear_error():
    dataset = TensorDataset(*toy_data(20))
    sharded = shard(DataLoader(dataset, batch_size=10, shuffle=True), fake(1), name="train", train=True, seed=7)
    sampler = sharded.sampler
    assert type(sampler).__name__ == "DistributedSampler" and sampler.rank == 1 and sampler.shuffle
    assert sharded.batch_size == 5 and sampler.seed == 7
    custom = DataLoader(dataset, batch_size=10, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 20, 20))
    with pytest.raises(ValueError, match=r"custom sampler \(WeightedRandomSampler.*DistributedSampler"):
        shard(custom, fake(0), name="train", train=True, seed=0)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*toy_data(4), strict=True)

    with pytest.raises(ValueError, match=r"IterableDataset"):
        shard(DataLoader(Stream(), batch_size=2), fake(0), name="train", train=True, seed=0)
    other_rank = DeviceLoader(*toy_data(20), batch_size=5, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"sharded for rank 1 of 2, but this process is rank 0 of 2"):
        shard(other_rank, fake(0), name="train", train=True, seed=0)
    assert shard(other_rank, fake(1), name="train", train=True, seed=0) is other_rank


def test_syncbn_conversion_shares_the_state_and_is_undone():
    model = tiny_model("bn")
    before = {name: p for name, p in model.named_parameters()}
    swaps = convert_batchnorm(model, "cpu")
    assert {type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)} == {"CPUSyncBatchNorm"}
    assert all(p is before[name] for name, p in model.named_parameters())
    with torch.no_grad():
        model.norm.bn.running_mean.fill_(0.25)
    restore_batchnorm(swaps)
    assert type(model.norm.bn) is nn.BatchNorm1d and float(model.norm.bn.running_mean[0]) == 0.25
    with pytest.raises(ValueError, match=r"the model itself is a BatchNorm1d; use sync_bn=False"):
        convert_batchnorm(nn.BatchNorm1d(4))


def test_cpu_syncbatchnorm_alone_is_a_batchnorm():
    """Without a process group it computes what BatchNorm computes (training and eval)."""
    x = torch.randn(10, 6) * 2 + 1
    plain, synced = nn.BatchNorm1d(6), CPUSyncBatchNorm(6)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)
    torch.testing.assert_close(synced.eval()(x), plain.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"at least 2 dimensions"):
        synced(torch.randn(6))
