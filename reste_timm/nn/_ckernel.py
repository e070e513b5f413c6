"""The ReSTE backward for float32 CPU tensors as a small C loop, compiled on first use.

Why not only ``torch.compile``: the inductor kernel of the same expression calls Sleef's ``exp2``
out of line and round-trips its bit casts through memory, so each element's ~45 dependent
operations run one vector at a time (about 11 cycles per element on one x86_64 core, against 2
for a plain multiply). Here the powers are inline (bit-level ``log2`` as in
:func:`reste_timm.estimators._log2_float32`, a degree-7 Taylor ``exp2`` on ``[-1/2, 1/2]`` and an
exponent-bit scaling), so the compiler vectorizes the loop and keeps several vectors in flight.
``benchmarks/run.py`` measures both. Where the compiler targets AVX2 and FMA (x86_64 since 2013) and
``[m, t]`` spans at most 8 binades (the default 0.1 and 1.5: 5), a second loop skips the powers: a
degree-4 polynomial per eighth of the mantissa range and one scale per binade, picked by lane
permutes, fitted in float64 per exponent (:func:`_poly_tables`; max error vs float64 2.0e-7 against
the generic loop's 3.8e-7 over o in [1.01, 10^4]): 0.45-0.54 against 0.76-0.79 ns per element on 2
threads (2M and 512K elements, cache-warm), 17-20 -> 15 ms per ResNet-20 step at batch 128. A third
function gives a binary weight's whole gradient (through the estimator and through ``mean(|w|)``) in
one call, where autograd would run about ten small ops.

The source is plain C (no PyTorch headers, about a second to build); the library is cached under
``$RESTE_TIMM_CACHE`` (default ``~/.cache/reste_timm``), keyed by a hash of the source, the compiler
flags and the machine, and written atomically. Without a C compiler, or if the build fails,
:func:`load` returns None and the callers keep the ``torch.compile`` d or eager kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

__all__ = ["load", "plan", "reste_grad", "reste_weight_grad"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* log2 of a positive normal float: exponent bits plus 2 atanh(s) / ln 2, |s| <= 0.2 (series to s^9). */
static inline float log2_pos(float y) {
    int32_t bits, mbits;
    float u, s, s2, series;
    memcpy(&bits, &y, 4);
    bits -= 0x3F2AAAAB;                       /* bits of 2/3: the mantissa lands in [2/3, 4/3) */
    mbits = (bits & 0x7FFFFF) + 0x3F2AAAAB;
    memcpy(&u, &mbits, 4);
    s = (u - 1.0f) / (u + 1.0f);
    s2 = s * s;
    series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
    return (float)(bits >> 23) + 2.8853900817779268f * s * series;  /* 2 / ln 2 */
}

/* 2^z for z in [-125, 125]: 2^n times a degree-7 Taylor polynomial of 2^r, r in [-1/2, 1/2]
   (truncation below 6e-9 relative). */
static inline float exp2_mid(float z) {
    float n = __builtin_floorf(z + 0.5f), r = z - n, p;
    int32_t bits;
    p = TAYLOR7;
    p = p * r + TAYLOR6;
    p = p * r + TAYLOR5;
    p = p * r + TAYLOR4;
    p = p * r + TAYLOR3;
    p = p * r + TAYLOR2;
    p = p * r + TAYLOR1;
    p = p * r + 1.0f;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return p;
}

/* sign(x) as torch.sign gives it: 0 for +-0 and NaN. */
static inline float sign_of(float xv) {
    return (float)((xv > 0.0f) - (xv < 0.0f));
}

/* |x| is clamped into [m, t] before the powers, so that z = power * log2 stays within |log2 m| and
   |log2 t| (power is in (-1, 0] for o >= 1): no clamp of z is needed when m >= 2^-120 and t <= 2^120,
   which plan() checks. Two selects, written one after the other (a nested ?: with NaN-aware
   comparisons compiled to three masks and blends: the loop was 15-20% slower). A NaN x gives 0. */
static inline float reste_factor(float xv, float m, float t, float secant, float inv_o, float power) {
    float ax = __builtin_fabsf(xv);
    float ac = ax > m ? ax : m;
    float f, v;
    ac = ac < t ? ac : t;
    f = exp2_mid(log2_pos(ac) * power) * inv_o;
    v = ax <= t ? f : 0.0f;
    return ax <= m ? secant : v;
}

/* grad_out = grad * f(x), f the ReSTE factor; sign_out (may be NULL) = sign_of(x). grad_out may alias
   grad. Two loops, so that each is branch-free and vectorizes. */
void reste_grad(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t n,
                float m, float t, float secant, float inv_o, float power, int threads) {
    if (sign_out) {
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
        for (int64_t i = 0; i < n; i++) {
            float xv = x[i];
            grad_out[i] = grad[i] * reste_factor(xv, m, t, secant, inv_o, power);
            sign_out[i] = sign_of(xv);
        }
    } else {
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
        for (int64_t i = 0; i < n; i++)
            grad_out[i] = grad[i] * reste_factor(x[i], m, t, secant, inv_o, power);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* The same factor without log2 and exp2, 8 floats at a time: with |x| clamped into [m, t] as above,
   |x| = 2^E * u, u in [1, 2); u^power is a degree-4 polynomial on each eighth of [1, 2) (variable
   r = u - the eighth's midpoint, exact in float), inv_o * 2^(E * power) one of 8 scales: both picked
   by a lane permute from registers (no gathers, which cost more than the powers here). The caller
   checks that [m, t] spans at most 8 binades and fits the tables in float64 (reste_timm._ckernel).
   coef[8k + j] is coefficient k of eighth j; scale[E - e_lo]. */
typedef struct { __m256 c0, c1, c2, c3, c4, scale, m, t, secant; __m256i e_lo; } poly_consts;

static inline __m256 poly_factor8(__m256 xv, const poly_consts *k) {
    const __m256 ax = _mm256_and_ps(xv, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    /* max/min return their second operand for a NaN first one: a NaN x computes at m and is zeroed
       below (both comparisons false), as in reste_factor. */
    const __m256 ac = _mm256_min_ps(_mm256_max_ps(ax, k->m), k->t);
    const __m256i bits = _mm256_castps_si256(ac);
    const __m256i j = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(7));
    const __m256 r = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0xFFFFF))),
                                     _mm256_set1_ps(0x1p-23f), _mm256_set1_ps(0.0625f));
    __m256 p = _mm256_permutevar8x32_ps(k->c4, j);
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c3, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c2, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c1, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c0, j));
    const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), k->e_lo);
    __m256 f = _mm256_mul_ps(p, _mm256_permutevar8x32_ps(k->scale, e));
    f = _mm256_and_ps(f, _mm256_cmp_ps(ax, k->t, _CMP_LE_OQ));
    return _mm256_blendv_ps(f, k->secant, _mm256_cmp_ps(ax, k->m, _CMP_LE_OQ));
}

static inline void poly_block8(const float *x, const float *grad, float *grad_out, float *sign_out,
                               const poly_consts *k) {
    const __m256 xv = _mm256_loadu_ps(x), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    _mm256_storeu_ps(grad_out, _mm256_mul_ps(_mm256_loadu_ps(grad), poly_factor8(xv, k)));
    if (sign_out)  /* sign_of: (x > 0) - (x < 0), 0 for +-0 and NaN */
        _mm256_storeu_ps(sign_out, _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_GT_OQ), one),
                                                 _mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_LT_OQ), one)));
}

/* reste_grad through poly_factor8. The last n % 8 elements go through the same block via copies, so
   every element gets the same arithmetic wherever it sits. */
void reste_grad_poly(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t n,
                     float m, float t, float secant, const float *coef, const float *scale, int e_lo,
                     int threads) {
    poly_consts k;
    float tx[8] = {0}, tg[8] = {0}, to[8], ts[8];
    int64_t nv = n / 8, rest = n % 8;
    k.c0 = _mm256_loadu_ps(coef);
    k.c1 = _mm256_loadu_ps(coef + 8);
    k.c2 = _mm256_loadu_ps(coef + 16);
    k.c3 = _mm256_loadu_ps(coef + 24);
    k.c4 = _mm256_loadu_ps(coef + 32);
    k.scale = _mm256_loadu_ps(scale);
    k.m = _mm256_set1_ps(m);
    k.t = _mm256_set1_ps(t);
    k.secant = _mm256_set1_ps(secant);
    k.e_lo = _mm256_set1_epi32(e_lo);
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel: threads > 1)
    for (int64_t v = 0; v < nv; v++)
        poly_block8(x + 8 * v, grad + 8 * v, grad_out + 8 * v, sign_out ? sign_out + 8 * v : 0, &k);
    if (rest) {
        memcpy(tx, x + 8 * nv, rest * 4);
        memcpy(tg, grad + 8 * nv, rest * 4);
        poly_block8(tx, tg, to, sign_out ? ts : 0, &k);
        memcpy(grad_out + 8 * nv, to, rest * 4);
        if (sign_out)
            memcpy(sign_out + 8 * nv, ts, rest * 4);
    }
}
#endif

/* The gradient of bw = est(w) * mean(|w|) with respect to w, in the order autograd would compute it:
   (grad * scale) * f(w) through est, plus sign(w) * (sum(grad * sign(w)) / n) through the scale. The
   sum is accumulated in double. grad_out may alias grad (the sum is complete before any write). */
void reste_weight_grad(const float *w, const float *grad, float *grad_out, int64_t n, const float *scale_ptr,
                       float m, float t, float secant, float inv_o, float power, int threads) {
    double acc = 0.0;
    float gs, scale = *scale_ptr;
    #pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+:acc) \
        if (parallel: threads > 1)
    for (int64_t i = 0; i < n; i++)
        acc += (double)(grad[i] * sign_of(w[i]));
    gs = (float)acc / (float)n;
    #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
    for (int64_t i = 0; i < n; i++) {
        float wv = w[i];
        float through_est = grad[i] * scale * reste_factor(wv, m, t, secant, inv_o, power);
        grad_out[i] = through_est + sign_of(wv) * gs;
    }
}
"""

# ln(2)^k / k!, the Taylor coefficients of 2^r, spelled out as float literals for the C source.
_TAYLOR = "".join(f"#define TAYLOR{k} {math.log(2) ** k / math.factorial(k):.17g}f\n" for k in range(1, 8))
_SOURCE = _TAYLOR + _SOURCE
# No -ffast-math: NaN, comparisons and rounding keep IEEE semantics; the two -fno flags only let the
# compiler assume no errno and no FP traps (unused here), which it needs to if-convert and vectorize.
# -ffp-contract=fast lets it fuse the polynomials' multiply-adds where the CPU has FMA (ISO -std=c99
# turns that off by default): 1.33 -> 1.07 ns per element on 2 x86_64 threads, and one rounding
# instead of two per step (max error vs float64 1.7e-7 -> 1.6e-7).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp",
          "-shared", "-fPIC", "-std=c99"]
_lock = threading.Lock()
_state = {"tried": False, "lib": None}


def _cache_dir() -> Path:
    root = os.environ.get("RESTE_TIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reste_timm")
    return Path(root) / "kernels"


def _cpu_features() -> str:
    """The CPU's feature flags: -march=native code built on one CPU may not run on another that shares
    the cache folder (a home directory on a cluster), so they are part of the library's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "reste_grad.c", Path(tmp) / target.name
        src.write_text(_SOURCE)
        subprocess.run([compiler, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, target)  # atomic: a concurrent process sees no half-written library


def _open() -> Optional[ctypes.CDLL]:
    """Builds (unless cached) and opens the library; None without a compiler or if the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        return None
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, compiler, platform.machine(),
                                    _cpu_features()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"reste_grad_{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.reste_grad
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 5 + [ctypes.c_int]
    if hasattr(lib, "reste_grad_poly"):  # built where the compiler targets AVX2 and FMA
        fn = lib.reste_grad_poly
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 3 + [ctypes.c_void_p] * 2
                       + [ctypes.c_int] * 2)
    fn = lib.reste_weight_grad
    fn.restype = None
    fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_float] * 5
                   + [ctypes.c_int])
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, building it on first use; None where that is not possible."""
    # "tried" is set only after "lib", so a True read without the lock sees the final library: the
    # backward asks for it twice per layer per step.
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            _state["lib"] = _open()
            _state["tried"] = True
        return _state["lib"]


def _float32_exponent(v: float) -> int:
    """The biased exponent field of ``v`` rounded to float32 (as ctypes passes it to C)."""
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 23 & 0xFF


def _poly_tables(params: Tuple[float, ...]) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """``(coef, scale, e_lo)`` for ``reste_grad_poly``, or None where ``[m, t]`` spans more than the
    8 binades its scale register holds (or m is subnormal): the generic loop takes those.

    On each eighth ``[1 + j/8, 1 + (j+1)/8)`` of the mantissa range, ``u^power`` is interpolated at the
    5 Chebyshev nodes in float64 (degree 4 in ``r = u - midpoint``, ``|r| <= 1/16``; truncation error,
    measured in float64: 4.4e-8 as power -> -1, 1.9e-8 at o = 3, 1.1e-8 at o = 2);
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


class _Plan:
    """The C calls for one ``(m, t, secant, 1/o, (1-o)/o)``, resolved once: library, float parameters
    and tables. A training step makes two calls per binary layer, in a backward where every
    Python-level lookup is slow (the convolutions have just used the caches): 8-9 ms of glue per
    ResNet-20 step at batch 128 before, measured around the C calls."""

    __slots__ = ("lib", "params", "tables")

    def __init__(self, lib: ctypes.CDLL, params: Tuple[float, ...]):
        self.lib, self.params = lib, params
        self.tables = _poly_tables(params) if hasattr(lib, "reste_grad_poly") else None

    def grad(self, x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
             sign: Optional[torch.Tensor]) -> None:
        """``out = grad * factor(x)`` and, unless None, ``sign = sign(x)``; see :func:`reste_grad`."""
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
        """``out`` = the gradient of ``est(w) * mean(|w|)`` for w; see :func:`reste_weight_grad`."""
        self.lib.reste_weight_grad(w.data_ptr(), grad.data_ptr(), out.data_ptr(), w.numel(), scale.data_ptr(),
                                   *self.params, torch.get_num_threads())


_plans: Dict[tuple, _Plan] = {}


def plan(params) -> Optional[_Plan]:
    """The calls for ``params``, or None where the library is unavailable or its powers do not cover
    the bounds (``m >= 2^-120`` and ``t <= 2^120``; the default 0.1 and 1.5 by far): the other
    kernels take those."""
    lib = load()
    if lib is None:
        return None
    key = tuple(params)
    found = _plans.get(key)
    if found is None or found.lib is not lib:
        floats = tuple(float(v) for v in key)
        if not (2.0 ** -120 <= floats[0] and floats[1] <= 2.0 ** 120):
            return None
        if len(_plans) >= 64:  # o is annealed: earlier exponents do not come back
            _plans.clear()
        found = _plans[key] = _Plan(lib, floats)
    return found


def reste_grad(x: torch.Tensor, grad: torch.Tensor, params, out: Optional[torch.Tensor] = None,
               with_sign: bool = False) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(grad * factor(x), sign(x) or None)``; None where :func:`plan` is None.

    Args:
        x, grad: float32 CPU tensors, dense and laid out alike (element i of each at the same offset:
            both contiguous, or both channels_last); the results are laid out as they are.
        params: ``(m, t, secant, 1/o, (1-o)/o)``, as the ReSTE kernels take them.
        out: Where to write the gradient (may be ``grad``); a new tensor when None.
        with_sign: Also return ``sign(x)``, from the same pass.
    """
    calls = plan(params)
    if calls is None:
        return None  # before any allocation: without a compiler this runs on every backward
    out = torch.empty_like(grad) if out is None else out
    sign = torch.empty_like(x) if with_sign else None
    calls.grad(x, grad, out, sign)
    return out, sign


def reste_weight_grad(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, params,
                      out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The gradient of ``est(w) * mean(|w|)`` for w; None where :func:`plan` is None.

    ``(grad * scale) * factor(w) + sign(w) * sum(grad * sign(w)) / w.numel()``: the estimator's
    path and the scale's path of :class:`reste_timm.layers.BinaryConv2d`'s binary weight, in one call
    (autograd takes about ten small ops for it, each of which costs more than the arithmetic).

    Args:
        w, grad: float32 CPU tensors laid out alike, as for :func:`reste_grad`.
        scale: ``mean(|w|)`` as the forward computed it, a 0-d float32 CPU tensor (read in C: a
            ``.item()`` would be one more op).
        params: ``(m, t, secant, 1/o, (1-o)/o)``, as the ReSTE kernels take them.
        out: Where to write the gradient (may be ``grad``); a new tensor when None.
    """
    calls = plan(params)
    if calls is None:
        return None
    out = torch.empty_like(grad) if out is None else out
    calls.weight_grad(w, grad, scale, out)
    return out
