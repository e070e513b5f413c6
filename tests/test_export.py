"""ONNX and torch.export (pt2) exports: ONNX Runtime and the loaded program predict as PyTorch does,
binary weights are stored as int8 signs, and the command writes them from a saved folder."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from conftest import run_script
from test_hub import _trained_like

import reste_timm
from reste_timm.deployment import SignWeightConv2d, export_form, export_onnx, export_pt2
from reste_timm.nn import native_kernels

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BINARY_1W1A = ["resnet20_1w1a_reste", "resnet20_bireal_1w1a_reste", "vgg_small_1w1a_reste",
               "resnet18_cifar_1w1a_reste", "resnet18_1w1a_reste", "resnet34_1w1a_reste"]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _trained_like(timm.create_model(name))


def _images(model, batch: int) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(7))


def _assert_predicts_as(ours: np.ndarray, ref: np.ndarray) -> None:
    """Logits within 1e-3 (float rounding), except where a rare sign flip inside the network moves
    some: at least 99% of the logits within it, and the same top-1 for every image."""
    close = np.isclose(ours, ref, rtol=1e-3, atol=1e-3)
    assert close.mean() >= 0.99, np.abs(ours - ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_export_form_computes_exactly_what_the_model_computes():
    model = _model("resnet20_1w1a_reste")
    form = export_form(model)
    layers = [m for m in form.modules() if isinstance(m, SignWeightConv2d)]
    assert len(layers) == 18 and not list(reste_timm.binary_layers(form))
    assert all(m.weight_sign.dtype == torch.int8 for m in layers)
    x = _images(model, 3)
    # against the model's float path (on CPU its default is the bitwise kernel: the same sums, rounded once)
    with torch.no_grad(), native_kernels(False):
        assert torch.equal(form(x), model(x))
    assert model.training is False and any(p.requires_grad for p in model.parameters())  # source untouched


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", pytest.param("resnet18_1w1a_reste",
                                                                       marks=pytest.mark.slow)])
def test_onnx_runtime_predicts_as_pytorch_and_batch_is_dynamic(name, tmp_path):
    model = _model(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17 and not list(tmp_path.glob("*.data"))  # one file
    signs = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(signs) == len(list(reste_timm.binary_layers(model)))
    session = ort.InferenceSession(str(path))
    for batch in (1, 5):  # traced at 2
        x = _images(model, batch)
        with torch.no_grad():
            ref = model(x).numpy()
        _assert_predicts_as(session.run(None, {"pixel_values": x.numpy()})[0], ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", BINARY_1W1A)
def test_every_1w1a_model_exports_to_onnx(name, tmp_path):
    model = _model(name)
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")))
    x = _images(model, 2)
    with torch.no_grad():
        ref = model(x).numpy()
    _assert_predicts_as(session.run(None, {"pixel_values": x.numpy()})[0], ref)


@pytest.mark.slow
def test_resnet18_onnx_file_is_over_3x_smaller_than_float32_safetensors(tmp_path):
    model = _model("resnet18_1w1a_reste")
    onnx_bytes = export_onnx(model, tmp_path / "r18.onnx").stat().st_size
    saved = reste_timm.save_pretrained(model, tmp_path / "float")
    float_bytes = (saved / "model.safetensors").stat().st_size
    assert float_bytes / onnx_bytes > 3.0, (float_bytes, onnx_bytes)


def test_pt2_program_loads_and_predicts_exactly(tmp_path):
    model = _model("resnet20_bireal_1w1a_reste")
    program = torch.export.load(str(export_pt2(model, tmp_path / "m.pt2"))).module()
    for batch in (1, 4):
        x = _images(model, batch)
        with torch.no_grad(), native_kernels(False):  # the float path, as test_export_form_... says
            assert torch.equal(program(x), model(x))


@pytest.mark.slow
def test_export_command_writes_onnx_and_pt2_from_a_saved_folder(tmp_path):
    model = _model("resnet20_1w1a_reste")
    folder = reste_timm.save_pretrained(model, tmp_path / "saved")
    for fmt, out in (("onnx", tmp_path / "m.onnx"), ("pt2", tmp_path / "m.pt2")):
        proc = run_script([sys.executable, "-m", "reste_timm", "export", "--checkpoint", str(folder),
                           "--format", fmt, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert out.is_file() and f"wrote {out}" in proc.stdout
    x = _images(model, 2)
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    _assert_predicts_as(session.run(None, {"pixel_values": x.numpy()})[0], ref)


def test_export_command_names_a_bad_checkpoint(tmp_path):
    (tmp_path / "bad").mkdir()
    proc = run_script([sys.executable, "-m", "reste_timm", "export", "--checkpoint", str(tmp_path / "bad"),
                       "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert proc.returncode == 2 and not (tmp_path / "m.onnx").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("reste-timm export: error:") and str(tmp_path / "bad" / "config.json") in line


def test_input_size_of_prefers_the_given_size_then_the_models_cfg():
    from reste_timm.deployment.export import input_size_of

    model = timm.create_model("resnet20_1w1a_reste")
    assert tuple(input_size_of(model)) == (3, 32, 32)
    assert tuple(input_size_of(model, (3, 16, 16))) == (3, 16, 16)
    assert input_size_of(torch.nn.Linear(2, 2)) is None
