"""The C kernels of ReSTE's float32 CPU backward against the closed form, and how they are built."""

from __future__ import annotations

import warnings

import pytest
import torch

from reste_timm.nn import kernels, native
from reste_timm.nn.estimators import native_kernels, reste_factor, sign_reste

needs_kernel = pytest.mark.skipif(kernels.plan(2.0, 1.5, 0.1) is None, reason="no C compiler on this machine")


def _reference(x: torch.Tensor, o: float, t: float = 1.5, m: float = 0.1) -> torch.Tensor:
    """The closed form in float64, |x| compared with m and t rounded to float32 as the kernels compare."""
    m32, t32 = torch.tensor(m).item(), torch.tensor(t).item()
    ref = reste_factor(x.double(), o, t32, m32)
    ref[x.abs() <= m32] = m ** (1 / o) / m  # the secant from the unrounded m, as the kernels take it
    ref[x.isnan()] = 0.0
    return ref


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, 0.1, -0.1, 0.1 + 1e-7, 1.5, -1.5, 1.5 + 1e-6, 1e-38, -3e38, float("nan"),
               float("inf"), -float("inf")]
    return torch.cat([torch.tensor(special), torch.linspace(-2, 2, 20001),
                      torch.randn(100_000, generator=gen)])


def _run(plan: kernels.Plan, x, grad, with_sign=False):
    out = torch.empty_like(grad)
    sign = torch.empty_like(x) if with_sign else None
    plan.grad(x, grad, out, sign)
    return out, sign


@needs_kernel
@pytest.mark.parametrize("tables", [True, False], ids=["table-loop", "generic-loop"])
@pytest.mark.parametrize("o", [1.0, 1.0001, 1.3, 2.0, 3.0, 4.0, 16.0])
def test_factor_matches_closed_form_and_sign_matches_torch(o, tables):
    x = _inputs()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out, sign = _run(kernels.plan(o, 1.5, 0.1, use_tables=tables), x, grad, with_sign=True)
    expected = _reference(x, o) * grad.double()
    # A few float32 ulps: the powers are computed, not looked up.
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0.0, equal_nan=True)
    assert torch.equal(out[expected == 0], expected[expected == 0].float())  # beyond t: exactly 0
    assert torch.equal(sign, torch.sign(x))  # 0 for +-0 and NaN, as torch.sign gives it
    alias = grad.clone()  # in place
    kernels.plan(o, 1.5, 0.1, use_tables=tables).grad(x, alias, alias, None)
    assert torch.equal(alias, out)


@needs_kernel
@pytest.mark.parametrize("numel", [2304, 1 << 17], ids=["small", "large"])
@pytest.mark.parametrize("o", [1.3, 3.0])
def test_weight_grad_matches_the_composition_in_closed_form(o, numel):
    gen = torch.Generator().manual_seed(2)
    w = torch.cat([torch.tensor([0.0, -0.0, 0.1, -1.5, 1.6]), torch.randn(numel - 5, generator=gen) * 0.8])
    grad = torch.randn(numel, generator=gen)
    scale = w.abs().mean()
    out = torch.empty_like(grad)
    kernels.plan(o, 1.5, 0.1).weight_grad(w, grad, scale, out)
    # Through est: (grad * scale) * factor(w); through mean(|w|): sign(w) * sum(grad * sign(w)) / N.
    g64, s64 = grad.double(), torch.sign(w).double()
    expected = g64 * scale.double() * _reference(w, o) + s64 * (g64 * s64).sum() / numel
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    alias = grad.clone()  # in place: the sum is taken before any write
    kernels.plan(o, 1.5, 0.1).weight_grad(w, alias, scale, alias)
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
    generic, _ = _run(kernels.plan(o, t, m, use_tables=False), x, grad)
    table = kernels.plan(o, t, m)
    out, _ = _run(table, x, grad)
    expected = _reference(x, o, t, m)
    for result in (generic, out):
        torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=0.0)
        assert torch.equal(result[expected == 0], torch.zeros_like(result[expected == 0]))
    assert (kernels.poly_tables(table.params) is None) == (m == 1e-3)  # 2^-10 .. 2^0: 11 binades > 8
    if table.tables is not None:
        assert not torch.equal(out, generic)  # a different computation: the table path ran
        torch.testing.assert_close(out, generic, rtol=1e-6, atol=0.0)


@needs_kernel
def test_table_path_gives_each_element_the_same_value_wherever_it_sits():
    """Full blocks of 8 and the copied tail run the same arithmetic: any prefix gets the values the
    whole array got, the sign output too."""
    x = _inputs()[:40]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    plan = kernels.plan(2.5, 1.5, 0.1)
    whole, whole_sign = _run(plan, x, grad, with_sign=True)
    for n in range(1, 18):
        part, part_sign = _run(plan, x[:n].clone(), grad[:n].clone(), with_sign=True)
        assert torch.equal(part, whole[:n]) and torch.equal(part_sign, whole_sign[:n])
        shifted, _ = _run(plan, x[n:].clone(), grad[n:].clone())
        assert torch.equal(shifted, whole[n:])


@needs_kernel
@pytest.mark.parametrize("with_sign", [False, True], ids=["grad", "grad-and-sign"])
def test_avx512_and_avx2_builds_give_the_same_bits(with_sign):
    """Where the compiler targets AVX-512 the table loop runs 16 lanes at a time; a build without
    AVX-512 runs 8. Both compute each lane with the same instructions: the same bits."""
    lib = kernels.library()
    if lib is None or not hasattr(lib, "reste_grad_poly") or "avx512f" not in native.cpu_features():
        pytest.skip("this CPU has no AVX-512")
    avx2 = kernels.library(("-mno-avx512f",))
    x = torch.cat([_inputs(), torch.randn(37, generator=torch.Generator().manual_seed(6))])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    params = kernels.reste_params(2.5, 1.5, 0.1)
    wide, narrow = _run(kernels.Plan(lib, params), x, grad, with_sign), _run(kernels.Plan(avx2, params), x,
                                                                             grad, with_sign)
    assert torch.equal(wide[0], narrow[0]) and (not with_sign or torch.equal(wide[1], narrow[1]))


@needs_kernel
def test_wide_bounds_within_the_c_loops_range_and_beyond_it():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=gen) * torch.logspace(-25, 25, 10_000)  # |log2| up to ~85
    grad = torch.randn(10_000, generator=gen)
    m, t = 1e-30, 1e30  # |log2| about 100: inside [2^-120, 2^120]
    out, _ = _run(kernels.plan(1.7, t, m), x, grad)
    expected = reste_factor(x.double(), 1.7, t, m) * grad.double()
    # z = power * log2|x| rounded to float32 at |z| ~ 40 (ulp 4e-6) gives 2^z a relative error near
    # ln 2 * 2e-6, whatever computes it in float32: a looser bound than at the default m and t.
    torch.testing.assert_close(out.double(), expected, rtol=5e-6, atol=0.0)
    # Beyond the covered bounds there is no plan, and the op's torch implementation answers.
    assert kernels.plan(1.7, 2.0 ** 121, m) is None and kernels.plan(1.7, t, 1e-37) is None
    xr = x.clone().requires_grad_()
    sign_reste(xr, 1.7, t=2.0 ** 121, m=m).backward(grad)
    expected = reste_factor(x.double(), 1.7, 2.0 ** 121, m) * grad.double()
    torch.testing.assert_close(xr.grad.double(), expected, rtol=5e-6, atol=0.0)


@needs_kernel
def test_estimator_op_takes_the_c_loop_unless_told_not_to(monkeypatch):
    calls = []
    real_plan = kernels.plan

    def counting(o, t, m, use_tables=True):
        calls.append(o)
        return real_plan(o, t, m, use_tables)

    monkeypatch.setattr(kernels, "plan", counting)
    x = torch.randn(3, 5, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    up = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    sign_reste(x, 2.5).backward(up)
    assert calls == [2.5]
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad, reste_factor(x.detach(), 2.5) * up, rtol=2e-6, atol=2e-6)
    with native_kernels(False):
        sign_reste(x, 2.5).backward(up)
    assert calls == [2.5]  # the torch implementation ran


def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    if native.load_library("reste_grad.c") is None:
        pytest.skip("no C compiler on this machine")
    built = list((tmp_path / "kernels").glob("reste_grad_*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))  # no temp left behind
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_libraries", {})
    assert native.load_library("reste_grad.c") is not None
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_source_is_built_with_its_headers_and_rebuilt_when_one_changes(tmp_path, monkeypatch):
    # bitconv.c is split into parts (#include "bitconv_*.h"): a changed part must not reuse a stale build.
    monkeypatch.setenv("RESTE_TIMM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "answer.c").write_text('#include "part.h"\nint answer(void) { return PART; }\n')
    answers = []
    for value in (1, 2):
        (src / "part.h").write_text(f"#define PART {value}\n")
        monkeypatch.setattr(native, "_libraries", {})
        lib = native.load_library(str(src / "answer.c"))
        if lib is None:
            pytest.skip("no C compiler on this machine")
        answers.append(lib.answer())
    assert answers == [1, 2]
    assert len(list((tmp_path / "cache" / "kernels").glob("answer_*.so"))) == 2


@pytest.mark.parametrize("cc", ["no-such-compiler", "false"], ids=["no-compiler", "failing-build"])
def test_without_a_working_compiler_it_warns_once_and_the_torch_implementation_serves(cc, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", cc if cc == "false" else str(tmp_path / cc))
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(kernels, "_plans", {})
    with pytest.warns(RuntimeWarning, match="reste_grad.c"):
        assert kernels.plan(2.0, 1.5, 0.1) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert kernels.plan(2.0, 1.5, 0.1) is None
        x, up = torch.randn(1000, requires_grad=True), torch.randn(1000)
        sign_reste(x, 2.0).backward(up)
    torch.testing.assert_close(x.grad, reste_factor(x.detach(), 2.0) * up, rtol=2e-6, atol=2e-6)


def test_native_kernels_can_be_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("RESTE_TIMM_NATIVE", "0")
    monkeypatch.setattr(kernels, "_plans", {})
    assert native.load_library("reste_grad.c") is None and kernels.plan(2.0, 1.5, 0.1) is None
