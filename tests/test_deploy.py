"""deploy(): 1W/1A convs on packed signs predict as the float-simulated model does, over layer
shapes, zeros (in activations and weights), layouts, batch sizes and every registered 1W/1A model."""

from __future__ import annotations

import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import run_script
from test_hub import _trained_like

import reste_timm
from reste_timm.deployment import BitwiseConv2d, bitwise_available, deploy, load_packed
from reste_timm.deployment import bitwise as bitwise_ops
from reste_timm.deployment import networks as deploy_networks
from reste_timm.nn import native

pytestmark = pytest.mark.skipif(not bitwise_available(), reason="no C compiler: deploy keeps float weights")

MODELS_1W1A = sorted(timm.list_models("*1w1a*"))
SIZES = {"resnet18_1w1a_reste": 64, "resnet34_1w1a_reste": 64}  # ImageNet nets at 64 px: all layers run


def _exact(layer: reste_timm.BinaryConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv2d(sign(x), sign(w)) in float64 (exact integers), times the float32 scale, rounded once."""
    dots = F.conv2d(torch.sign(x).double(), torch.sign(layer.weight.detach()).double(), None, layer.stride,
                    layer.padding)
    out = (dots * float(layer.binary_scale().detach())).float()
    return out if layer.bias is None else out + layer.bias.detach().view(1, -1, 1, 1)


@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (5, 1, 2),
                                              (5, 2, 2)])
@pytest.mark.parametrize("cin,cout", [(3, 16), (16, 20), (65, 70), (130, 64)])
def test_layer_is_exact_over_shapes(k, stride, padding, cin, cout):
    torch.manual_seed(k * 100 + cin)
    layer = reste_timm.BinaryConv2d(cin, cout, k, stride=stride, padding=padding, bias=cout == 20)
    x = torch.randn(3, cin, 9, 11)
    torch.testing.assert_close(BitwiseConv2d(layer)(x), _exact(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("zeros", [False, True])
def test_opcheck_bitwise_ops(zeros):
    """Schema, fake implementations (static and dynamic shapes) and the dispatcher, as compile and
    export use them; with the mask path and every epilogue input when ``zeros``."""
    torch.manual_seed(2)
    x = torch.randn(2, 70, 6, 7)
    if zeros:
        x[x.abs() < 0.3] = 0.0
    torch.library.opcheck(torch.ops.reste_timm.pack_signs.default, (x,))
    layer = reste_timm.BinaryConv2d(70, 20, 3, stride=2, padding=1, bias=zeros)
    bitwise, (bits, mask, _) = BitwiseConv2d(layer), bitwise_ops.pack_signs(x)
    epilogue = (torch.randn(20), torch.rand(20), torch.randn(20), torch.randn(2, 20, 3, 4)) if zeros else ()
    conv = bitwise_ops.conv_list(bitwise.shape, bitwise.stride, bitwise.padding, relu=zeros, out_bits=zeros)
    args = (bits, mask if zeros else None, bitwise.weight_bits, conv, bitwise.scale, *epilogue)
    torch.library.opcheck(torch.ops.reste_timm.bitwise_conv2d.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_exact_zeros_in_activations_and_weights(layout):
    torch.manual_seed(1)
    layer = reste_timm.BinaryConv2d(70, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight[3, 5, 1, 2] = 0.0  # sign(0) = 0: packed as +1, then taken back out
        layer.weight[31, 69, 0, 0] = 0.0
    x = torch.randn(2, 70, 8, 8)
    x[x.abs() < 0.5] = 0.0  # about 38% exact zeros: the mask path
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bitwise = BitwiseConv2d(layer)
    assert bitwise.zero_taps.tolist() == [[3, 5, 1, 2], [31, 69, 0, 0]]
    out = bitwise(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _exact(layer, x), rtol=0, atol=0)


def test_too_many_zero_weights_keep_the_float_layer():
    layer = reste_timm.BinaryConv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        layer.weight[0] = 0.0
    with pytest.raises(ValueError, match="exactly 0"):
        BitwiseConv2d(layer)
    model = torch.nn.Sequential(layer).eval()
    assert isinstance(deploy(model)[0], reste_timm.BinaryConv2d)  # kept, as the docstring says


def _assert_predicts_as(deployed, model, x):
    """Equal up to float rounding: the float model sums +-scale terms, the kernel counts exactly."""
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name", MODELS_1W1A)
def test_every_1w1a_model_predicts_as_its_float_simulation(name):
    torch.manual_seed(2)
    model = _trained_like(timm.create_model(name))
    deployed = deploy(model)
    assert type(deployed).__name__ in ("_DeployedResNet", "_DeployedVGGSmall")
    assert not list(reste_timm.binary_layers(deployed))  # no float binary conv left (and no float copy)
    size = SIZES.get(name, 32)
    for batch in (1, 3):
        _assert_predicts_as(deployed, model, torch.randn(batch, 3, size, size))
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    _assert_predicts_as(deployed, model, x)


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", "resnet20_bireal_1w1a_reste"])
def test_zeros_after_the_stem_take_the_mask_path(name, monkeypatch):
    """An untrained stem BatchNorm (identity) keeps relu's zeros: the first block packs a mask."""
    torch.manual_seed(3)
    model = _trained_like(timm.create_model(name))
    model.bn1.reset_parameters()
    model.bn1.reset_running_stats()
    masks = []
    real = deploy_networks._Packed.of

    def recording(x):
        packed = real(x)
        masks.append(packed.mask is not None)
        return packed

    monkeypatch.setattr(deploy_networks._Packed, "of", staticmethod(recording))
    _assert_predicts_as(deploy(model), model, torch.randn(4, 3, 32, 32))
    assert masks[0]  # the stem's output had exact zeros


def test_unknown_models_get_their_layers_swapped():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                reste_timm.BinaryConv2d(8, 16, 3, padding=1),
                                reste_timm.BinaryConv2d(16, 16, 3, binarize_input=False)).eval()
    deployed = deploy(model)
    assert isinstance(deployed[2], BitwiseConv2d) and isinstance(deployed[3], reste_timm.BinaryConv2d)
    assert isinstance(model[2], reste_timm.BinaryConv2d)  # the source is untouched
    _assert_predicts_as(deployed, model, torch.randn(2, 3, 12, 12))


def test_without_a_compiler_deploy_warns_once_and_keeps_float_weights(monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_NATIVE", "0")
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(reste_timm.nn.bitconv, "_kernels", {})
    model = timm.create_model("resnet20_1w1a_reste").eval()
    with pytest.warns(RuntimeWarning, match="keeps its float weights"):
        deployed = deploy(model)
    assert len(list(reste_timm.binary_layers(deployed))) == 18
    _assert_predicts_as(deployed, model, torch.randn(2, 3, 32, 32))


def test_fused_networks_run_in_inference_mode():
    """The fused forward records nothing for autograd, whatever mode the caller is in."""
    deployed = deploy(timm.create_model("resnet20_1w1a_reste"))
    with torch.enable_grad():
        out = deployed(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert out.is_inference() and not out.requires_grad
    copy_ = out.clone()
    copy_ += 1  # a clone outside inference mode is an ordinary tensor
    assert torch.equal(copy_, out + 1)


def test_load_packed_with_deploy(tmp_path):
    torch.manual_seed(5)
    model = _trained_like(timm.create_model("resnet18_cifar_1w1a_reste"))
    reste_timm.export_packed(model, tmp_path / "packed", float_dtype="float32")
    deployed = load_packed(tmp_path / "packed", deploy=True)
    assert type(deployed).__name__ == "_DeployedResNet"
    _assert_predicts_as(deployed, model, torch.randn(2, 3, 32, 32))
    assert reste_timm.load_packed is load_packed


@pytest.mark.slow
def test_export_deploy_command_writes_a_packed_folder_that_deploys(tmp_path):
    torch.manual_seed(6)
    model = _trained_like(timm.create_model("resnet20_1w1a_reste"))
    saved = reste_timm.save_pretrained(model, tmp_path / "saved")
    proc = run_script([sys.executable, "-m", "reste_timm", "export", "--checkpoint", str(saved), "--format",
                       "deploy", "--out", str(tmp_path / "deploy")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "load_packed" in proc.stdout and "deploy=True" in proc.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deployed = load_packed(tmp_path / "deploy", deploy=True)
    _assert_predicts_as(deployed, model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("negative_scale", [False, True])
def test_imagenet_stem_pools_first_exactly_where_the_batchnorm_scales_are_positive(negative_scale):
    """The deployed ImageNet stem runs relu and BatchNorm after the max-pool (they are non-decreasing,
    roundings included, when every BatchNorm scale is positive): bit for bit the source's stem; a negative
    scale keeps the source's order."""
    model = _trained_like(timm.create_model("resnet18_1w1a_reste")).eval()
    with torch.no_grad():
        model.bn1.weight.abs_()
        if negative_scale:
            model.bn1.weight[5] = -0.5
    deployed = deploy(model)
    assert deployed.pool_first is not negative_scale
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.maxpool(model.bn1(model.act1(model.conv1(x))))
    assert torch.equal(deployed._stem(x), expected)
