"""Estimators: exact sign forward, gradients against closed forms written here element by element."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from reste_timm.nn import _backward
from reste_timm.nn import estimators as est
from reste_timm.nn.estimators import (
    get_estimator,
    list_estimators,
    register_estimator,
    reste_backward_factor,
    set_fused_backward,
    sign_approx,
    sign_ede,
    sign_reste,
    sign_ste,
)

M, T = 0.1, 1.5
SPECIAL = [0.0, M, -M, T, -T, 1.0, -1.0, 0.5, -0.5, 1e-8, -1e-8, 0.0999, 0.1001, 1.4999, 1.5001, -1.5001,
           1.6, -2.0, 3.0, 10.0, -100.0]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rounded(v: float, dtype: torch.dtype) -> float:
    # The kernels compare |x| with a bound rounded to their compute dtype, as torch does with a Python
    # scalar: x's dtype, float32 for 16-bit inputs.
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.tensor(v, dtype=compute).item()


def reste_closed(v: float, o: float, dtype=torch.float64) -> float:
    """Spec section 1, one element: secant on |x| <= m, power derivative on (m, t], 0 beyond."""
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
    return k * t * (1.0 - math.tanh(t * v) ** 2)


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


def _use(mode: str, monkeypatch) -> None:
    # "auto" with no size threshold sends even these small tensors through the compiled kernel.
    monkeypatch.setattr(_backward, "FUSED_MIN_NUMEL", 0)
    set_fused_backward(mode)


@pytest.fixture(params=["never", "compile", "auto"])
def mode(request, monkeypatch):
    """Runs a test with the eager kernels, the compiled kernels, then the default (C loop for ReSTE)."""
    _use(request.param, monkeypatch)
    yield request.param
    set_fused_backward("auto")


@pytest.fixture
def eager(monkeypatch):
    _use("never", monkeypatch)
    yield
    set_fused_backward("auto")


@pytest.fixture(params=["compile", "auto"])
def fused(request, monkeypatch):
    """The compiled kernels, then the default ("auto": ReSTE's float32 backward in the C loop)."""
    _use(request.param, monkeypatch)
    yield
    assert est.fused_backward_mode() == request.param  # the fast kernel ran: no silent fallback
    set_fused_backward("auto")


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
    tol = TOL[dtype]
    torch.testing.assert_close(x.grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("name,fn,closed", CASES, ids=[c[0] for c in CASES])
def test_gradient_matches_closed_form_float64(name, fn, closed, eager):
    _check_grad(fn, closed, torch.float64)


@pytest.mark.parametrize("name,fn,closed", CASES, ids=[c[0] for c in CASES])
def test_fused_kernel_matches_closed_form(name, fn, closed, fused):
    # One compiled graph per estimator (float32); a new o or progress reuses it.
    _check_grad(fn, closed, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reste_gradient_in_low_precision_dtypes(dtype, mode):
    _check_grad(CASES[3][1], CASES[3][2], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn,closed", CASES[4:7], ids=[c[0] for c in CASES[4:7]])
def test_other_estimators_in_low_precision_dtypes(name, fn, closed, dtype, eager):
    _check_grad(fn, closed, dtype)


def test_boundaries_follow_the_reference():
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


def test_reste_at_o_1_is_ste_clipped_at_t():
    x = _inputs(torch.float64).requires_grad_()
    sign_reste(x, 1.0).backward(torch.ones_like(x))
    assert torch.equal(x.grad, (x.detach().abs() <= T).double())


def test_detach_form_gives_the_same_gradient():
    # Spec section 1: G(x) + (sign(x) - G(x)).detach() is an exact reformulation.
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


def test_closed_form_helper_matches_the_table():
    x = _inputs(torch.float64)
    for o in (1.0, 1.5, 2.0, 3.0):
        expected = torch.tensor([reste_closed(v, o) for v in x.tolist()], dtype=torch.float64)
        torch.testing.assert_close(reste_backward_factor(x, o), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused_mode", ["compile", "auto"])
def test_fused_path_matches_closed_form_on_a_large_channels_last_tensor(fused_mode):
    set_fused_backward(fused_mode)  # with the default size threshold
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 16, 32, 32, generator=gen) * 1.2).contiguous(memory_format=torch.channels_last)
    assert x.numel() >= _backward.FUSED_MIN_NUMEL
    x.requires_grad_()
    up = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    sign_reste(x, 2.7).backward(up)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    expected = reste_backward_factor(x.detach().double(), 2.7) * up.double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-6, atol=2e-6)
    assert est.fused_backward_mode() == fused_mode  # the fast kernel worked (no silent fallback)
    set_fused_backward("auto")


def test_new_exponent_does_not_recompile(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(_backward, "FUSED_MIN_NUMEL", 0)
    set_fused_backward("compile")
    x = torch.randn(5000, requires_grad=True)
    sign_reste(x, 1.2).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    for o in (1.7, 2.2, 2.9):
        x.grad = None
        sign_reste(x, o).sum().backward()
        torch.testing.assert_close(x.grad, reste_backward_factor(x.detach(), o), rtol=2e-6, atol=2e-6)
    assert counters["stats"]["unique_graphs"] == graphs
    set_fused_backward("auto")


def test_failed_compile_falls_back_to_eager(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = est._BackwardKernel("test", est._reste_fused, est._reste_eager)
    set_fused_backward("auto")
    x, up = torch.randn(_backward.FUSED_MIN_NUMEL), torch.randn(_backward.FUSED_MIN_NUMEL)
    params = (M, T, M ** (1 / 2) / M, 0.5, -0.5)
    try:
        with pytest.warns(RuntimeWarning, match="fused ReSTE|fused test"):
            out = kernel(x, up, params)
        assert est.fused_backward_mode() == "never"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            kernel(x, up, params)
    finally:
        set_fused_backward("auto")
    torch.testing.assert_close(out, reste_backward_factor(x, 2.0) * up)


def test_fused_mode_validation():
    with pytest.raises(ValueError, match="auto"):
        set_fused_backward("sometimes")


def test_invalid_reste_parameters():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="o must be >= 1"):
        sign_reste(x, 0.5)
    with pytest.raises(ValueError, match="0 < m < t"):
        sign_reste(x, 2.0, t=0.1, m=0.2)


def test_registry():
    assert list_estimators() == sorted(list_estimators())
    assert {"reste", "ste", "approxsign", "ede"} <= set(list_estimators())
    assert get_estimator("ReSTE") is get_estimator("reste")
    with pytest.raises(ValueError) as info:
        get_estimator("nope")
    assert all(name in str(info.value) for name in ("reste", "ste", "approxsign", "ede"))

    @register_estimator("Test_Identity")
    def _identity(x, o=1.0, progress=0.0):
        return x * 1.0

    try:
        assert "test_identity" in list_estimators()
        assert get_estimator("test_identity") is _identity
    finally:
        est._ESTIMATORS.pop("test_identity")


@pytest.mark.parametrize("name", ["reste", "ste", "approxsign", "ede"])
def test_registry_entries_use_o_and_progress(name):
    x = torch.linspace(-2, 2, 101, dtype=torch.float64, requires_grad=True)
    get_estimator(name)(x, 2.0, 0.5).sum().backward()
    closed = {"reste": lambda v: reste_closed(v, 2.0), "ste": ste_closed, "approxsign": approx_closed,
              "ede": lambda v: ede_closed(v, 0.5)}[name]
    expected = torch.tensor([closed(v) for v in x.detach().tolist()], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
