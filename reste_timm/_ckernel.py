"""The ReSTE backward for float32 CPU tensors as a small C loop, compiled on first use.

Why not only ``torch.compile``: the inductor kernel of the same expression calls Sleef's ``exp2``
out of line and round-trips its bit casts through memory, so each element's ~45 dependent
operations run one vector at a time (about 11 cycles per element on one x86_64 core, against 2
for a plain multiply). Here the powers are inline (bit-level ``log2`` as in
:func:`reste_timm.estimators._log2_float32`, a degree-7 Taylor ``exp2`` on ``[-1/2, 1/2]`` and an
exponent-bit scaling), so the compiler vectorizes the loop and keeps several vectors in flight.
``benchmarks/run.py`` measures both. A second function gives a binary weight's whole gradient (through
the estimator and through ``mean(|w|)``) in one call, where autograd would run about ten small ops.

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
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["load", "reste_grad", "reste_weight_grad"]

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
   which _library_for checks. Two selects, written one after the other (a nested ?: with NaN-aware
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


def _library_for(params) -> Optional[Tuple[ctypes.CDLL, Tuple[float, ...]]]:
    """The library and the parameters as floats, or None where the library is unavailable or its
    powers do not cover the bounds (``m >= 2^-120`` and ``t <= 2^120``; the default 0.1 and 1.5 by
    far): the other kernels take those."""
    params = tuple(float(v) for v in params)
    m, t = params[0], params[1]
    if not (2.0 ** -120 <= m and t <= 2.0 ** 120):
        return None
    lib = load()
    return None if lib is None else (lib, params)


def reste_grad(x: torch.Tensor, grad: torch.Tensor, params, out: Optional[torch.Tensor] = None,
               with_sign: bool = False) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(grad * factor(x), sign(x) or None)``; None where the library is unavailable (or the bounds are
    outside ``[2^-120, 2^120]``).

    Args:
        x, grad: float32 CPU tensors, dense and laid out alike (element i of each at the same offset:
            both contiguous, or both channels_last); the results are laid out as they are.
        params: ``(m, t, secant, 1/o, (1-o)/o)``, as the ReSTE kernels take them.
        out: Where to write the gradient (may be ``grad``); a new tensor when None.
        with_sign: Also return ``sign(x)``, from the same pass.
    """
    found = _library_for(params)
    if found is None:
        return None  # before any allocation: without a compiler this runs on every backward
    lib, params = found
    out = torch.empty_like(grad) if out is None else out
    sign = torch.empty_like(x) if with_sign else None
    lib.reste_grad(x.data_ptr(), grad.data_ptr(), out.data_ptr(), None if sign is None else sign.data_ptr(),
                   x.numel(), *params, torch.get_num_threads())
    return out, sign


def reste_weight_grad(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, params,
                      out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The gradient of ``est(w) * mean(|w|)`` for w; None where the library is unavailable.

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
    found = _library_for(params)
    if found is None:
        return None
    lib, params = found
    out = torch.empty_like(grad) if out is None else out
    lib.reste_weight_grad(w.data_ptr(), grad.data_ptr(), out.data_ptr(), w.numel(), scale.data_ptr(), *params,
                          torch.get_num_threads())
    return out
