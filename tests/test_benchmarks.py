"""The benchmark suite and the prepared GPU check run end to end, at a tiny size on the CPU.

No timing is asserted (timings on a shared 2-core machine are noise); what is checked is that
every section runs, reports what it promises, and that the fp32 agreement check inside the
training-step benchmark holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_speed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_rehearses_on_cpu(mnist_root, tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SMOKE": "1",
        "PYTHON": sys.executable,
        "BNVIT_DATA": str(mnist_root),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    assert " passed" in (out / "tests.log").read_text()
    assert " failed" not in (out / "tests.log").read_text()
    results = json.loads((out / "cpu.json").read_text())
    assert {"machine", "train", "infer", "epoch", "deploy", "small", "sweep"} <= results.keys()
    for model in ("ViTBNFFN", "ViT"):
        step = results["train"][model]
        assert step["reference_ms"] > 0 and step["bnvit_fp32_ms"] > 0 and step["bnvit_default_ms"] > 0
        # Every ratio is at equal precision: both models timed in fp32 and in the default precision.
        assert {"fp32", step["default_precision"]} == step["precisions"].keys()
        for timing in step["precisions"].values():
            assert timing["reference_ms"] > 0 and timing["bnvit_ms"] > 0 and timing["speedup"] > 0
        # Same weights, same batches: bnvit in fp32 computes what the straightforward model does.
        assert step["loss_max_abs_diff"] < 1e-5
        assert step["weight_max_abs_diff"] < 1e-3
    for row in results["infer"].values():
        assert any(name.endswith(", fp32") for name in row["ratios"])
    small = results["small"]["runtimes"]["eager"]["batch 2"]
    assert small["ratios"]["folded ViTBN / ViT"] > 0
    assert small["ratios_paired"].keys() == small["ratios"].keys() == small["ratios_of_minimums"].keys()
    assert results["epoch"]["images"] == 200 and results["epoch"]["speedup"] > 0
    sweep = results["sweep"]
    assert sweep["runs"] == len(sweep["final_val_acc"]) == 2
    assert all(0.0 <= acc <= 1.0 for acc in sweep["final_val_acc"].values())


@pytest.mark.slow
def test_attention_forms_section_reports_both_forms_and_autos_choice():
    """`benchmarks/run.py --only attention`: both forms timed at equal precision, and the form "auto" takes."""
    result = model_speed.attention_forms(torch.device("cpu"), repeats=1, depth=1, batches=(1, 8))
    assert [result["batch 1"]["auto_takes"], result["batch 8"]["auto_takes"]] == ["standard", "factored"]
    for row in result.values():
        assert row["eval_max_abs_diff_fp32"] < 1e-5  # the same weights: the same function
        assert all(
            row[f"{impl} {work} fp32"]["ms"] > 0 for impl in ("standard", "factored") for work in ("step", "eval")
        )
        assert {"step, fp32: standard / factored", "eval, fp32: standard / factored"} <= row["ratios"].keys()


def test_cli_startup_measures_fresh_processes_and_their_peak_memory(tmp_path, monkeypatch, capsys):
    """The start-up benchmark's machinery, on stand-in commands: one that allocates 200 MB must show it."""
    import cli_startup

    python = sys.executable
    stand_ins = {
        "python -c pass": [python, "-c", "pass"],
        "bnvit --help": [python, "-c", "import sys; from _bnvit_cli import main; sys.exit(main())", "--help"],
        "bnvit --help, entry point inside the package": [python, "-c", "pass"],
        "import torch, timm": [python, "-c", "pass"],
        "bnvit predict one.png": [python, "-c", "x = bytearray(200 * 2**20)"],
    }
    monkeypatch.setattr(cli_startup, "commands", lambda image: stand_ins)
    result = cli_startup.main(["--repeats", "2", "--json", str(tmp_path / "startup.json")])
    assert json.loads((tmp_path / "startup.json").read_text()) == result
    rows = result["commands"]
    assert set(rows) == set(stand_ins) and all(r["seconds"] >= r["min_seconds"] > 0 for r in rows.values())
    assert rows["bnvit predict one.png"]["peak_mb"] > rows["python -c pass"]["peak_mb"] + 150
    assert result["ratios"]["bnvit predict one.png / import torch, timm"]["peak_memory"] > 5
    assert "bnvit --help" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="exited with 3"):
        cli_startup.run_once([python, "-c", "import sys; sys.exit(3)"])


@pytest.mark.slow
def test_demo_load_check_runs_and_counts_every_request(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "demo_load.py"), "--requests", "16", "--kind", "mixed"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["requests"] == 16 and sum(result["outcomes"].values()) == 16
    assert result["answered"] == result["outcomes"].get("200", 0) == 16 and result["backlog"] >= 200


@pytest.mark.slow
def test_bn_ffn_finetune_saves_the_start_of_the_timm_train_py_run(mnist_root, tmp_path, monkeypatch):
    """`--epochs 0 --save FILE`: converted, recalibrated `vitln_mnist`, as `train.py --initial-checkpoint` loads it."""
    import timm

    import bn_ffn_finetune
    import bnvit
    from bnvit.data.mnist import load_mnist

    monkeypatch.setenv("BNVIT_DATA", str(mnist_root))
    path = tmp_path / "start.safetensors"
    images, labels = load_mnist(train=False)
    test = (images.float().div(255).unsqueeze(1), labels)
    threads = torch.get_num_threads()
    try:
        out = bn_ffn_finetune.main(["--epochs", "0", "--save", str(path)])  # sets one thread
        # what timm's train.py does with --model vitbnffn_mnist --initial-checkpoint FILE (a strict load)
        model = timm.create_model("vitbnffn_mnist", checkpoint_path=str(path))
        accuracy = bnvit.evaluate(model, test, device="cpu")["acc"]
    finally:
        torch.set_num_threads(threads)
    assert out["save"] == str(path) and "fine_tuned" not in out and 0.9 < out["recalibrated"] < 1.0
    assert accuracy == out["recalibrated"]


def test_bn_ffn_finetune_refuses_a_save_path_that_is_not_safetensors(capsys):
    import bn_ffn_finetune

    with pytest.raises(SystemExit):
        bn_ffn_finetune.main(["--epochs", "0", "--save", "start.pt"])
    assert "give a .safetensors path, got start.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bn_ffn_finetune.main(["--epochs", "-1"])
    assert "--epochs must be >= 0 (0: recalibrate only), got -1" in capsys.readouterr().err
