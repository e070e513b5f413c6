"""Packed 1-bit export: bit layout, lossless round trip of signs and scales, sizes and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import reste_timm  # noqa: F401  (registers the models)
from reste_timm.analysis import summary
from reste_timm.hub import export_packed, load_packed
from reste_timm.nn.layers import BinaryConv2d, binary_layers
from reste_timm.nn.packing import pack_bits, unpack_bits, unpack_state_dict


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_bits_round_trip_in_numpy_packbits_layout(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(unpack_bits(packed, n), mask)


def _model(name="resnet20_1w1a_reste", zeros_in=("layer2.1.conv1",), few_zeros_in=("layer3.0.conv2",)
           ) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics, so that they matter
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        for name in zeros_in:  # exact zeros: sign(0) = 0 is a third value the file must keep
            model.get_submodule(name).weight.view(-1)[::5] = 0.0
        for name in few_zeros_in:  # a handful: stored as indices, not as a bit plane
            model.get_submodule(name).weight.view(-1)[[0, 17, 36863]] = 0.0
    return model


def test_round_trip_keeps_every_sign_bit_and_scale(tmp_path):
    model = _model()
    export_packed(model, tmp_path, float_dtype="float32")
    rebuilt = load_packed(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    pairs = list(zip(binary_layers(model), binary_layers(rebuilt), strict=True))
    assert len(pairs) == 18
    for (name, src), dst in zip(((n, m) for n, m in model.named_modules() if isinstance(m, BinaryConv2d)),
                                (p[1] for p in pairs), strict=True):
        assert torch.equal(torch.sign(dst.weight), torch.sign(src.weight)), name
        assert torch.equal(dst.binary_scale(), src.binary_scale()), name  # bit for bit
        assert torch.equal(dst.binary_weight(), src.binary_weight()), name
        assert (f"{name}.weight_zero" in stored) == (name == "layer2.1.conv1")
        assert (f"{name}.weight_zero_index" in stored) == (name == "layer3.0.conv2")
        assert stored[f"{name}.weight_sign"].dtype == torch.uint8
        assert f"{name}.weight" not in stored
    for layer in ("layer2.1.conv1", "layer3.0.conv2"):
        src_zero, dst_zero = (m.get_submodule(layer).weight == 0 for m in (model, rebuilt))
        assert torch.equal(src_zero, dst_zero) and src_zero.any()
    assert stored["layer3.0.conv2.weight_zero_index"].tolist() == [0, 17, 36863]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_float16_export_is_small_and_rounds_only_the_float_tensors(tmp_path):
    model = _model(zeros_in=(), few_zeros_in=())
    export_packed(model, tmp_path / "packed")
    float_file = tmp_path / "float32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_file))
    ratio = (tmp_path / "packed" / "model.safetensors").stat().st_size / float_file.stat().st_size
    assert ratio < 1 / 10
    rebuilt = load_packed(tmp_path / "packed", cache_weights=True)
    assert all(m.cache_weight for m in binary_layers(rebuilt))
    source, loaded = model.state_dict(), rebuilt.state_dict()
    binary = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert len(binary) == 18 and "conv1.weight" not in binary  # the FP stem is not binary
    for key, value in source.items():
        if key in binary:  # exact signs
            assert torch.equal(torch.sign(loaded[key]), torch.sign(value)), key
        elif value.is_floating_point():
            assert torch.equal(loaded[key], value.half().float()), key
        else:
            assert torch.equal(loaded[key], value), key


def test_config_records_how_to_rebuild(tmp_path):
    model = timm.create_model("resnet20_1w32a_reste", num_classes=7, estimator="ste")
    export_packed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet20_1w32a_reste"
    assert config["model_args"] == {"num_classes": 7, "in_chans": 3, "estimator": "ste",
                                    "binarize_input": False}
    assert config["reste_timm_packed"]["float_dtype"] == "float16"
    assert len(config["reste_timm_packed"]["binary_layers"]) == 18
    rebuilt = load_packed(tmp_path)
    assert {(m.estimator, m.binarize_input) for m in binary_layers(rebuilt)} == {("ste", False)}
    assert rebuilt.num_classes == 7 and not rebuilt.training


def test_timm_local_dir_loads_a_packed_folder(tmp_path):
    model = _model(zeros_in=(), few_zeros_in=())
    export_packed(model, tmp_path, float_dtype="float32")
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 2), lambda: _model(zeros_in=(), few_zeros_in=())],
                         ids=["linear", "resnet20_1w1a"])
def test_unpack_leaves_ordinary_state_dicts_alone(make):
    state = make().state_dict()  # the binary model's latent float weights are ordinary tensors too
    copy = {k: v.clone() for k, v in state.items()}
    unpacked = unpack_state_dict(state)
    assert list(unpacked) == list(state)
    for key, value in unpacked.items():
        assert value.dtype == copy[key].dtype and torch.equal(value, copy[key]), key
    assert all(torch.equal(state[k], copy[k]) for k in copy)  # the input is not changed either


def test_export_errors(tmp_path):
    model = _model(zeros_in=(), few_zeros_in=())
    with pytest.raises(ValueError, match="float_dtype"):
        export_packed(model, tmp_path, float_dtype="int8")
    with pytest.raises(ValueError, match="architecture"):
        export_packed(nn.Sequential(BinaryConv2d(2, 2, 3)), tmp_path)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        export_packed(model, tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architecture": "resnet20_1w1a_reste"}))
    with pytest.raises(ValueError, match="not a reste-timm-packed"):
        load_packed(tmp_path / "other")


def test_summary_counts_bits_parameters_and_memory():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8),
                          BinaryConv2d(8, 16, 3, bias=False), BinaryConv2d(16, 16, 3, bias=False,
                                                                           binarize_input=False),
                          nn.Flatten(), nn.Linear(16, 10))
    lines = []
    info = summary(model, float_bits=32, print_fn=lines.append)
    binary = 16 * 8 * 9 + 16 * 16 * 9
    floats = 8 * 3 * 9 + 2 * 8 + 16 * 10 + 10
    assert info["binary_params"] == binary and info["float_params"] == floats
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["float32_bytes"] == 4 * info["params"]
    assert info["packed_bytes"] == (16 * 8 * 9) // 8 + 4 + (16 * 16 * 9) // 8 + 4 + 4 * floats
    assert info["compression"] == pytest.approx(info["float32_bytes"] / info["packed_bytes"])
    rows = {r["name"]: r for r in info["layers"]}
    assert (rows["2"]["weight_bits"], rows["2"]["input_bits"]) == (1, 1)
    assert (rows["3"]["weight_bits"], rows["3"]["input_bits"]) == (1, 32)
    assert rows["0"]["weight_bits"] == 32 and len(rows) == 5
    assert "compression" in lines[0] and "BinaryConv2d" in lines[0]
    assert summary(model, float_bits=16, print_fn=None)["compression"] > info["compression"]


def test_check_folder_and_load_model_accept_a_packed_folder(tmp_path):
    from reste_timm.hub import CheckpointError, check_folder, load_model

    model = _model(zeros_in=(), few_zeros_in=())
    export_packed(model, tmp_path / "ok", float_dtype="float32")
    assert check_folder(tmp_path / "ok")["architecture"] == "resnet20_1w1a_reste"
    rebuilt = load_model(f"local-dir:{tmp_path / 'ok'}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # A packed folder whose sign bits do not fit the stored shape is named, file and key.
    export_packed(model, tmp_path / "bad", float_dtype="float32")
    weights = tmp_path / "bad" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["layer1.0.conv1.weight_sign"] = tensors["layer1.0.conv1.weight_sign"][:-1].clone()
    save_file(tensors, str(weights), metadata={"format": "pt", "packing": "reste-timm-packed"})
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight_sign") as err:
        check_folder(tmp_path / "bad")
    assert str(weights) in str(err.value)
