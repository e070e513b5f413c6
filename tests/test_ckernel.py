"""The C loop of ReSTE's float32 CPU backward: closed form, sign output, caching and the fallback."""

from __future__ import annotations

import pytest
import torch

from reste_timm.nn import _ckernel
from reste_timm.nn import estimators as est
from reste_timm.nn.estimators import reste_backward_factor, sign_reste

needs_kernel = pytest.mark.skipif(_ckernel.load() is None, reason="no C compiler on this machine")


def _reference(x: torch.Tensor, o: float) -> torch.Tensor:
    """The closed form with |x| compared to m and t rounded to float32, as the kernels compare."""
    ax = x.abs()
    m32, t32 = torch.tensor(0.1).item(), torch.tensor(1.5).item()
    power = ax.double().clamp_min(0.1).pow((1 - o) / o) / o
    secant = torch.full_like(power, 0.1 ** (1 / o) / 0.1)
    return torch.where(ax <= m32, secant, torch.where(ax <= t32, power, torch.zeros_like(power)))


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, 0.1, -0.1, 0.1 + 1e-7, 1.5, -1.5, 1.5 + 1e-6, 1e-38, -3e38, float("nan"),
               float("inf"), -float("inf")]
    return torch.cat([torch.tensor(special), torch.linspace(-2, 2, 20001),
                      torch.randn(100_000, generator=gen)])


@needs_kernel
@pytest.mark.parametrize("o", [1.0001, 1.3, 2.0, 3.0, 4.0, 16.0])
def test_factor_matches_closed_form_and_sign_matches_torch(o):
    x = _inputs()
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(x.shape, generator=gen)
    params = est._reste_surrogate(o)[1]
    result = _ckernel.reste_grad(x, grad, params, with_sign=True)
    assert result is not None
    out, sign = result
    expected = _reference(x, o) * grad.double()
    # A few float32 ulps: the powers are computed, not looked up.
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0.0, equal_nan=True)
    assert torch.equal(out[expected == 0], expected[expected == 0].float())  # beyond t: exactly 0
    assert torch.equal(sign, torch.sign(x))  # 0 for +-0 and NaN, as torch.sign gives it
    alias = grad.clone()  # in place, as BinaryConv2d's backward calls it
    result = _ckernel.reste_grad(x, alias, params, out=alias)
    assert result is not None and result[0] is alias and result[1] is None
    assert torch.equal(alias, out)


@needs_kernel
@pytest.mark.parametrize("numel", [2304, 1 << 17], ids=["small", "large"])
@pytest.mark.parametrize("o", [1.3, 3.0])
def test_weight_grad_matches_the_composition_in_closed_form(o, numel):
    gen = torch.Generator().manual_seed(2)
    w = torch.cat([torch.tensor([0.0, -0.0, 0.1, -1.5, 1.6]), torch.randn(numel - 5, generator=gen) * 0.8])
    grad = torch.randn(numel, generator=gen)
    scale = w.abs().mean()
    params = est._reste_surrogate(o)[1]
    out = _ckernel.reste_weight_grad(w, grad, scale, params)
    # Through est: (grad * scale) * factor(w); through mean(|w|): sign(w) * sum(grad * sign(w)) / N.
    g64, s64 = grad.double(), torch.sign(w).double()
    expected = g64 * scale.double() * _reference(w, o) + s64 * (g64 * s64).sum() / numel
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    alias = grad.clone()  # in place: the sum is taken before any write
    assert _ckernel.reste_weight_grad(w, alias, scale, params, out=alias) is alias
    assert torch.equal(alias, out)


@needs_kernel
@pytest.mark.parametrize("o", [1.0001, 2.0, 3.0, 16.0])
@pytest.mark.parametrize("bounds", [(1.5, 0.1), (2.0, 0.02), (1.0, 1e-3)],
                         ids=["default", "8-binades", "11-binades"])
def test_generic_loop_and_table_path_agree_with_the_closed_form(o, bounds):
    """Where the compiler targets AVX2 and FMA, bounds within 8 binades take the table path
    (``reste_grad_poly``), wider ones the generic loop; both against float64 and each other."""
    t, m = bounds
    x = torch.cat([_inputs(), torch.rand(50_000, generator=torch.Generator().manual_seed(4)) * (t - m) + m])
    grad = torch.ones_like(x)
    params = tuple(est._reste_surrogate(o, t, m)[1])
    lib = _ckernel.load()
    generic = torch.empty_like(x)
    lib.reste_grad(x.data_ptr(), grad.data_ptr(), generic.data_ptr(), None, x.numel(), *params,
                   torch.get_num_threads())
    out, _ = _ckernel.reste_grad(x, grad, params)
    expected = reste_backward_factor(x.double(), o, t, torch.tensor(m).item())
    expected[x.isnan()] = 0.0
    for result in (generic, out):
        torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=0.0)
        assert torch.equal(result[expected == 0], torch.zeros_like(result[expected == 0]))
    tables = _ckernel._poly_tables(params)
    assert (tables is None) == (bounds[1] == 1e-3)  # 2^-10 .. 2^0 is 11 binades: more than 8
    if hasattr(lib, "reste_grad_poly") and tables is not None:
        assert not torch.equal(out, generic)  # a different computation: the table path ran
        torch.testing.assert_close(out, generic, rtol=1e-6, atol=0.0)


@needs_kernel
def test_table_path_gives_each_element_the_same_value_wherever_it_sits():
    """Full blocks of 8 and the copied tail run the same arithmetic: any prefix gets the values the
    whole array got, the sign output too."""
    x = _inputs()[:40]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    params = est._reste_surrogate(2.5)[1]
    whole, whole_sign = _ckernel.reste_grad(x, grad, params, with_sign=True)
    for n in range(1, 18):
        part, part_sign = _ckernel.reste_grad(x[:n].clone(), grad[:n].clone(), params, with_sign=True)
        assert torch.equal(part, whole[:n]) and torch.equal(part_sign, whole_sign[:n])
        shifted, _ = _ckernel.reste_grad(x[n:].clone(), grad[n:].clone(), params)
        assert torch.equal(shifted, whole[n:])


@needs_kernel
def test_wide_bounds_within_the_c_loops_range_and_beyond_it():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=gen) * torch.logspace(-25, 25, 10_000)  # |log2| up to ~85
    grad = torch.randn(10_000, generator=gen)
    m, t = 1e-30, 1e30  # |log2| about 100: inside [2^-120, 2^120]
    params = est._reste_surrogate(1.7, t, m)[1]
    out, _ = _ckernel.reste_grad(x, grad, params)
    expected = reste_backward_factor(x.double(), 1.7, t, m) * grad.double()
    # z = power * log2|x| rounded to float32 at |z| ~ 40 (ulp 4e-6) gives 2^z a relative error near
    # ln 2 * 2e-6, whatever computes it in float32: a looser bound than at the default m and t.
    torch.testing.assert_close(out.double(), expected, rtol=5e-6, atol=0.0)
    # Beyond the covered bounds the C loop declines and the other kernels answer.
    assert _ckernel.reste_grad(x, grad, est._reste_surrogate(1.7, 2.0 ** 121, m)[1]) is None
    tiny_m = est._reste_surrogate(1.7, t, 1e-37)[1]
    assert _ckernel.reste_weight_grad(x, grad, torch.tensor(1.0), tiny_m) is None
    xr = x.clone().requires_grad_()
    sign_reste(xr, 1.7, t=2.0 ** 121, m=m).backward(grad)
    expected = reste_backward_factor(x.double(), 1.7, 2.0 ** 121, m) * grad.double()
    torch.testing.assert_close(xr.grad.double(), expected, rtol=5e-6, atol=0.0)


@needs_kernel
def test_estimator_backward_takes_the_c_loop(monkeypatch):
    calls = []

    class Counting:  # records each C call of the real plan
        def __init__(self, real):
            self.real = real

        def grad(self, x, grad, out, sign):
            calls.append(x.numel())
            self.real.grad(x, grad, out, sign)

    def counting(params):
        real = _ckernel.plan(params)
        return None if real is None else Counting(real)

    monkeypatch.setattr(est._RESTE_KERNEL, "native", counting)
    est.set_fused_backward("auto")
    x = torch.randn(3, 5, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    up = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    sign_reste(x, 2.5).backward(up)
    assert calls == [x.numel()]
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad, reste_backward_factor(x.detach(), 2.5) * up, rtol=2e-6, atol=2e-6)
    est.set_fused_backward("compile")  # the C loop is skipped in "compile" and "never"
    sign_reste(x, 2.5).backward(up)
    assert len(calls) == 1
    est.set_fused_backward("auto")


def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_CACHE", str(tmp_path))
    monkeypatch.setattr(_ckernel, "_state", {"tried": False, "lib": None})
    lib = _ckernel.load()
    if lib is None:
        pytest.skip("no C compiler on this machine")
    built = list((tmp_path / "kernels").glob("reste_grad_*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))  # no temp left behind
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(_ckernel, "_state", {"tried": False, "lib": None})
    assert _ckernel.load() is not None
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_the_other_kernels_serve(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(_ckernel, "_state", {"tried": False, "lib": None})
    assert _ckernel.load() is None
    x, up = torch.randn(1000), torch.randn(1000)
    assert _ckernel.reste_grad(x, up, est._reste_surrogate(2.0)[1]) is None
    assert _ckernel.reste_weight_grad(x, up, torch.tensor(1.0), est._reste_surrogate(2.0)[1]) is None
    est.set_fused_backward("auto")
    xr = x.clone().requires_grad_()
    sign_reste(xr, 2.0).backward(up)  # eager (small) or compiled: the same numbers
    torch.testing.assert_close(xr.grad, reste_backward_factor(x, 2.0) * up, rtol=2e-6, atol=2e-6)
