"""The CPU forward of the binary conv op on the bitwise kernel (reste_timm.nn.bitconv): the same output
as the float conv of sign(x) and sign(w) * scale up to the float conv's rounding, in conv2d's memory
format, and the float conv wherever the kernel does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reste_timm.nn import BinaryConv2d, bitconv, native_kernels
from reste_timm.nn import binary_conv as binary_conv_module

pytestmark = pytest.mark.skipif(not bitconv.bitwise_available(), reason="no C compiler")
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def float_convs(monkeypatch):
    """Counts the op's float conv2d calls (the bitwise kernel makes none)."""
    calls = []
    real = F.conv2d

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(binary_conv_module.F, "conv2d", counting)
    return calls


def _layer(cin, cout, k, stride, padding, bias, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = BinaryConv2d(cin, cout, k, stride=stride, padding=padding, bias=bias, **kwargs)
    layer.exponent = 2.0
    return layer


def _close_to_float_path(layer, x, out):
    """``out`` against the op's float path (``native_kernels(False)``) on the same input, to a few ulps
    of the largest output: the float conv rounds each of its partial sums, the kernel once."""
    with native_kernels(False):
        ref = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=32 * EPS32 * max(float(ref.detach().abs().max()), 1.0))
    return ref


@pytest.mark.parametrize("cin,cout,k,stride,padding,bias", [
    (16, 16, 3, 1, 1, False),   # ResNet-20's first stage
    (16, 32, 3, 2, 1, False),   # a stride-2 stage entry
    (70, 5, 3, 1, 1, True),     # channels across a 64-bit word, odd counts, a bias
    (3, 130, 1, 1, 0, False),   # 1x1, three words of output channels
    (8, 8, 5, 2, 2, True),      # a 5x5 kernel
    (8, 4, 3, (1, 2), (0, 1), False),  # uneven stride and padding
])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("zeros", [False, True], ids=["signs", "with-zeros"])
def test_bitwise_forward_matches_the_float_conv(cin, cout, k, stride, padding, bias, memory_format, zeros,
                                                float_convs):
    layer = _layer(cin, cout, k, stride, padding, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cin, 11, 9, generator=g)
    if zeros:  # sign(0) = 0: the kernel's second bit plane
        x[torch.rand(x.shape, generator=g) < 0.1] = 0.0
    x = x.contiguous(memory_format=memory_format)
    out = layer(x)
    assert not float_convs  # the bitwise kernel ran
    ref = _close_to_float_path(layer, x, out)
    assert out.shape == ref.shape and out.stride() == ref.stride()  # conv2d's memory format
    assert out.grad_fn is not None


def test_bitwise_forward_in_training_keeps_the_gradients(float_convs):
    """The backward is the op's own (it reads x, not the forward's packed bits): the same gradients as
    with the float forward."""
    layer = _layer(16, 16, 3, 1, 1, True)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    up = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for native in (True, False):
        x1 = x.clone().requires_grad_()
        layer.zero_grad()
        with native_kernels(native):
            layer(x1).backward(up)
        grads.append((x1.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    assert len(float_convs) == 1  # only the float path's forward
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_a_weight_of_exactly_zero_takes_the_float_conv(float_convs):
    layer = _layer(8, 8, 3, 1, 1, False)
    with torch.no_grad():
        layer.weight[2, 3, 1, 1] = 0.0  # sign 0 is not a bit
    x = torch.randn(2, 8, 6, 6)
    out = layer(x)
    assert len(float_convs) == 1
    with native_kernels(False):
        assert torch.equal(out, layer(x))


@pytest.mark.parametrize("case", ["1w32a", "groups", "dilation", "float64", "native-off", "too-small"])
def test_where_the_kernel_does_not_apply_the_float_conv_runs(case, float_convs):
    kwargs = {"1w32a": dict(binarize_input=False), "groups": dict(groups=2),
              "dilation": dict(dilation=2)}.get(case, {})
    layer = _layer(8, 8, 3, 1, 0 if case == "too-small" else 1, False, **kwargs)
    x = torch.randn(2, 8, 2 if case == "too-small" else 7, 7)
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "too-small":  # conv2d's own error, not the kernel's
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            layer(x)
        return
    with native_kernels(case != "native-off"):
        layer(x)
    assert len(float_convs) == 1


def test_autocast_takes_the_float_conv_in_the_autocast_dtype(float_convs):
    layer = _layer(8, 8, 3, 1, 1, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 8, 6, 6))
    assert out.dtype == torch.bfloat16 and len(float_convs) == 1


_CL = torch.channels_last
_LAYOUTS = {  # the op's input and weight as a model may hand them over
    "nchw": (lambda: torch.randn(2, 8, 6, 5), lambda: torch.randn(7, 8, 3, 3)),
    "nhwc": (lambda: torch.randn(2, 8, 6, 5).contiguous(memory_format=_CL), lambda: torch.randn(7, 8, 3, 3)),
    "nhwc-weight": (lambda: torch.randn(2, 8, 6, 5),
                    lambda: torch.randn(7, 8, 3, 3).contiguous(memory_format=_CL)),  # --channels-last model
    "sliced-nhwc": (lambda: torch.randn(2, 8, 12, 5).contiguous(memory_format=_CL)[:, :, ::2],
                    lambda: torch.randn(7, 8, 3, 3)),
    "sliced-nchw": (lambda: torch.randn(2, 8, 12, 5)[:, :, ::2], lambda: torch.randn(7, 8, 3, 3)),
    "one-pixel": (lambda: torch.randn(3, 8, 1, 1), lambda: torch.randn(7, 8, 1, 1)),
    "one-pixel-nhwc": (lambda: torch.randn(3, 8, 1, 1).contiguous(memory_format=_CL),
                       lambda: torch.randn(7, 8, 1, 1).contiguous(memory_format=_CL)),
    "one-channel": (lambda: torch.randn(2, 1, 6, 5).contiguous(memory_format=_CL),
                    lambda: torch.randn(7, 1, 3, 3)),
    "transposed": (lambda: torch.randn(2, 8, 5, 6).transpose(2, 3), lambda: torch.randn(7, 8, 3, 3)),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_output_strides_are_conv2ds_and_the_fake_implementations(layout, float_convs):
    """conv2d's CPU rule (channels_last when the input or the weight suggests it, NCHW for ambiguous
    sizes): the same strides from the kernel, the float path and the op's fake implementation, which
    torch.compile relies on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from reste_timm.nn.binary_conv import binary_conv2d, conv_arguments
    from reste_timm.nn.estimators import hyperparameters

    torch.manual_seed(4)
    x, w = (make() for make in _LAYOUTS[layout])
    pad = w.shape[-1] // 2
    hp, conv = hyperparameters(2.0), conv_arguments([1, 1], [pad, pad], [1, 1], 1, True)
    out = binary_conv2d(x, w, None, hp, conv, "reste", None)[0]
    assert not float_convs
    with native_kernels(False):
        ref = binary_conv2d(x, w, None, hp, conv, "reste", None)[0]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = binary_conv2d(mode.from_tensor(x), mode.from_tensor(w), None, hp, conv, "reste", None)[0]
    assert out.stride() == ref.stride() == fake.stride()
    torch.testing.assert_close(out, ref, rtol=0, atol=32 * EPS32 * float(ref.abs().max()))
