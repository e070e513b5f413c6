"""The C++ CPU kernels of the bitwise ops (reste_timm/nn/csrc/bitconv_op.cpp): built and registered with
the dispatcher, the same outputs (values, shapes, strides) as the ops' Python implementation on every
epilogue option, clear errors on bad arguments, and the Python implementation where they cannot be built."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from conftest import run_script

import reste_timm
from reste_timm.nn import bitconv

HAVE_CXX = bool(shutil.which("c++") or shutil.which("g++")) and bitconv.bitwise_available()
pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="no C/C++ compiler: the ops keep their Python kernels")


def _layer(cin, cout, k, stride, padding, seed=0):
    torch.manual_seed(seed)
    layer = reste_timm.BinaryConv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    weight, zeros = bitconv.kernel().pack_weights(layer.weight)
    assert zeros == 0
    return layer, weight


def test_the_ops_have_a_cpp_cpu_kernel():
    assert bitconv.native_ops()
    for op in ("reste_timm::bitwise_conv2d", "reste_timm::pack_signs"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert "bitconv_op.cpp" in torch._C._dispatch_dump(op)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c", [3, 64, 70, 130])
@pytest.mark.parametrize("zeros", [False, True])
def test_pack_signs_matches_the_python_kernel(layout, c, zeros):
    assert bitconv.native_ops()
    torch.manual_seed(c)
    x = torch.randn(2, c, 5, 7)
    if zeros:
        x[x.abs() < 0.4] = 0.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bits, mask, count = torch.ops.reste_timm.pack_signs.default(x)
    ref_bits, ref_mask, ref_count = bitconv.kernel().pack_signs(x)
    assert torch.equal(bits, ref_bits) and int(count) == ref_count and count.dtype == torch.int64
    if ref_count:
        assert torch.equal(mask, ref_mask)


EPILOGUES = ["none", "bias", "relu_bn", "residual_cl", "residual_nchw", "all_bits", "bits_only"]


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("cin,cout,k,stride,padding", [(64, 64, 3, 1, 1), (70, 20, 3, 2, 1),
                                                       (130, 96, 5, 1, 2), (16, 33, 1, 1, 0)])
@pytest.mark.parametrize("zeros", [False, True])
def test_bitwise_conv2d_matches_the_python_kernel(epilogue, cin, cout, k, stride, padding, zeros):
    assert bitconv.native_ops()
    layer, weight = _layer(cin, cout, k, stride, padding, seed=cin + cout)
    x = torch.randn(2, cin, 9, 8)
    if zeros:
        x[x.abs() < 0.3] = 0.0
    bits, mask, count = bitconv.pack_signs(x)
    mask = mask if int(count) else None
    oh, ow = (9 + 2 * padding - k) // stride + 1, (8 + 2 * padding - k) // stride + 1
    bias = torch.randn(cout) if epilogue in ("bias", "all_bits") else None
    relu = epilogue in ("relu_bn", "all_bits", "bits_only")
    bn = (torch.rand(cout) + 0.5, torch.randn(cout)) if epilogue in ("relu_bn", "all_bits", "bits_only") \
        else (None, None)
    with_residual = epilogue in ("residual_cl", "residual_nchw", "all_bits")
    residual = torch.randn(2, cout, oh, ow) if with_residual else None
    if residual is not None and epilogue != "residual_nchw":
        residual = residual.contiguous(memory_format=torch.channels_last)
    out_float, out_bits = epilogue != "bits_only", epilogue in ("all_bits", "bits_only")
    shape, st, pad = [cout, cin, k, k], [stride, stride], [padding, padding]
    conv = bitconv.conv_list(shape, st, pad, relu, out_float, out_bits)
    got = bitconv.bitwise_conv2d(bits, mask, weight, conv, layer.binary_scale().item(), bias, *bn, residual)
    ref = bitconv.kernel().conv2d(bits, mask, weight, shape, st, pad, layer.binary_scale().item(), bias, relu,
                                  *bn, residual, out_float, out_bits)
    for a, b in zip(got[:3], ref[:3], strict=True):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert torch.equal(a, b)
    assert int(got[3]) == ref[3] and got[3].dim() == 0


def test_bad_arguments_raise_one_clear_error():
    assert bitconv.native_ops()
    layer, weight = _layer(64, 16, 3, 1, 1)
    bits, _, _ = bitconv.pack_signs(torch.randn(1, 64, 6, 6))
    conv = bitconv.conv_list([16, 64, 3, 3], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="bias must be a contiguous CPU tensor of Float"):
        bitconv.bitwise_conv2d(bits, None, weight, conv, 0.5, torch.ones(16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bits must be a contiguous 4-D int64"):
        bitconv.bitwise_conv2d(bits.float(), None, weight, conv, 0.5)
    with pytest.raises(RuntimeError, match="conv must have 11 entries"):
        bitconv.bitwise_conv2d(bits, None, weight, conv[:6], 0.5)
    with pytest.raises(RuntimeError, match=r"bitconv_conv2d: code -2, weight \[16, 32"):  # header mismatch
        bitconv.bitwise_conv2d(bits, None, weight, bitconv.conv_list([16, 32, 3, 3], [1, 1], [1, 1]), 0.5)
    with pytest.raises(RuntimeError, match="pack_signs: x must be a 4-D float32"):
        bitconv.pack_signs(torch.randn(2, 3, 4, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_are_refused_by_the_python_kernel():
    with pytest.raises(NotImplementedError, match="CPU tensors only"):
        bitconv.pack_signs(torch.randn(1, 8, 4, 4, device="cuda"))


def test_deploy_loads_the_cpp_kernels_before_the_first_forward():
    """In a fresh process, deploy() builds (or finds) and loads the C++ kernels: no first-call stall."""
    code = """
import torch, timm, reste_timm
assert not torch._C._dispatch_has_kernel_for_dispatch_key("reste_timm::bitwise_conv2d", "CPU")
reste_timm.deploy(timm.create_model("resnet20_1w1a_reste"))
assert torch._C._dispatch_has_kernel_for_dispatch_key("reste_timm::bitwise_conv2d", "CPU")
print("loaded at deploy")
"""
    proc = run_script([sys.executable, "-c", code])
    assert proc.returncode == 0 and "loaded at deploy" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_without_a_cpp_compiler_the_python_kernels_serve(tmp_path):
    """A fresh process whose C++ compiler fails: one warning, no CPU kernel registered, the same results."""
    code = """
import warnings, torch, reste_timm
from reste_timm.nn import bitconv
x = torch.randn(2, 70, 6, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bits, mask, zeros = bitconv.pack_signs(x)
    bitconv.pack_signs(x)
messages = [str(w.message) for w in caught if "bitconv_op.cpp" in str(w.message)]
assert len(messages) == 1 and "failed" in messages[0], messages
assert not torch._C._dispatch_has_kernel_for_dispatch_key("reste_timm::pack_signs", "CPU")
assert torch.equal(bits, bitconv.kernel().pack_signs(x)[0])
print("python kernels ok")
"""
    proc = run_script([sys.executable, "-c", code], env={"CXX": str(tmp_path / "no-such-c++"),
                                                         "RESTE_TIMM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0 and "python kernels ok" in proc.stdout, proc.stderr[-2000:]
