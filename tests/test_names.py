"""One naming scheme, `<family>_<size>`, and the old names kept as timm aliases (`bnvit.weights.names`)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models import get_deprecated_models

import bnvit.weights.hub as hub
from bnvit.app.cli import list_models
from bnvit.experiments import EXPERIMENTS, Cell
from bnvit.experiments.claims import BUILT_AS, TIMM_MODELS, VIT_MODELS
from bnvit.experiments.results import load_results
from bnvit.experiments.sweep import build_model
from bnvit.weights.calibration import shipped_temperature
from bnvit.weights.loading import SHIPPED, WEIGHTS_DIR, shipped_record
from bnvit.weights.names import RENAMED, check_name, current_name, registered_names

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("vitln", "vitbnffn", "vitbn", "timmvitln", "timmvitbnffn", "dnn", "dnnbn")
SIZES = ("mnist", "cifar", "ti16_224", "s16_224", "b16_224")
# timm's ViT and DeiT sizes with the BatchNorm FFN, named in timm's scheme
TIMM_LAYOUT = {f"{f}_{w}_patch16_bnffn_224" for f in ("vit", "deit") for w in ("tiny", "small", "base")}
OLD_IMAGENET = {
    f"{f}_{w}_patch16_224": f"{f}_{s}16_224"
    for f in ("vitln", "vitbnffn", "vitbn")
    for w, s in (("tiny", "ti"), ("small", "s"), ("base", "b"))
}
SMALL = dict(depth=1)  # every old name is an MNIST or CIFAR model, all of which take depth=


def _build(name: str, **kwargs) -> tuple[torch.nn.Module, list[str]]:
    """The model `name` builds, and the messages of the warnings building it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = timm.create_model(name, **kwargs)
    return model, [str(w.message) for w in caught]


def test_every_registered_name_is_family_underscore_size():
    names = registered_names()
    assert len(names) == 25 and set(names) >= TIMM_LAYOUT
    for name in set(names) - TIMM_LAYOUT:
        family, _, size = name.partition("_")
        assert family in FAMILIES and size in SIZES, name


def test_the_renamed_are_exactly_these_and_nothing_else_changed():
    assert RENAMED == {
        "vit_mnist": "vitln_mnist",
        "vit_cifar": "vitln_cifar",
        "timmvit_mnist": "timmvitln_mnist",
        "timmvit_bnffn_mnist": "timmvitbnffn_mnist",
        **OLD_IMAGENET,  # bnvit's layout at ImageNet sizes: a `patch16` name reads as timm's layout
    }
    kept = {"vitbnffn_mnist", "vitbn_mnist", "vitbnffn_cifar", "vitbn_cifar", "dnn_mnist", "dnnbn_mnist"}
    assert set(registered_names()) == kept | set(RENAMED.values()) | TIMM_LAYOUT


def test_no_name_of_bnvits_layout_says_patch16():
    for name in registered_names():
        entry = timm.models.model_entrypoint(name)
        model = timm.create_model(name, depth=1)
        timm_layout = isinstance(model, timm.models.VisionTransformer)
        assert ("patch16" in name) == (timm_layout and name.endswith("_224")), (name, entry.__module__)


@pytest.mark.parametrize(("old", "new"), RENAMED.items())
def test_an_old_name_builds_its_current_model_and_warns(old, new):
    model, messages = _build(old, **SMALL)
    twin, quiet = _build(new, **SMALL)
    assert messages == [f"Mapping deprecated model name {old} to current {new}."]
    assert quiet == []
    assert type(model) is type(twin)
    assert [type(m) for m in model.modules()] == [type(m) for m in twin.modules()]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert model.pretrained_cfg["architecture"] == new
    assert get_deprecated_models()[old] == new


@pytest.mark.parametrize(("old", "new"), RENAMED.items())
def test_an_old_name_keeps_the_arguments_it_is_given(old, new):
    model, _ = _build(old, depth=2, num_classes=5)
    twin, _ = _build(new, depth=2, num_classes=5)
    images = torch.rand(2, *model.pretrained_cfg["input_size"])
    assert model.state_dict().keys() == twin.state_dict().keys()
    assert model(images).shape == twin(images).shape == (2, 5)


def test_old_names_are_not_listed_and_current_ones_are():
    for pattern in ("*", "vit*", "*mnist", "*cifar", "timmvit*"):
        listed = timm.list_models(pattern)
        assert not set(RENAMED) & set(listed), pattern
    everything = timm.list_models()
    assert set(RENAMED.values()) <= set(everything)
    assert set(registered_names()) == {row["name"] for row in list_models()}  # what `bnvit list` prints
    assert timm.list_models("vit*_mnist") == ["vitbn_mnist", "vitbnffn_mnist", "vitln_mnist"]
    assert sorted(timm.list_models(pretrained=True, filter="*mnist*")) == sorted(f"{n}.bnvit_mnist" for n in SHIPPED)
    for old in RENAMED:
        assert timm.is_model(old)  # still registered, only hidden from the listings


@pytest.mark.parametrize("name", ["vit_mnist", "vit_mnist.bnvit_mnist"])
def test_pretrained_through_an_old_name_loads_the_same_tensors(name):
    model, messages = _build(name, pretrained=True)
    current, _ = _build("vitln_mnist", pretrained=True)
    assert messages[0] == "Mapping deprecated model name vit_mnist to current vitln_mnist."
    assert model.pretrained_cfg["tag"] == "bnvit_mnist"
    assert Path(model.pretrained_cfg["file"]) == WEIGHTS_DIR / "vitln_mnist.safetensors"
    mine, theirs = model.state_dict(), current.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_shipped_layer_norm_weights_are_named_by_the_current_name():
    assert SHIPPED == ("vitln_mnist", "vitbnffn_mnist")
    assert not (WEIGHTS_DIR / "vit_mnist.safetensors").exists() and not (WEIGHTS_DIR / "vit_mnist.json").exists()
    record = json.loads((WEIGHTS_DIR / "vitln_mnist.json").read_text())
    assert record["model"] == "vitln_mnist"
    # the record of the past run: its command is as it was typed then
    assert record["command"].startswith("python examples/train_weights.py --model vit_mnist ")
    with safe_open(str(WEIGHTS_DIR / "vitln_mnist.safetensors"), framework="pt") as f:
        assert current_name(f.metadata()["model"]) == "vitln_mnist"


def test_bnvits_name_taking_functions_read_an_old_name_as_its_current_one():
    assert shipped_record("vit_mnist") == shipped_record("vitln_mnist") is not None
    assert shipped_temperature("vit_mnist") == shipped_temperature("vitln_mnist") is not None
    assert shipped_record("vit_cifar") is None and shipped_temperature("vit_cifar") is None
    assert hub.model_card("vit_mnist") == hub.model_card("vitln_mnist")
    assert hub.model_card("vit_mnist.bnvit_mnist") == hub.model_card("vitln_mnist.bnvit_mnist")
    assert "Accuracy" in hub.model_card("vit_mnist")["details"]  # the shipped weights' card
    assert hub.model_card("timmvit_bnffn_mnist") == hub.model_card("timmvitbnffn_mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mapped before building: no deprecation warning
        assert hub.model_stats("timmvit_mnist") == hub.model_stats("timmvitln_mnist")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18", "vitln_nope", "vitln"])
def test_an_unknown_name_is_refused_with_the_current_names(name):
    with pytest.raises(ValueError, match=rf"^unknown bnvit model '{name}'; bnvit's models are ") as err:
        check_name(name)
    listed = str(err.value).split("bnvit's models are ")[1].split(", ")
    assert listed == registered_names()
    with pytest.raises(TypeError, match="a model name must be a string, got int"):
        check_name(3)


def test_current_name_keeps_a_tag_and_leaves_other_names_alone():
    assert current_name("timmvit_mnist") == "timmvitln_mnist"
    assert current_name("vit_cifar.some_tag") == "vitln_cifar.some_tag"
    assert current_name("vitbnffn_mnist.bnvit_mnist") == "vitbnffn_mnist.bnvit_mnist"
    assert current_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"  # timm's own name, not bnvit's


def test_train_weights_takes_an_old_model_name():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_weights
    finally:
        sys.path.remove(str(ROOT / "examples"))
    parser = train_weights.build_parser()
    assert parser.parse_args(["--model", "vit_mnist"]).model == "vitln_mnist"
    assert parser.parse_args(["--model", "vitln_mnist"]).model == "vitln_mnist"
    assert parser.parse_args([]).model == "vitbnffn_mnist"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "vit_cifar"])


def test_a_hub_folder_saved_under_an_old_name_loads(tmp_path):
    model, _ = _build("vitln_mnist", depth=1)
    hub.save_for_hf(model.eval(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vitln_mnist"
    (tmp_path / "config.json").write_text(json.dumps(dict(config, architecture="vit_mnist")))  # as written before
    loaded, messages = _build(f"local-dir:{tmp_path}", pretrained=True)
    assert "Mapping deprecated model name vit_mnist to current vitln_mnist." in messages
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))


# ----------------------------------------------------------------------------- the harness's stable result keys


def test_the_harness_keeps_its_labels_and_builds_them_through_the_current_names():
    assert VIT_MODELS == ("vit_mnist", "vitbnffn_mnist") and TIMM_MODELS == ("timmvit_mnist", "timmvit_bnffn_mnist")
    assert Cell("vit_mnist", 3, 0.003, 0).key == "vit_mnist-d3-lr0.003-s0"
    assert Cell("timmvit_mnist", 4, 0.003, 0).key == "timmvit_mnist-d4-lr0.003-s0"
    for label, name in BUILT_AS.items():
        assert current_name(label) == name and name in registered_names()


def _published_labels() -> set[str]:
    labels = set()
    for results in (ROOT / "docs" / "results").glob("*/results.jsonl"):
        labels |= {r["cell"]["model"] for r in load_results(results.parent)}
    return labels


def test_every_label_of_the_experiments_and_the_published_results_builds_without_a_warning():
    labels = {m for e in EXPERIMENTS.values() for m in e.models} | _published_labels()
    assert {"vit_mnist", "timmvit_mnist", "timmvit_bnffn_mnist"} <= labels
    for label in sorted(labels):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = build_model(Cell(label, 1, 0.003, 0))
        assert model.pretrained_cfg["architecture"] == current_name(label), label
