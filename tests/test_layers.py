"""BinaryConv2d (docs/method.md, section 2): what the conv sees, where the gradient goes, the helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reste_timm.nn.layers import BinaryConv2d, binary_layers, set_exponent, set_progress, set_weight_cache

M, T = 0.1, 1.5


@pytest.fixture
def conv_calls(monkeypatch):
    """Records the (input, weight) of every F.conv2d call made by the conv modules."""
    calls = []
    real = F.conv2d

    def recording(inp, weight, *args, **kwargs):
        calls.append((inp.detach().clone(), weight.detach().clone()))
        return real(inp, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", recording)
    return calls


def _layer(binarize_input=True, estimator="reste", dtype=torch.float64, **kwargs) -> BinaryConv2d:
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, estimator=estimator, binarize_input=binarize_input, **kwargs)
    return layer.to(dtype)


def _input(dtype=torch.float64) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    x[0, 0, 0, :3] = 0.0  # sign(0) = 0 must reach the conv as 0
    return x


def test_1w1a_conv_sees_scaled_signs_and_ternary_inputs(conv_calls):
    layer = _layer()
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = 0.0
    layer(_input())
    (inp, weight), = conv_calls
    scale = layer.weight.detach().abs().mean()
    assert set(inp.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(inp, torch.sign(_input()))
    assert torch.equal(weight, torch.sign(layer.weight.detach()) * scale)
    assert weight[0, 0, 0, 0] == 0 and set(weight.abs().unique().tolist()) == {0.0, scale.item()}


def test_1w32a_conv_sees_the_input_untouched(conv_calls):
    layer = _layer(binarize_input=False)
    x = _input()
    layer(x)
    (inp, weight), = conv_calls
    assert torch.equal(inp, x)
    assert torch.equal(weight, layer.binary_weight().detach())


def _detach_sign(x: torch.Tensor, o: float) -> torch.Tensor:
    # ReSTE through autograd alone: G(x) + (sign(x) - G(x)).detach() (docs/method.md, section 1).
    ax, s = x.abs(), torch.sign(x)
    power = torch.where(ax <= T, s * ax.clamp_min(M).pow(1 / o), s * T ** (1 / o))
    g = torch.where(ax <= M, x * (M ** (1 / o) / M), power)
    return g + (s - g).detach()


@pytest.mark.parametrize("binarize_input", [True, False])
@pytest.mark.parametrize("o", [1.0, 2.3])
def test_gradients_match_an_autograd_reference(binarize_input, o):
    layer = _layer(binarize_input)
    layer.exponent = o
    x = _input().requires_grad_()
    up = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layer(x).backward(up)

    w = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    a = _detach_sign(x_ref, o) if binarize_input else x_ref
    out = F.conv2d(a, _detach_sign(w, o) * w.abs().mean(), layer.bias, padding=1)
    out.backward(up)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)

    # The scale's share of the gradient is not negligible: detaching it gives another answer.
    w2 = layer.weight.detach().clone().requires_grad_()
    F.conv2d(a.detach(), _detach_sign(w2, o) * w2.abs().mean().detach(), layer.bias, padding=1).backward(up)
    assert not torch.allclose(w2.grad, w.grad, rtol=1e-3, atol=1e-6)


def test_binary_weight_and_scale():
    layer = _layer()
    bw = layer.binary_weight()
    assert bw.requires_grad
    torch.testing.assert_close(layer.binary_scale(), layer.weight.abs().mean())
    torch.testing.assert_close(bw, torch.sign(layer.weight) * layer.weight.abs().mean())


@pytest.mark.parametrize("o", [1.0, 2.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_dtypes(dtype, o, conv_calls):
    layer = _layer(dtype=dtype)
    layer.exponent = o
    x = _input(dtype).requires_grad_()
    out = layer(x)
    assert out.dtype == dtype
    if dtype != torch.float32:  # float32 on CPU takes the bitwise kernel (tests/test_bitwise_forward.py)
        assert conv_calls[0][0].dtype == dtype
        assert set(conv_calls[0][0].unique().tolist()) == {-1.0, 0.0, 1.0}
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out.backward(up)
    assert layer.weight.grad.dtype == dtype and x.grad.dtype == dtype
    # The same layer, input and upstream gradient, exactly, in float64: the only difference left is the
    # rounding of the arithmetic. Measured: at most 1.5 eps of the largest value, for every tensor.
    ref = _layer(dtype=dtype).double()
    ref.exponent = o
    x_ref = x.detach().double().requires_grad_()
    out_ref = ref(x_ref)
    out_ref.backward(up.double())
    eps = torch.finfo(dtype).eps
    pairs = (("output", out, out_ref), ("weight grad", layer.weight.grad, ref.weight.grad),
             ("input grad", x.grad, x_ref.grad), ("bias grad", layer.bias.grad, ref.bias.grad))
    for name, got, want in pairs:
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * eps * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_channels_last_gives_the_same_numbers_and_layout():
    layer, layer_cl = _layer(), _layer().to(memory_format=torch.channels_last)
    x = _input().requires_grad_()
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, out_cl = layer(x), layer_cl(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)
    out.square().sum().backward()
    out_cl.square().sum().backward()
    torch.testing.assert_close(layer_cl.weight.grad, layer.weight.grad)
    torch.testing.assert_close(x_cl.grad, x.grad)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 3, 3), _layer(), nn.Sequential(nn.ReLU(), _layer(False)))


def test_set_exponent_and_progress_reach_every_binary_layer():
    model = _model()
    assert len(list(binary_layers(model))) == 2
    assert set_exponent(model, 2.5) == 2
    assert set_progress(model, 1.7) == 2
    assert [(m.exponent, m.progress) for m in binary_layers(model)] == [(2.5, 1.0), (2.5, 1.0)]
    set_progress(model, -1)
    assert {m.progress for m in binary_layers(model)} == {0.0}
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            set_exponent(model, bad)


def test_exponent_changes_the_gradient_not_the_output():
    layer = _layer()
    x = _input().requires_grad_()
    grads, outs = [], []
    for o in (1.0, 3.0):
        set_exponent(layer, o)
        layer.weight.grad = None
        out = layer(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(layer.weight.grad.clone())
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])


def test_weight_cache_serves_no_grad_forwards_and_follows_updates():
    layer = _layer(bias=False)
    x = _input()
    with torch.no_grad():
        plain = layer(x)
    assert set_weight_cache(layer) == 1
    with torch.no_grad():
        first = layer(x)
        cached = layer._cached[1]
        layer(x)
        assert layer._cached[1] is cached  # reused, not recomputed
        torch.testing.assert_close(first, plain)
        layer.weight.mul_(-2.0)  # an in-place update, like an optimizer step
        updated = layer(x)
    assert layer._cached[1] is not cached
    torch.testing.assert_close(updated, -2.0 * plain)  # signs flip and mean|w| doubles
    out = layer(x)  # a forward with gradients drops the cache and computes bw with its graph
    assert layer._cached is None and out.requires_grad


def test_estimator_name_is_validated_and_kept():
    layer = _layer(estimator="STE")
    assert layer.estimator == "ste" and "estimator=ste" in repr(layer)
    with pytest.raises(ValueError, match="known"):
        _layer(estimator="nope")


@pytest.fixture
def plain_reste():
    """ReSTE registered as a function: BinaryConv2d takes the plain conv(est(a), est(w) * s) path."""
    from reste_timm.nn import estimators

    @estimators.register_estimator("reste_plain_test")
    def _plain(x, o=1.0, progress=0.0):
        return estimators.sign_reste(x, o)

    yield "reste_plain_test"
    estimators._ESTIMATORS.pop("reste_plain_test")


def _saved_bytes(layer: BinaryConv2d, x: torch.Tensor) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(sizes)


OP_NODE = "GeneratedBackwardFor_reste_timm_binary_conv2d_defaultBackward"
EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("conv_kwargs", [{}, {"stride": 2, "dilation": 2, "bias": False}], ids=["s1", "s2d2"])
def test_conv_op_matches_the_plain_path_and_keeps_less(plain_reste, conv_kwargs):
    fused, plain = _layer(**conv_kwargs), _layer(estimator=plain_reste, **conv_kwargs)
    set_exponent(fused, 2.2)
    set_exponent(plain, 2.2)
    x1 = _input().requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    out1, out2 = fused(x1), plain(x2)
    up = torch.randn(out1.shape, dtype=torch.float64)
    assert out1.grad_fn.name() == OP_NODE and out2.grad_fn.name() != OP_NODE
    assert torch.equal(out1, out2)
    out1.backward(up)
    out2.backward(up)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    if fused.bias is not None:
        torch.testing.assert_close(fused.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)
    # The plain path keeps x (estimator) and sign(x) (conv); the op only x. For the weight the plain
    # composition keeps w twice (estimator, abs) and est(w) (product), the op w once; both keep bw, the
    # scale and hp (the plain path twice: one sign op each for x and w).
    act = x1.numel() * x1.element_size()
    weight = fused.weight.numel() * fused.weight.element_size()
    hp = fused.hparams.numel() * fused.hparams.element_size()
    assert _saved_bytes(plain, x2) - _saved_bytes(fused, x1) == act + 2 * weight + hp


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("needs", ["both", "input", "weight"])
@pytest.mark.parametrize("native", [True, False], ids=["c-loop", "torch-ops"])
def test_float32_conv_op_matches_the_plain_path(plain_reste, memory_format, needs, native):
    """Float32: the op's CPU backward runs the C loops (gradient and sign in one pass, the weight's
    whole gradient in one call), or with native_kernels(False) the closed form."""
    from reste_timm.nn.estimators import native_kernels

    fused = BinaryConv2d(8, 8, 3, padding=1, bias=True).to(memory_format=memory_format)
    plain = BinaryConv2d(8, 8, 3, padding=1, bias=True, estimator=plain_reste).to(memory_format=memory_format)
    plain.load_state_dict(fused.state_dict())
    for layer in (fused, plain):
        set_exponent(layer, 2.5)
        layer.weight.requires_grad_(needs != "input")
    torch.manual_seed(2)
    x = torch.randn(4, 8, 24, 24).contiguous(memory_format=memory_format)
    x[0, 0, 0, :5] = 0.0
    x1, x2 = x.clone().requires_grad_(needs != "weight"), x.clone().requires_grad_(needs != "weight")
    with native_kernels(native):
        out1 = fused(x1)
        out2 = plain(x2)
        assert out1.grad_fn.name() == OP_NODE
        if native:  # the bitwise kernel's exact sums against the float conv's rounding
            torch.testing.assert_close(out1, out2, rtol=0, atol=32 * EPS32 * float(out2.detach().abs().max()))
        else:
            assert torch.equal(out1, out2)
        up = torch.randn(out1.shape)
        out1.backward(up)
    with native_kernels(False):
        plain(x2).backward(up)
    if needs != "weight":
        # Same formula, float32 rounding of the power computed two ways: a few ulps.
        torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-6, atol=1e-6)
        assert x1.grad.is_contiguous(memory_format=memory_format)
    if needs != "input":
        torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["torch-ops", "c-loop"])
@pytest.mark.parametrize("estimator", ["reste", "ste", "approxsign", "ede"])
def test_weight_gradient_op_equals_the_composition(estimator, dtype):
    """scaled_sign_grad, the binary weight's gradient in the conv op's backward, against
    autograd through est(w) * mean(|w|) op by op."""
    from reste_timm.nn.binary_conv import scaled_sign_grad
    from reste_timm.nn.estimators import get_estimator, native_plan

    torch.manual_seed(3)
    w = torch.randn(16, 16, 3, 3, dtype=dtype, requires_grad=True)
    composed = get_estimator(estimator)(w, 2.5, 0.4) * w.abs().mean()
    up = torch.randn(composed.shape, dtype=dtype)
    composed.backward(up)
    est = get_estimator(estimator)
    hp = est.hyperparameters(2.5, 0.4)
    got = scaled_sign_grad(w.detach(), up, w.detach().abs().mean(), hp, est.kind, native_plan(est.kind, hp))
    # float64 runs autograd's own ops in its order: equal to rounding; the float32 ReSTE weight takes
    # the C loop (FMA, a double sum): a few ulps.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, w.grad, rtol=tol, atol=tol * w.grad.abs().max().item())
