"""The ReSTE backward on float32 CPU tensors through the C loops of ``csrc/reste_grad.c``.

These are the CPU implementations of the estimator ops in :mod:`reste_timm.nn.estimators`; the
closed form there (:func:`~reste_timm.nn.estimators.reste_factor`) is the definition they are tested
against. Why C and not ``torch.compile``: inductor calls Sleef's ``exp2`` out of line and round-trips
its bit casts through memory, one vector at a time; here the powers are inline (a bit-level ``log2``
and a Taylor ``exp2``), so the compiler vectorizes the loop and keeps several vectors in flight.
Where the compiler targets AVX2 and FMA and ``[m, t]`` spans at most 8 binades (the paper's 0.1 and
1.5 span 5), a second loop skips the powers altogether: a degree-4 polynomial per eighth of the
mantissa range and one scale per binade, picked by lane permutes, fitted in float64 per exponent
(:func:`poly_tables`), 16 lanes at a time where the compiler targets AVX-512 (the same instructions
lane by lane, so the same bits as the 8-lane loop). A third function gives a binary weight's whole
gradient (through the estimator and through ``mean(|w|)``) in one call. docs/performance.md has the
measurements.

:func:`plan` resolves everything for one ``(o, t, m)`` once (library, float parameters, tables): the
exponent changes once per epoch or step, the backward runs twice per binary layer per step.
"""

from __future__ import annotations

import ctypes
import math
import struct
from typing import Dict, Optional, Tuple

import torch

from .native import load_library

__all__ = ["Plan", "library", "plan", "poly_tables", "reste_params"]

_SOURCE = "reste_grad.c"
# The C powers need no clamp of their argument while m >= 2^-120 and t <= 2^120 (see reste_factor in
# the C source); other bounds take the torch implementation.
_BOUNDS = (2.0 ** -120, 2.0 ** 120)


def reste_params(o: float, t: float, m: float) -> Tuple[float, float, float, float, float]:
    """``(m, t, secant, 1/o, (1-o)/o)`` in double, as the C loops take them."""
    return m, t, m ** (1.0 / o) / m, 1.0 / o, (1.0 - o) / o


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the C functions' argument types (ctypes would otherwise pass Python floats as doubles)."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.reste_grad.restype = None
    lib.reste_grad.argtypes = [ptr] * 4 + [i64] + [f32] * 5 + [i32]
    if hasattr(lib, "reste_grad_poly"):  # built where the compiler targets AVX2 and FMA
        lib.reste_grad_poly.restype = None
        lib.reste_grad_poly.argtypes = [ptr] * 4 + [i64] + [f32] * 3 + [ptr] * 2 + [i32] * 2
    lib.reste_weight_grad.restype = None
    lib.reste_weight_grad.argtypes = [ptr] * 3 + [i64, ptr] + [f32] * 5 + [i32]
    return lib


def library(extra_flags: Tuple[str, ...] = ()) -> Optional[ctypes.CDLL]:
    """The built C library with its functions declared, or None (no compiler, failed build, turned
    off); ``extra_flags`` builds a variant (the tests build ``-mno-avx512f`` to compare code paths)."""
    lib = load_library(_SOURCE, extra_flags)
    if lib is not None and lib.reste_grad.argtypes is None:
        _declare(lib)
    return lib


def _float32_exponent(v: float) -> int:
    """The biased exponent field of ``v`` rounded to float32 (as ctypes passes it to C)."""
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 23 & 0xFF


def poly_tables(params: Tuple[float, ...]) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """``(coef, scale, e_lo)`` for ``reste_grad_poly``, or None where ``[m, t]`` spans more than the
    8 binades its scale register holds (or m is subnormal): the generic loop takes those.

    On each eighth ``[1 + j/8, 1 + (j+1)/8)`` of the mantissa range, ``u^power`` is interpolated at the
    5 Chebyshev nodes in float64 (degree 4 in ``r = u - midpoint``, ``|r| <= 1/16``);
    ``scale[i] = inv_o * 2^((e_lo + i - 127) * power)`` in float64. Both are then rounded to float32
    once.
    """
    m, t, _, inv_o, power = params
    e_lo, e_hi = _float32_exponent(m), _float32_exponent(t)
    if e_lo < 1 or e_hi - e_lo > 7:
        return None
    k = torch.arange(5, dtype=torch.float64, device="cpu")  # read by C: CPU whatever the default device
    offsets = torch.cos((2 * k + 1) * math.pi / 10) / 16  # the nodes around each midpoint
    vander = offsets[:, None] ** k[None, :]
    mids = 1 + (torch.arange(8, dtype=torch.float64, device="cpu") + 0.5) / 8
    values = (mids[None, :] + offsets[:, None]) ** power  # (node, eighth)
    coef = torch.linalg.solve(vander, values)  # (power of r, eighth)
    exps = torch.arange(e_lo, e_lo + 8, dtype=torch.float64, device="cpu") - 127
    scale = inv_o * torch.exp2(exps * power)
    return coef.to(torch.float32).reshape(-1).contiguous(), scale.to(torch.float32), e_lo


class Plan:
    """The C calls for one ``(o, t, m)``, resolved once: library, float parameters and tables.

    Both calls take float32 CPU tensors that are dense and laid out alike (element i of each at the
    same offset: both contiguous, or both channels_last); the callers check it.
    """

    __slots__ = ("lib", "params", "tables")

    def __init__(self, lib: ctypes.CDLL, params: Tuple[float, ...], use_tables: bool = True):
        self.lib, self.params = lib, params
        self.tables = poly_tables(params) if use_tables and hasattr(lib, "reste_grad_poly") else None

    def grad(self, x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
             sign: Optional[torch.Tensor]) -> None:
        """``out = grad * f(x)`` (``out`` may be ``grad``) and, unless None, ``sign = sign(x)``."""
        sign_ptr = None if sign is None else sign.data_ptr()
        if self.tables is not None:
            coef, scale, e_lo = self.tables
            self.lib.reste_grad_poly(x.data_ptr(), grad.data_ptr(), out.data_ptr(), sign_ptr, x.numel(),
                                     *self.params[:3], coef.data_ptr(), scale.data_ptr(), e_lo,
                                     torch.get_num_threads())
        else:
            self.lib.reste_grad(x.data_ptr(), grad.data_ptr(), out.data_ptr(), sign_ptr, x.numel(),
                                *self.params, torch.get_num_threads())

    def weight_grad(self, w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                    out: torch.Tensor) -> None:
        """``out`` (may be ``grad``) = the gradient of ``est(w) * mean(|w|)`` for w:
        ``(grad * scale) * f(w) + sign(w) * sum(grad * sign(w)) / w.numel()``, the sum in double.
        ``scale`` is the forward's 0-d float32 ``mean(|w|)``, read in C (no ``.item()``)."""
        self.lib.reste_weight_grad(w.data_ptr(), grad.data_ptr(), out.data_ptr(), w.numel(), scale.data_ptr(),
                                   *self.params, torch.get_num_threads())


_plans: Dict[tuple, Plan] = {}  # a cache per (o, t, m, use_tables); o is annealed, so it is bounded


def plan(o: float, t: float, m: float, use_tables: bool = True) -> Optional[Plan]:
    """The C calls for these parameters, or None where the library is unavailable or the bounds fall
    outside ``[2^-120, 2^120]`` (the torch implementation takes those).

    Args:
        o, t, m: ReSTE's exponent, threshold and interval.
        use_tables: Allow the table loop (False forces the generic loop, for tests).
    """
    key = (o, t, m, use_tables)
    found = _plans.get(key)
    if found is not None:
        return found
    lib = library()
    if lib is None or not (_BOUNDS[0] <= m and t <= _BOUNDS[1]):
        return None
    if len(_plans) >= 64:  # earlier exponents do not come back
        _plans.clear()
    found = _plans[key] = Plan(lib, reste_params(float(o), float(t), float(m)), use_tables)
    return found
