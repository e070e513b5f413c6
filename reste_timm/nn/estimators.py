"""Sign estimators: ``torch.sign`` forward with a surrogate gradient.

Every estimator here binarizes with ``torch.sign`` (so ``sign(0) == 0``, as in the reference
implementation) and differs only in the factor its backward multiplies the incoming gradient by.
Each one is registered by name; :func:`get_estimator` returns a callable with the uniform signature
``fn(x, o=1.0, progress=0.0)`` that :class:`reste_timm.layers.BinaryConv2d` calls, so a layer never
needs to know which estimator it holds.

The backward passes are ``torch.autograd.Function`` s that save only the input and compute
``grad * factor(x)`` in one expression: on CPU a single fused pass through a ``torch.compile`` d kernel
(compiled once per dtype, the first backward pays its few seconds), elsewhere, for small tensors or
when compiling is unavailable a few in-place eager passes. The reference implementation's boolean-mask
indexing is much slower (``benchmarks/run.py`` measures both); :func:`set_fused_backward` chooses.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _ckernel
from ._backward import _BackwardKernel, fused_backward_mode, set_fused_backward

__all__ = [
    "sign_ste",
    "sign_reste",
    "sign_approx",
    "sign_ede",
    "reste_backward_factor",
    "reste_equivalent_forward",
    "ede_parameters",
    "get_estimator",
    "list_estimators",
    "register_estimator",
    "set_fused_backward",
    "fused_backward_mode",
]

RESTE_THRESHOLD = 1.5
RESTE_INTERVAL = 0.1


def reste_backward_factor(x: torch.Tensor, o: float, t: float = RESTE_THRESHOLD,
                          m: float = RESTE_INTERVAL) -> torch.Tensor:
    """The ReSTE gradient factor, in closed form (the reference the fast kernels are tested against).

    ``(1/o)|x|^((1-o)/o)`` for ``m < |x| <= t``, the secant slope ``m^(1/o)/m`` for ``|x| <= m``,
    and ``0`` for ``|x| > t``; ``|x| == m`` takes the secant and ``|x| == t`` the power derivative.

    Args:
        x: Input tensor.
        o: Exponent, ``o >= 1``.
        t: Threshold beyond which the gradient is cut.
        m: Half-width of the interval around 0 where the secant slope replaces the derivative.

    Returns:
        A tensor of x's shape and dtype.
    """
    ax = x.abs()
    secant = m ** (1.0 / o) / m
    # clamp_min keeps pow away from 0 (where it is inf); those entries take the secant anyway.
    power = ax.clamp_min(m).pow((1.0 - o) / o) / o
    factor = torch.where(ax <= m, torch.full_like(power, secant), power)
    return factor.masked_fill(ax > t, 0.0)


def reste_equivalent_forward(x: torch.Tensor, o: float) -> torch.Tensor:
    """ReSTE's equivalent forward ``F_o(x) = sign(x) * |x|^(1/o)`` (used by the indicators)."""
    return torch.sign(x) * x.abs().pow(1.0 / o)


# ---------------------------------------------------------------------------------------------------
# Backward kernels: grad * factor(x), each written twice. The "fused" form is one expression over flat
# tensors with its parameters in a tensor, so torch.compile turns it into a single vectorized pass and
# a new exponent o (annealed every epoch or step) never triggers a recompile. The "eager" form works
# in place on a few temporaries; it runs where compiling is off or unavailable, on small tensors (where
# a compiled call's overhead outweighs the saved passes) and on other devices unless "always" is set.
# |x|^p is computed as exp2(p * log2|x|), ~3x cheaper on CPU than pow with a general exponent; the fused
# kernel also replaces log2 by a bit-level float32 version (_log2_float32). Both stay within a few
# float32 ulps of the closed form (tests/test_estimators.py checks it).
# ---------------------------------------------------------------------------------------------------

def _upcast(x: torch.Tensor) -> torch.Tensor:
    # float16/bfloat16 factors are computed in float32 (CPU half math is slow and less accurate).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_LOG2_E = 1.4426950408889634
_TWO_THIRDS_BITS = 0x3F2AAAAB  # float32 bits of 2/3


def _log2_float32(y):
    """log2 of positive, normal float32 values, from the exponent bits and a short series.

    ``y = 2^e * u`` with ``u`` in ``[2/3, 4/3)`` (subtracting the bits of 2/3 before splitting moves
    the mantissa range there without a comparison); ``ln(u) = 2 atanh(s)``, ``s = (u-1)/(u+1)``,
    ``|s| <= 0.2``: the series up to ``s^9`` leaves a truncation error below 4e-9, under float32
    rounding. Inside the compiled kernel this is ~1.6x faster than the library log2 it replaces, which
    was most of the ReSTE backward's time on CPU.
    """
    bits = y.view(torch.int32) - _TWO_THIRDS_BITS
    exponent = bits >> 23  # arithmetic shift: floor, also for the negative values of y < 2/3
    u = ((bits & 0x7FFFFF) + _TWO_THIRDS_BITS).view(torch.float32)
    s = (u - 1.0) / (u + 1.0)
    s2 = s * s
    series = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))))
    return exponent.to(torch.float32) + (2.0 * _LOG2_E) * s * series


def _reste_fused(x, grad, p):
    # p = (m, t, secant, 1/o, (1-o)/o); m is a normal float32 (see _RESTE_KERNEL), so is y below.
    wide = x.dtype == torch.float64
    ax = (x if wide else x.float()).abs()
    y = torch.maximum(ax, p[0])
    power = torch.exp2((torch.log2(y) if wide else _log2_float32(y)) * p[4]) * p[3]
    factor = torch.where(ax <= p[0], p[2], torch.where(ax <= p[1], power, 0.0))
    return (grad * factor).to(grad.dtype)


def _reste_eager(x, grad, m, t, secant, inv_o, power):
    ax = _upcast(x).abs()
    f = ax.clamp_min(m).log2_().mul_(power).exp2_().mul_(inv_o)
    f.masked_fill_(ax <= m, secant).masked_fill_(ax > t, 0.0)
    return f.mul_(grad).to(grad.dtype)


def _ste_fused(x, grad, p):
    return torch.where(x.abs() <= p[0], grad, 0.0)


def _ste_eager(x, grad, bound):
    return torch.where(x.abs() <= bound, grad, 0.0)


def _approx_fused(x, grad, p):
    return grad * torch.clamp_min(2.0 - 2.0 * x.abs(), 0.0)


def _approx_eager(x, grad):
    f = _upcast(x).abs().mul_(-2.0).add_(2.0).clamp_min_(0.0)
    return f.mul_(grad).to(grad.dtype)


# 1 - tanh^2(u) is computed as 1 / cosh^2(u): the same function without the cancellation that loses
# all digits of float32 once tanh(u) rounds to 1 (cosh overflows to inf, giving the right limit 0).
def _ede_fused(x, grad, p):
    # p = (k t, t)
    return grad * (p[0] / torch.cosh(x * p[1]).square())


def _ede_eager(x, grad, kt, t):
    f = torch.cosh(_upcast(x) * t).square_().reciprocal_().mul_(kt)
    return f.mul_(grad).to(grad.dtype)


# The bit-level log2 needs |x| clamped at a normal float32: m >= 2^-126.
_RESTE_KERNEL = _BackwardKernel("ReSTE", _reste_fused, _reste_eager,
                                accepts=lambda p: p[0] >= torch.finfo(torch.float32).tiny,
                                native=_ckernel.plan)
_STE_KERNEL = _BackwardKernel("STE", _ste_fused, _ste_eager)
_APPROX_KERNEL = _BackwardKernel("ApproxSign", _approx_fused, _approx_eager)
_EDE_KERNEL = _BackwardKernel("EDE", _ede_fused, _ede_eager)


class _SignSurrogate(torch.autograd.Function):
    """``sign(x)`` forward; backward ``grad * factor(x)`` from a :class:`BackwardKernel`."""

    @staticmethod
    def forward(ctx, x, kernel, params):
        ctx.save_for_backward(x)
        ctx.kernel, ctx.params = kernel, params
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.kernel(x, grad, ctx.params), None, None


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator (BinaryConnect, clipped).

    Forward: ``sign(x)``. Backward: ``grad * 1[|x| <= 1]``.
    """
    return _SignSurrogate.apply(x, _STE_KERNEL, (1.0,))


def sign_reste(x: torch.Tensor, o: float = 1.0, t: float = RESTE_THRESHOLD,
               m: float = RESTE_INTERVAL) -> torch.Tensor:
    """Rectified straight-through estimator (ReSTE, Wu et al., ICCV 2023).

    Forward: ``sign(x)``. Backward: ``grad * f(x)`` with the derivative of the equivalent forward
    ``F_o(x) = sign(x)|x|^(1/o)``, rectified:

        f(x) = m^(1/o) / m                 if |x| <= m       (secant over [0, m]; x = 0 included)
        f(x) = (1/o) |x|^((1-o)/o)         if m < |x| <= t
        f(x) = 0                           if |x| > t

    At ``o = 1`` this is an STE clipped at ``t``. ``f`` is also the exact derivative of the continuous
    ``G(x) = x m^(1/o)/m`` (``|x| <= m``), ``sign(x)|x|^(1/o)`` (``m < |x| <= t``), ``sign(x) t^(1/o)``
    (beyond), so ``G(x) + (sign(x) - G(x)).detach()`` gives the same gradients, only slower.
    ``|x|`` is compared with ``m`` and ``t`` rounded to the compute dtype (x's, float32 for 16-bit
    inputs), as ``x <= m`` with a Python float does.

    Args:
        x: Input tensor (any floating dtype, any device).
        o: Exponent, ``o >= 1``; annealed from 1 to ``o_end`` during training.
        t: Gradient threshold (1.5 in the paper).
        m: Small interval around 0 (0.1 in the paper), ``0 < m < t``.

    Returns:
        ``torch.sign(x)``, with the gradient above.
    """
    return _SignSurrogate.apply(x, *_reste_surrogate(o, t, m))


def _reste_surrogate(o: float, t: float = RESTE_THRESHOLD, m: float = RESTE_INTERVAL):
    if not o >= 1.0:
        raise ValueError(f"ReSTE exponent o must be >= 1, got {o}")
    if not 0.0 < m < t:
        raise ValueError(f"ReSTE needs 0 < m < t, got m={m}, t={t}")
    o, t, m = float(o), float(t), float(m)
    if o == 1.0:  # the factor is exactly 1[|x| <= t] (secant and derivative are both 1): no powers
        return _STE_KERNEL, (t,)
    # Kernel parameters: the bounds, the secant slope, 1/o and the power (1-o)/o of |x|.
    return _RESTE_KERNEL, (m, t, m ** (1.0 / o) / m, 1.0 / o, (1.0 - o) / o)


def sign_approx(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign (Bi-Real Net, Liu et al., ECCV 2018).

    Forward: ``sign(x)``. Backward: ``grad * (2 - 2|x|)`` on ``[-1, 1]``, ``0`` elsewhere
    (``2 + 2x`` on ``[-1, 0)``, ``2 - 2x`` on ``[0, 1)``).
    """
    return _SignSurrogate.apply(x, _APPROX_KERNEL, ())


def ede_parameters(progress: float) -> tuple:
    """EDE's ``(k, t)`` at a training progress in [0, 1] (IR-Net, Qin et al., CVPR 2020).

    ``t = 0.1 * 10^(2 * progress)`` grows from 0.1 to 10, and ``k = max(1/t, 1)``.
    """
    t = 0.1 * 10.0 ** (2.0 * float(progress))
    return max(1.0 / t, 1.0), t


def sign_ede(x: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
    """Error decay estimator (EDE, IR-Net, Qin et al., CVPR 2020).

    Forward: ``sign(x)``. Backward: ``grad * k t (1 - tanh^2(t x))`` with ``(k, t)`` from
    :func:`ede_parameters` at the current training ``progress``.
    """
    return _SignSurrogate.apply(x, *_ede_surrogate(progress))


def _ede_surrogate(progress: float):
    k, t = ede_parameters(progress)
    return _EDE_KERNEL, (k * t, t)


Estimator = Callable[..., torch.Tensor]
_ESTIMATORS: Dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Registers ``fn(x, o, progress)`` under ``name`` (lower case)."""

    def _register(fn: Estimator) -> Estimator:
        _ESTIMATORS[name.lower()] = fn
        return fn

    return _register


@register_estimator("ste")
def _ste(x, o=1.0, progress=0.0):
    return sign_ste(x)


@register_estimator("reste")
def _reste(x, o=1.0, progress=0.0):
    return sign_reste(x, o)


@register_estimator("approxsign")
def _approx(x, o=1.0, progress=0.0):
    return sign_approx(x)


@register_estimator("ede")
def _ede(x, o=1.0, progress=0.0):
    return sign_ede(x, progress)


# The built-in entries also expose their backward as (kernel, params), so that BinaryConv2d can fuse
# sign and conv in one autograd node that keeps x instead of sign(x). Estimators registered by users
# lack it and take the generic path.
_ste.surrogate = lambda o, progress: (_STE_KERNEL, (1.0,))
_reste.surrogate = lambda o, progress: _reste_surrogate(o)
_approx.surrogate = lambda o, progress: (_APPROX_KERNEL, ())
_ede.surrogate = lambda o, progress: _ede_surrogate(progress)


def _surrogate(fn: Estimator, o: float, progress: float) -> Optional[Tuple[_BackwardKernel, tuple]]:
    """``(kernel, params)`` of a registered estimator's backward, or None for a custom estimator."""
    make = getattr(fn, "surrogate", None)
    return None if make is None else make(o, progress)


def list_estimators() -> list:
    """Names of the registered estimators, sorted."""
    return sorted(_ESTIMATORS)


def get_estimator(name: str) -> Estimator:
    """Looks an estimator up by name (case-insensitive).

    Raises:
        ValueError: the name is not registered; the message lists the known names.
    """
    key = str(name).lower()
    if key not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(list_estimators())}")
    return _ESTIMATORS[key]


def _check_finite_exponent(o: float) -> float:
    if not math.isfinite(o) or o < 1.0:
        raise ValueError(f"exponent o must be a finite number >= 1, got {o}")
    return float(o)
