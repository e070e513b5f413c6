"""Converting reference-implementation checkpoints (keys and shapes from official_state_dicts.json)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import reste_timm  # noqa: F401  (registers the models)
from reste_timm.hub import CheckpointError, convert_official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_official.py"
OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_state_dicts.json").read_text())
MODEL = "resnet20_1w1a_reste"


def official_state_dict(name: str = "resnet20_1w1a") -> dict:
    """Random tensors with the reference's keys and shapes (BN statistics kept valid)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in OFFICIAL[name]["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def save_reference(path: Path, state: dict) -> Path:
    # The reference's main.py layout, saved from nn.DataParallel (hence the "module." prefixes).
    torch.save({"epoch": 1000, "model": "resnet20_1w1a", "best_prec1": 86.75,
                "state_dict": {f"module.{k}": v for k, v in state.items()},
                "parameters": [torch.nn.Parameter(v) for k, v in state.items() if k.endswith("weight")]},
               path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    state = official_state_dict()
    return state, save_reference(tmp_path_factory.mktemp("ckpt") / "model_best.pth.tar", state)


@pytest.mark.parametrize("model_name,binarize_input", [(MODEL, True), ("resnet20_1w32a_reste", False)])
def test_converted_folder_predicts_as_the_source(model_name, binarize_input, official, tmp_path):
    state, checkpoint = official
    out = tmp_path / "out"
    convert_official_checkpoint(checkpoint, model_name, out)
    source = timm.create_model(model_name).eval()
    source.load_state_dict(state, strict=True)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert {m.binarize_input for m in reste_timm.binary_layers(model)} == {binarize_input}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = source(images), model(images)
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])  # the outputs depend on the input: not a constant model
    card = ModelCard((out / "README.md").read_text())
    assert [r.metric_value for r in card.data.eval_results] == [86.75]


def _assert_fails(checkpoint, key, tmp_path, model_name=MODEL, **kwargs):
    with pytest.raises(CheckpointError) as info:
        convert_official_checkpoint(checkpoint, model_name, tmp_path / "out", **kwargs)
    assert info.value.key == key and key in str(info.value) and str(checkpoint) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written for a bad checkpoint


def test_missing_key_is_named(tmp_path):
    state = official_state_dict()
    del state["layer3.2.bn2.running_mean"]
    _assert_fails(save_reference(tmp_path / "c.pth.tar", state), "layer3.2.bn2.running_mean", tmp_path)


def test_extra_key_is_named(tmp_path):
    state = dict(official_state_dict(), **{"layer1.0.conv1.alpha": torch.ones(16)})
    _assert_fails(save_reference(tmp_path / "c.pth.tar", state), "layer1.0.conv1.alpha", tmp_path)


def test_wrong_model_is_named(official, tmp_path):
    # a ResNet-20 checkpoint read as VGG-small: the first key VGG expects is reported
    _assert_fails(official[1], "conv0.weight", tmp_path, model_name="vgg_small_1w1a_reste")


def test_wrong_num_classes_is_named(official, tmp_path):
    _assert_fails(official[1], "linear.weight", tmp_path, num_classes=100)


class NotAllowed:
    """Pickled by reference: torch.load(weights_only=True) must refuse it."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": official_state_dict(), "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_official_checkpoint(path, MODEL, tmp_path / "out")


def test_script_main_exit_code_2_on_mismatch(official, tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT), run_name="convert_official")["main"]
    code = main([str(official[1]), "--model", "vgg_small_1w1a_reste", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "conv0.weight" in err


@pytest.mark.slow
def test_script_runs(official, tmp_path):
    out = tmp_path / "script_out"
    command = [sys.executable, str(SCRIPT), str(official[1]), "--model", MODEL, "--out", str(out),
               "--num-classes", "10"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert json.loads((out / "config.json").read_text())["architecture"] == MODEL
