"""Estimators: exact sign forward, gradients against closed forms written here element by element."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from reste_timm.nn import estimators as est
from reste_timm.nn.binary_conv import binary_conv2d, binary_conv2d_backward, conv_arguments
from reste_timm.nn.estimators import (
    Estimator,
    get_estimator,
    hyperparameters,
    list_estimators,
    native_kernels,
    register_estimator,
    reste_factor,
    sign,
    sign_approx,
    sign_ede,
    sign_grad,
    sign_reste,
    sign_ste,
)

M, T = 0.1, 1.5
SPECIAL = [0.0, M, -M, T, -T, 1.0, -1.0, 0.5, -0.5, 1e-8, -1e-8, 0.0999, 0.1001, 1.4999, 1.5001, -1.5001,
           1.6, -2.0, 3.0, 10.0, -100.0]
# Relative, element by element: float32 computes the powers to a few ulps; the 16-bit results are the
# float32 factor times the gradient, rounded once to 11 (float16) or 8 (bfloat16) significant bits.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _rounded(v: float, dtype: torch.dtype) -> float:
    # The kernels compare |x| with a bound rounded to their compute dtype, as torch does with a Python
    # scalar: x's dtype, float32 for 16-bit inputs.
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.tensor(v, dtype=compute).item()


def reste_closed(v: float, o: float, dtype=torch.float64) -> float:
    """docs/method.md section 1, one element: secant on |x| <= m, power derivative on (m, t], 0 beyond."""
    a, m, t = abs(v), _rounded(M, dtype), _rounded(T, dtype)
    if a <= m:
        return M ** (1.0 / o) / M
    if a <= t:
        return (1.0 / o) * a ** ((1.0 - o) / o)
    return 0.0


def ste_closed(v: float, dtype=torch.float64) -> float:
    return 1.0 if abs(v) <= 1.0 else 0.0


def approx_closed(v: float, dtype=torch.float64) -> float:
    return max(0.0, 2.0 - 2.0 * abs(v))


def ede_closed(v: float, progress: float, dtype=torch.float64) -> float:
    t = 0.1 * 10.0 ** (2.0 * progress)
    k = max(1.0 / t, 1.0)
    # k t (1 - tanh^2(t v)) = 4 k t e^(-2|tv|) / (1 + e^(-2|tv|))^2, without 1 - tanh^2's cancellation
    e = math.exp(-2.0 * abs(t * v))
    return 4.0 * k * t * e / (1.0 + e) ** 2


CASES = [
    ("reste o=1", lambda x: sign_reste(x, 1.0), lambda v, d: reste_closed(v, 1.0, d)),
    ("reste o=1.5", lambda x: sign_reste(x, 1.5), lambda v, d: reste_closed(v, 1.5, d)),
    ("reste o=2", lambda x: sign_reste(x, 2.0), lambda v, d: reste_closed(v, 2.0, d)),
    ("reste o=3", lambda x: sign_reste(x, 3.0), lambda v, d: reste_closed(v, 3.0, d)),
    ("ste", sign_ste, ste_closed),
    ("approxsign", sign_approx, approx_closed),
    ("ede p=0", lambda x: sign_ede(x, 0.0), lambda v, d: ede_closed(v, 0.0, d)),
    ("ede p=0.5", lambda x: sign_ede(x, 0.5), lambda v, d: ede_closed(v, 0.5, d)),
    ("ede p=1", lambda x: sign_ede(x, 1.0), lambda v, d: ede_closed(v, 1.0, d)),
]


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def impl(request):
    """Each test once with the ops' C kernels where they apply (ReSTE, float32, CPU) and once with
    their torch implementation, the closed form."""
    with native_kernels(request.param):
        yield request.param


def _inputs(dtype: torch.dtype, n: int = 600) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), x]).to(dtype)


def _check_grad(fn, closed, dtype: torch.dtype) -> None:
    x = _inputs(dtype).requires_grad_()
    up = torch.linspace(-2.0, 3.0, x.numel(), dtype=torch.float64).to(dtype)
    y = fn(x)
    assert torch.equal(y, torch.sign(x)) and y.dtype == dtype
    y.backward(up)
    assert x.grad.dtype == dtype
    expected = torch.tensor([closed(v, dtype) for v in x.detach().double().tolist()], dtype=torch.float64)
    expected = expected * up.double()
    # Relative error element by element (a wrong branch near t or m gives 0 against a non-zero value);
    # values below the dtype's smallest normal number have only its subnormal resolution.
    torch.testing.assert_close(x.grad.double(), expected, rtol=TOL[dtype], atol=torch.finfo(dtype).tiny)


@pytest.mark.parametrize("name,fn,closed", CASES, ids=[c[0] for c in CASES])
def test_gradient_matches_closed_form_float64(name, fn, closed, impl):
    _check_grad(fn, closed, torch.float64)


@pytest.mark.parametrize("name,fn,closed", CASES, ids=[c[0] for c in CASES])
def test_gradient_matches_closed_form_float32(name, fn, closed, impl):
    _check_grad(fn, closed, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn,closed", CASES[3:7], ids=[c[0] for c in CASES[3:7]])
def test_gradient_in_16_bit_dtypes(name, fn, closed, dtype, impl):
    _check_grad(fn, closed, dtype)


def test_boundaries_follow_the_reference(impl):
    x = torch.tensor([M, -M, T, -T, 0.0, 1.500001, -1.500001], dtype=torch.float64, requires_grad=True)
    sign_reste(x, 3.0).backward(torch.ones_like(x))
    secant, power_at_t = M ** (1 / 3) / M, (1 / 3) * T ** (-2 / 3)
    expected = [secant, secant, power_at_t, power_at_t, secant, 0.0, 0.0]
    torch.testing.assert_close(x.grad, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("fn", [sign_ste, sign_approx, sign_ede, lambda x: sign_reste(x, 2.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_forward_is_exactly_torch_sign(fn, dtype):
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.3, -7.0, float("inf"), -float("inf")]).to(dtype)
    out = fn(x)
    assert out.dtype == dtype and torch.equal(out, torch.sign(x))
    assert out[0] == 0 and out[1] == 0  # sign(0) = 0, as in the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reste_at_o_1_is_ste_clipped_at_t(dtype, impl):
    x = _inputs(dtype).requires_grad_()
    sign_reste(x, 1.0).backward(torch.ones_like(x))
    assert torch.equal(x.grad, (x.detach().abs() <= T).to(dtype))


def test_detach_form_gives_the_same_gradient():
    # docs/method.md: G(x) + (sign(x) - G(x)).detach() is an exact reformulation.
    o = 2.5
    x = _inputs(torch.float64).requires_grad_()
    sign_reste(x, o).backward(torch.ones_like(x))
    x2 = x.detach().clone().requires_grad_()
    ax, s = x2.abs(), torch.sign(x2)
    power = torch.where(ax <= T, s * ax.clamp_min(M).pow(1 / o), s * T ** (1 / o))
    g = torch.where(ax <= M, x2 * (M ** (1 / o) / M), power)
    out = g + (torch.sign(x2) - g).detach()
    assert torch.equal(out, torch.sign(x2))
    out.backward(torch.ones_like(x2))
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_closed_form_matches_the_table_with_o_as_number_or_tensor():
    x = _inputs(torch.float64)
    for o in (1.0, 1.5, 2.0, 3.0):
        expected = torch.tensor([reste_closed(v, o) for v in x.tolist()], dtype=torch.float64)
        for given in (o, torch.tensor(o, dtype=torch.float64)):
            torch.testing.assert_close(reste_factor(x, given), expected, rtol=1e-12, atol=1e-12)


def test_large_channels_last_tensor_keeps_its_layout(impl):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 16, 32, 32, generator=gen) * 1.2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    up = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    sign_reste(x, 2.7).backward(up)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    expected = reste_factor(x.detach().double(), 2.7) * up.double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-6, atol=2e-6)


def test_invalid_reste_parameters():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="o must be a finite number >= 1"):
        sign_reste(x, 0.5)
    with pytest.raises(ValueError, match="0 < m < t"):
        sign_reste(x, 2.0, t=0.1, m=0.2)
    with pytest.raises(ValueError, match="unknown estimator kind"):
        Estimator("mine", "nope")


def test_registry():
    assert list_estimators() == sorted(list_estimators())
    assert {"reste", "ste", "approxsign", "ede"} <= set(list_estimators())
    assert get_estimator("ReSTE") is get_estimator("reste")
    with pytest.raises(ValueError) as info:
        get_estimator("nope")
    assert all(name in str(info.value) for name in ("reste", "ste", "approxsign", "ede"))

    @register_estimator("Test_Identity")
    def _identity(x, o=1.0, progress=0.0):
        return x * o

    register_estimator("reste_t2")(Estimator("reste_t2", "reste", t=2.0))
    try:
        assert {"test_identity", "reste_t2"} <= set(list_estimators())
        assert get_estimator("test_identity").fn is _identity
        x = torch.tensor([1.8], requires_grad=True)
        get_estimator("test_identity")(x, 3.0).backward()
        assert x.grad.item() == 3.0  # a function's gradient comes from autograd, o as a tensor
        x.grad = None
        get_estimator("reste_t2")(x, 2.0).backward()
        assert x.grad.item() == pytest.approx(0.5 * 1.8 ** -0.5)  # inside t = 2: not cut
    finally:
        est._ESTIMATORS.pop("test_identity")
        est._ESTIMATORS.pop("reste_t2")


@pytest.mark.parametrize("name", ["reste", "ste", "approxsign", "ede"])
def test_registry_entries_use_o_and_progress(name):
    x = torch.linspace(-2, 2, 101, dtype=torch.float64, requires_grad=True)
    get_estimator(name)(x, 2.0, 0.5).sum().backward()
    closed = {"reste": lambda v: reste_closed(v, 2.0), "ste": ste_closed, "approxsign": approx_closed,
              "ede": lambda v: ede_closed(v, 0.5)}[name]
    expected = torch.tensor([closed(v) for v in x.detach().tolist()], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the registered ops

HP = hyperparameters(2.3, 0.4)


@pytest.mark.parametrize("kind", ["reste", "ste", "approxsign", "ede"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_estimator_ops(kind, dtype):
    """Schema, fake (meta) implementations, autograd registration and AOT tracing of every op."""
    x = torch.randn(3, 4, 5, 5, dtype=dtype)
    g = torch.randn(3, 4, 5, 5, dtype=dtype)
    for op, args in [(sign, (x.clone().requires_grad_(), HP, kind)),
                     (sign_grad, (x, g, HP, kind))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("binarize_input", [True, False], ids=["1w1a", "1w32a"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_opcheck_binary_conv(binarize_input, memory_format):
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(6, 4, 3, 3).contiguous(memory_format=memory_format).requires_grad_()
    b = torch.randn(6).requires_grad_()
    for bias, stride in ((None, [1, 1]), (b, [2, 2])):
        conv = conv_arguments(stride, [1, 1], [1, 1], 1, binarize_input)
        torch.library.opcheck(binary_conv2d, (x, w, bias, HP, conv, "reste", None))
        out, bw, scale = binary_conv2d(x, w, bias, HP, conv, "reste", None)
        for mask in ([True, True, bias is not None], [False, True, False], [True, False, False]):
            args = (torch.randn_like(out), x.detach(), w.detach(), bw, scale, HP, conv, "reste", mask)
            torch.library.opcheck(binary_conv2d_backward, args)


def test_one_compiled_graph_serves_every_exponent_and_progress():
    """The exponent and EDE's progress are tensors to the compiler: new values reuse the graph."""
    counters.clear()
    fn = torch.compile(lambda x, hp: (sign(x, hp, "reste") + sign(x, hp, "ede")).sum(),
                       backend="aot_eager", fullgraph=True)
    x = torch.randn(64, requires_grad=True)
    for o, progress in [(1.0, 0.0), (1.4, 0.1), (2.2, 0.5), (3.0, 1.0)]:
        x.grad = None
        fn(x, hyperparameters(o, progress)).backward()
        expected = reste_factor(x.detach(), o) + est.ede_factor(x.detach(), progress)
        torch.testing.assert_close(x.grad, expected, rtol=2e-6, atol=2e-6)
    assert counters["stats"]["unique_graphs"] == 1
