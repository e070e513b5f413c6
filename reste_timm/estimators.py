"""Sign estimators: ``torch.sign`` forward with a surrogate gradient.

Every estimator here binarizes with ``torch.sign`` (so ``sign(0) == 0``, as in the reference
implementation) and differs only in the factor its backward multiplies the incoming gradient by.
Each one is registered by name; :func:`get_estimator` returns a callable with the uniform signature
``fn(x, o=1.0, progress=0.0)`` that :class:`reste_timm.layers.BinaryConv2d` calls, so a layer never
needs to know which estimator it holds.

The backward passes are written as ``torch.autograd.Function`` s that save only the input and compute
the factor in one expression, instead of boolean-mask indexing (see ``benchmarks/`` for the measured
difference).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch

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
]

RESTE_THRESHOLD = 1.5
RESTE_INTERVAL = 0.1


def reste_backward_factor(x: torch.Tensor, o: float, t: float = RESTE_THRESHOLD,
                          m: float = RESTE_INTERVAL) -> torch.Tensor:
    """The ReSTE gradient factor d F_o / dx with the paper's rectifications.

    ``(1/o)|x|^((1-o)/o)`` for ``m < |x| <= t``, the secant slope ``m^(1/o)/m`` for ``|x| <= m``,
    and ``0`` for ``|x| > t``.

    Args:
        x: Input tensor.
        o: Exponent, ``o >= 1``.
        t: Threshold beyond which the gradient is cut.
        m: Half-width of the interval around 0 where the secant slope replaces the derivative.

    Returns:
        A tensor of x's shape and dtype.
    """
    ax = x.abs()
    if o == 1.0:
        # F_1 is the identity: the factor is the clipped STE mask, no power needed.
        return (ax <= t).to(x.dtype)
    secant = m ** (1.0 / o) / m
    # clamp_min keeps pow away from 0 (where it is inf); those entries take the secant anyway.
    power = ax.clamp_min(m).pow_((1.0 - o) / o).mul_(1.0 / o)
    power = torch.where(ax <= m, torch.full_like(power, secant), power)
    return power.masked_fill_(ax > t, 0.0)


def reste_equivalent_forward(x: torch.Tensor, o: float) -> torch.Tensor:
    """ReSTE's equivalent forward ``F_o(x) = sign(x) * |x|^(1/o)`` (used by the indicators)."""
    return torch.sign(x) * x.abs().pow(1.0 / o)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1.0).to(grad.dtype)


class _SignReSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o, t, m):
        ctx.save_for_backward(x)
        ctx.params = (o, t, m)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        factor = reste_backward_factor(x, *ctx.params)
        return grad * factor.to(grad.dtype), None, None, None


class _SignApprox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        factor = (2.0 - 2.0 * x.abs()).clamp_min_(0.0)
        return grad * factor.to(grad.dtype)


class _SignEDE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, t):
        ctx.save_for_backward(x)
        ctx.params = (k, t)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        k, t = ctx.params
        factor = torch.tanh(x * t).square_().neg_().add_(1.0).mul_(k * t)
        return grad * factor.to(grad.dtype), None, None


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator (BinaryConnect, clipped).

    Forward: ``sign(x)``. Backward: ``grad * 1[|x| <= 1]``.
    """
    return _SignSTE.apply(x)


def sign_reste(x: torch.Tensor, o: float = 1.0, t: float = RESTE_THRESHOLD,
               m: float = RESTE_INTERVAL) -> torch.Tensor:
    """Rectified straight-through estimator (ReSTE, Wu et al., ICCV 2023).

    Forward: ``sign(x)``. Backward: ``grad * f(x)`` with the derivative of the equivalent forward
    ``F_o(x) = sign(x)|x|^(1/o)``, rectified:

        f(x) = m^(1/o) / m                 if |x| <= m       (secant over [0, m]; x = 0 included)
        f(x) = (1/o) |x|^((1-o)/o)         if m < |x| <= t
        f(x) = 0                           if |x| > t

    At ``o = 1`` this is an STE clipped at ``t``.

    Args:
        x: Input tensor (any floating dtype, any device).
        o: Exponent, ``o >= 1``; annealed from 1 to ``o_end`` during training.
        t: Gradient threshold (1.5 in the paper).
        m: Small interval around 0 (0.1 in the paper).

    Returns:
        ``torch.sign(x)``, with the gradient above.
    """
    if o < 1.0:
        raise ValueError(f"ReSTE exponent o must be >= 1, got {o}")
    return _SignReSTE.apply(x, float(o), float(t), float(m))


def sign_approx(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign (Bi-Real Net, Liu et al., ECCV 2018).

    Forward: ``sign(x)``. Backward: ``grad * (2 - 2|x|)`` on ``[-1, 1]``, ``0`` elsewhere
    (``2 + 2x`` on ``[-1, 0)``, ``2 - 2x`` on ``[0, 1)``).
    """
    return _SignApprox.apply(x)


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
    k, t = ede_parameters(progress)
    return _SignEDE.apply(x, k, t)


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
