"""Model cards in timm's format and the Hub folder that `bnvit.weights.hub.save_for_hf` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models._hub import generate_readme

import bnvit.weights.hub as hub
from bnvit.weights.loading import SHIPPED, WEIGHTS_DIR, shipped_record


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_record_is_the_run_behind_the_weights(name):
    record = shipped_record(name)
    assert record["model"] == name
    assert record["train_images"] == 60_000
    assert len(record["history"]) == record["recipe"]["epochs"]
    assert record["history"][-1]["val_acc"] == pytest.approx(record["clean_test_acc"], abs=1e-4)
    notes = timm.get_pretrained_cfg(name).notes
    assert f"{record['clean_test_acc']:.2%} (clean)" in notes[0]
    assert f"{record['recipe']['epochs']} epochs" in notes[1]


def test_model_stats_count_what_the_model_has():
    model = timm.create_model("vitbnffn_mnist")
    stats = hub.model_stats("vitbnffn_mnist")
    assert stats["Params (M)"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert stats["Image size"] == "28 x 28, 1 channel"
    # timm's published figure for the same-shaped ViT-S/16 at 224 is 4.6 GMACs.
    assert hub.model_stats("vitln_s16_224")["GMACs"] == pytest.approx(4.6, abs=0.01)


def test_card_of_shipped_weights_names_dataset_recipe_and_accuracy():
    record = shipped_record("vitbnffn_mnist")
    readme = generate_readme(hub.model_card("vitbnffn_mnist.bnvit_mnist"), "vitbnffn_mnist.bnvit_mnist")
    assert readme.startswith("---\ntags:\n- image-classification\n- timm\n")
    assert "datasets:\n- mnist\n" in readme
    assert f"MNIST test set: {record['clean_test_acc']:.2%}" in readme
    assert record["command"] in readme
    assert 'timm.create_model("vitbnffn_mnist.bnvit_mnist", pretrained=True)' in readme


def test_card_without_shipped_weights_claims_no_accuracy():
    card = hub.model_card("vitbn_cifar")
    assert "Accuracy" not in card["details"] and "Dataset" not in card["details"]
    assert "pretrained=False" in card["usage"]
    assert card["details"]["Model Stats"]["Image size"] == "32 x 32, 3 channels"


@pytest.mark.parametrize("name", ["resnet18", "vitbnffn_nope"])
def test_card_of_unknown_model_lists_the_current_names(name):
    first = "deit_base_patch16_bnffn_224"  # in timm.list_models' order
    with pytest.raises(ValueError, match=rf"unknown bnvit model '{name}'; bnvit's models are {first}, ") as err:
        hub.model_card(name)
    listed = str(err.value).split("bnvit's models are ")[1].split(", ")
    assert "vitln_mnist" in listed and "timmvitbnffn_mnist" in listed and "vit_mnist" not in listed


def test_save_for_hf_round_trip_with_readme(tmp_path):
    model = timm.create_model("vitbnffn_mnist", pretrained=True).eval()
    folder = hub.save_for_hf(model, tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text().startswith("---\n")
    assert "# Model card for vitbnffn_mnist.bnvit_mnist\n" in (folder / "README.md").read_text()
    assert json.loads((folder / "config.json").read_text())["architecture"] == "vitbnffn_mnist"
    again = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), again(images))


def test_save_for_hf_of_an_unnamed_model_says_what_to_pass(tmp_path):
    from bnvit import ViTBNFFN

    with pytest.raises(ValueError, match=r"ViTBNFFN was not built by timm\.create_model.*pass model_name="):
        hub.save_for_hf(ViTBNFFN(), tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_save_for_hf_refuses_impossible_batchnorm_statistics_and_writes_nothing(tmp_path):
    model = timm.create_model("vitbnffn_mnist", depth=1).eval()
    with torch.no_grad():
        model.blocks[0].ffn.norm.bn.running_var[0] = float("nan")
    with pytest.raises(ValueError, match=r"save_for_hf: the model holds .*running_var has 1 non-finite value"):
        hub.save_for_hf(model, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_weights_folder_ships_a_record_for_each_weight_file():
    files = {p.stem for p in WEIGHTS_DIR.glob("*.safetensors")}
    assert files == set(SHIPPED) == {p.stem for p in WEIGHTS_DIR.glob("*.json")}


def test_timm_suite_gives_timms_tests_every_bnvit_model_and_nothing_else(tmp_path, monkeypatch):
    """tests/timm_suite.py: the filters of timm's test_models.py, read for bnvit's models."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("timm_suite", Path(__file__).with_name("timm_suite.py"))
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    test_file = tmp_path / "tests" / "test_models.py"
    test_file.parent.mkdir()
    test_file.write_text("NON_STD_FILTERS = [\n    'vit_*', 'deit*',\n]\nEXCLUDE_FILTERS = ['*huge*']\n")
    families = suite.non_std_filters(test_file)
    assert families == {"vit_*", "deit*"}
    monkeypatch.setattr(timm, "list_models", timm.list_models)  # restored after the test
    plugin = suite.BnvitOnly(families)
    plugin.pytest_configure(None)
    everything = timm.list_models()
    assert len(everything) == 25 and "resnet18" not in everything and "vit_base_patch16_224" not in everything
    assert timm.list_models(filter=["vit_*", "deit*"]) == everything  # a family filter keeps all of bnvit
    assert timm.list_models(exclude_filters=["*huge*", "vit_*"]) == everything  # ... and so does its exclusion
    assert "vitln_mnist" not in timm.list_models(exclude_filters=["vitln_mnist"])  # other filters apply as written
    converted = timm.list_pretrained("*_patch16_bnffn_224.*")  # timm's LayerNorm weights, converted on load
    assert len(converted) == 19
    assert sorted(timm.list_models(pretrained=True)) == sorted([f"{n}.bnvit_mnist" for n in SHIPPED] + converted)
    (tmp_path / "empty").mkdir()
    assert suite.main([str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_score_what_their_record_says(name, mnist_root):
    """The clean accuracy in the card is recomputed here from the shipped file and the MNIST test set."""
    from bnvit import evaluate
    from bnvit.data import load_mnist

    model = timm.create_model(name, pretrained=True)
    accuracy = evaluate(model, load_mnist(mnist_root, train=False), device="cpu")["acc"]
    assert accuracy == pytest.approx(shipped_record(name)["clean_test_acc"], abs=1.5e-4)  # within 1 image


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_score_their_augmented_accuracy(name, mnist_root):
    from bnvit import evaluate
    from bnvit.data import augmented_test_set

    model = timm.create_model(name, pretrained=True)
    accuracy = evaluate(model, augmented_test_set(mnist_root), device="cpu")["acc"]
    assert accuracy == pytest.approx(shipped_record(name)["augmented_test_acc"], abs=1.5e-4)
