"""Sign estimators: ``torch.sign`` forward, a surrogate gradient backward, each defined once here.

Every estimator binarizes with ``torch.sign`` (so ``sign(0) == 0``, as in the reference
implementation) and differs only in the factor its backward multiplies the incoming gradient by.
That factor is written once, in closed form with torch ops (:func:`reste_factor`,
:func:`ste_factor`, :func:`approxsign_factor`, :func:`ede_factor`); every faster implementation
(the C loops of :mod:`reste_timm.nn.kernels`) is tested against it. docs/method.md derives them.

The estimators run as registered torch ops, so that ``torch.compile`` and ``torch.export`` see them:
``reste_timm::sign`` (forward ``sign(x)``, gradient through ``reste_timm::sign_grad``). The exponent
``o`` and EDE's training ``progress`` reach the ops as a tensor (``hp = [o, progress, t, m]``), not as
Python numbers, so one compiled graph serves a whole annealing schedule. On CPU, ReSTE's float32 gradient
runs in C; everywhere else, and where no C compiler exists, the closed form itself runs.

Estimators are registered by name, like larq's quantizers: :func:`get_estimator` returns an
:class:`Estimator`, called as ``est(x, o=1.0, progress=0.0)``; :func:`register_estimator` adds one,
built-in kind or a plain function whose gradient autograd derives.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from . import kernels

__all__ = [
    "RESTE_INTERVAL", "RESTE_THRESHOLD", "Estimator", "approxsign_factor", "ede_factor", "ede_parameters",
    "get_estimator", "hyperparameters", "list_estimators", "native_allowed", "native_fits", "native_kernels",
    "native_plan", "register_estimator", "reste_equivalent_forward", "reste_factor",
    "reste_values", "sign_approx", "sign_ede", "sign_grad", "sign_grad_torch", "sign_reste", "sign_ste",
    "ste_factor",
]

RESTE_THRESHOLD = 1.5
RESTE_INTERVAL = 0.1
Number = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------- the closed forms

def reste_factor(x: torch.Tensor, o: Number, t: float = RESTE_THRESHOLD, m: float = RESTE_INTERVAL
                 ) -> torch.Tensor:
    """ReSTE's gradient factor (Wu et al., ICCV 2023), the definition every implementation follows.

        f(x) = m^(1/o) / m              if |x| <= m      (the secant of F_o over [0, m]; x = 0 included)
        f(x) = (1/o) |x|^((1-o)/o)      if m < |x| <= t  (the derivative of F_o(x) = sign(x)|x|^(1/o))
        f(x) = 0                        if |x| > t

    ``|x| == m`` takes the secant and ``|x| == t`` the power derivative, as in the reference. At
    ``o = 1`` this is an STE clipped at ``t``.

    Args:
        x: Input tensor.
        o: Exponent ``>= 1``, a float or a 0-d tensor (the layers pass a tensor).
        t: Threshold beyond which the gradient is cut.
        m: Half-width of the interval around 0 where the secant replaces the derivative.

    Returns:
        A tensor of x's shape and dtype.
    """
    ax = x.abs()
    inv_o = 1.0 / o
    secant = m ** inv_o / m
    # clamp_min keeps pow away from 0 (where it is inf); those entries take the secant anyway.
    power = ax.clamp_min(m).pow((1.0 - o) * inv_o) * inv_o
    return torch.where(ax <= m, secant, power).masked_fill(ax > t, 0.0)


def reste_equivalent_forward(x: torch.Tensor, o: Number) -> torch.Tensor:
    """ReSTE's equivalent forward ``F_o(x) = sign(x) * |x|^(1/o)`` (used by the indicators)."""
    return torch.sign(x) * x.abs().pow(1.0 / o)


def ste_factor(x: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """The clipped straight-through estimator's factor ``1[|x| <= bound]`` (BinaryConnect)."""
    return (x.abs() <= bound).to(x.dtype)


def approxsign_factor(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign's factor ``max(2 - 2|x|, 0)`` (Bi-Real Net, Liu et al., ECCV 2018)."""
    return torch.clamp_min(2.0 - 2.0 * x.abs(), 0.0)


def ede_parameters(progress: Number) -> Tuple[Number, Number]:
    """EDE's ``(k, t)`` at a training progress in [0, 1] (IR-Net, Qin et al., CVPR 2020).

    ``t = 0.1 * 10^(2 * progress)`` grows from 0.1 to 10, and ``k = max(1/t, 1)``.
    """
    if isinstance(progress, torch.Tensor):
        t = 0.1 * torch.pow(10.0, 2.0 * progress)
        return torch.clamp_min(1.0 / t, 1.0), t
    t = 0.1 * 10.0 ** (2.0 * float(progress))
    return max(1.0 / t, 1.0), t


def ede_factor(x: torch.Tensor, progress: Number) -> torch.Tensor:
    """EDE's factor ``k t (1 - tanh^2(t x))``, computed as ``k t / cosh^2(t x)``: the same function
    without the cancellation that loses every digit once ``tanh(t x)`` rounds to 1 (``cosh``
    overflows to inf there, giving the right limit 0)."""
    k, t = ede_parameters(progress)
    return (k * t) / torch.cosh(x * t).square()


def _factor(kind: str, x: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
    """The factor of a built-in estimator ``kind`` with ``hp = [o, progress, t, m]``."""
    if kind == "reste":
        return reste_factor(x, hp[0], hp[2], hp[3])
    if kind == "ste":
        return ste_factor(x)
    if kind == "approxsign":
        return approxsign_factor(x)
    if kind == "ede":
        return ede_factor(x, hp[1])
    raise ValueError(f"unknown estimator kind {kind!r}; built in: reste, ste, approxsign, ede")


# ------------------------------------------------------------------------------------------- the ops

_native = contextvars.ContextVar("reste_timm_native_kernels", default=True)


@contextlib.contextmanager
def native_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread or task only), the ops use their C kernels where they apply
    (``True``, the default) or only their torch implementation, the closed form (``False``)."""
    token = _native.set(bool(enabled))
    try:
        yield
    finally:
        _native.reset(token)


def native_allowed() -> bool:
    """Whether the ops may use their C kernels here: False inside ``native_kernels(False)``."""
    return _native.get()


def hyperparameters(o: Number = 1.0, progress: Number = 0.0, t: float = RESTE_THRESHOLD,
                    m: float = RESTE_INTERVAL, *, device=None) -> torch.Tensor:
    """The ``hp = [o, progress, t, m]`` tensor the ops take: ReSTE's exponent, EDE's training progress,
    ReSTE's threshold and interval (float64, so the exponent is not rounded)."""
    if isinstance(o, torch.Tensor) or isinstance(progress, torch.Tensor):
        values = (o, progress, t, m)
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return torch.tensor([float(o), float(progress), float(t), float(m)], dtype=torch.float64, device=device)


def dense_alike(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """True when x and grad are dense and laid out alike (both contiguous, or both channels_last):
    element i of one sits at the same memory offset as element i of the other, as C loops need."""
    if x.is_contiguous() and grad.is_contiguous():
        return True
    cl = torch.channels_last
    return x.dim() == 4 and x.is_contiguous(memory_format=cl) and grad.is_contiguous(memory_format=cl)


def reste_values(hp: torch.Tensor) -> Tuple[float, float, float]:
    """``(o, t, m)`` of an ``hp`` tensor, read straight from CPU memory when it is the layers' float64
    buffer (the backward reads them for every binary layer of every step; indexing costs more)."""
    if hp.device.type == "cpu" and hp.dtype == torch.float64 and hp.is_contiguous():
        o, _, t, m = (ctypes.c_double * 4).from_address(hp.data_ptr())
        return o, t, m
    o, _, t, m = hp.tolist()
    return o, t, m


def native_fits(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the C loops take this pair: float32 CPU tensors laid out alike."""
    return x.dtype == torch.float32 and grad.dtype == torch.float32 and dense_alike(x, grad)


def native_plan(kind: str, hp: torch.Tensor) -> Optional[kernels.Plan]:
    """The C calls of ReSTE's gradient at these hyperparameters, or None (another estimator, the C
    kernels unavailable or turned off by :func:`native_kernels`); callers check :func:`native_fits`."""
    if kind != "reste" or not native_allowed():
        return None
    return kernels.plan(*reste_values(hp))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # 16-bit factors are computed in float32 (CPU half math is slow and less accurate).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sign_grad_torch(x: torch.Tensor, grad: torch.Tensor, hp: torch.Tensor, kind: str) -> torch.Tensor:
    """``grad * factor(x)`` from the closed form: the ops' implementation wherever C does not apply."""
    return (grad * _factor(kind, _upcast(x), hp)).to(grad.dtype)


@torch.library.custom_op("reste_timm::sign_grad", mutates_args=())
def sign_grad(x: torch.Tensor, grad: torch.Tensor, hp: torch.Tensor, kind: str) -> torch.Tensor:
    """``grad * factor(x)`` of the built-in estimator ``kind`` (the closed form, any device)."""
    return sign_grad_torch(x, grad, hp, kind)


@sign_grad.register_kernel("cpu")
def _sign_grad_cpu(x, grad, hp, kind):
    calls = native_plan(kind, hp) if native_fits(x, grad) else None
    if calls is None:
        return sign_grad_torch(x, grad, hp, kind)
    out = torch.empty_like(grad)
    calls.grad(x, grad, out, None)
    return out


@sign_grad.register_fake
def _(x, grad, hp, kind):
    return torch.empty_like(grad)


@torch.library.custom_op("reste_timm::sign", mutates_args=())
def sign(x: torch.Tensor, hp: torch.Tensor, kind: str) -> torch.Tensor:
    """``sign(x)`` whose gradient is ``grad * factor(x)`` of the built-in estimator ``kind``."""
    return torch.sign(x)


@sign.register_fake
def _(x, hp, kind):
    return torch.empty_like(x)


def _sign_setup(ctx, inputs, output):
    x, hp, ctx.kind = inputs
    ctx.save_for_backward(x, hp)


def _sign_backward(ctx, grad):
    x, hp = ctx.saved_tensors
    return sign_grad(x, grad, hp, ctx.kind), None, None


sign.register_autograd(_sign_backward, setup_context=_sign_setup)


# -------------------------------------------------------------------------------------- the registry

class Estimator:
    """A registered sign estimator: ``est(x, o=1.0, progress=0.0)`` is ``sign(x)`` with its gradient.

    Built-in estimators (``kind`` in reste, ste, approxsign, ede) run as the ``reste_timm::sign`` op;
    :class:`~reste_timm.nn.BinaryConv2d` fuses them into its conv op. ``t`` and ``m`` are ReSTE's
    threshold and interval (the other kinds ignore them).
    """

    def __init__(self, name: str, kind: str, t: float = RESTE_THRESHOLD, m: float = RESTE_INTERVAL):
        if kind not in ("reste", "ste", "approxsign", "ede"):
            raise ValueError(f"unknown estimator kind {kind!r}; built in: reste, ste, approxsign, ede")
        if not 0.0 < m < t:
            raise ValueError(f"ReSTE needs 0 < m < t, got m={m}, t={t}")
        self.name, self.kind, self.t, self.m = name, kind, float(t), float(m)

    def factor(self, x: torch.Tensor, o: Number = 1.0, progress: Number = 0.0) -> torch.Tensor:
        """The closed form of this estimator's gradient factor at ``x``."""
        return _factor(self.kind, x, self.hyperparameters(o, progress, device=x.device))

    def hyperparameters(self, o: Number = 1.0, progress: Number = 0.0, *, device=None) -> torch.Tensor:
        """The ``hp`` tensor of this estimator at ``o`` and ``progress`` (its own ``t`` and ``m``)."""
        return hyperparameters(o, progress, self.t, self.m, device=device)

    def apply(self, x: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
        """``sign(x)`` with this estimator's gradient, ``hp = [o, progress, t, m]`` as a tensor."""
        return sign(x, hp, self.kind)

    def __call__(self, x: torch.Tensor, o: Number = 1.0, progress: Number = 0.0) -> torch.Tensor:
        return self.apply(x, self.hyperparameters(o, progress, device=x.device))

    def __repr__(self) -> str:
        return f"Estimator({self.name!r}, kind={self.kind!r}, t={self.t:g}, m={self.m:g})"


class FunctionEstimator(Estimator):
    """A user's estimator ``fn(x, o, progress)`` (``o``, ``progress``: 0-d tensors); autograd derives
    its gradient from the function itself, and binary layers run it as a plain composition."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor]):
        self.name, self.kind, self.fn = name, None, fn
        self.t, self.m = RESTE_THRESHOLD, RESTE_INTERVAL

    def factor(self, x, o=1.0, progress=0.0):
        raise NotImplementedError(f"estimator {self.name!r} is a function: autograd derives its gradient")

    def apply(self, x: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
        return self.fn(x, hp[0], hp[1])

    def __repr__(self) -> str:
        return f"FunctionEstimator({self.name!r}, {getattr(self.fn, '__name__', self.fn)!r})"


_ESTIMATORS: Dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable:
    """Registers an estimator under ``name`` (lower case); use as a decorator or call.

    ``register_estimator("reste_t2")(Estimator("reste_t2", "reste", t=2.0))`` adds a built-in kind with
    other parameters; ``@register_estimator("mine")`` on ``fn(x, o, progress)`` adds a function.
    """

    def _register(obj):
        key = name.lower()
        _ESTIMATORS[key] = obj if isinstance(obj, Estimator) else FunctionEstimator(key, obj)
        return obj

    return _register


for _name in ("reste", "ste", "approxsign", "ede"):
    register_estimator(_name)(Estimator(_name, _name))


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


def check_exponent(o: float) -> float:
    """``o`` as a float, or ValueError unless it is a finite number ``>= 1``."""
    if not (isinstance(o, (int, float)) and math.isfinite(o) and o >= 1.0):
        raise ValueError(f"exponent o must be a finite number >= 1, got {o!r}")
    return float(o)


# ------------------------------------------------------------------------------ the functional forms

def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator (BinaryConnect, clipped).

    Forward: ``sign(x)``. Backward: ``grad * 1[|x| <= 1]`` (:func:`ste_factor`).
    """
    return _ESTIMATORS["ste"](x)


def sign_reste(x: torch.Tensor, o: Number = 1.0, t: float = RESTE_THRESHOLD,
               m: float = RESTE_INTERVAL) -> torch.Tensor:
    """Rectified straight-through estimator (ReSTE, Wu et al., ICCV 2023).

    Forward: ``sign(x)``. Backward: ``grad * f(x)`` with the derivative of the equivalent forward
    ``F_o(x) = sign(x)|x|^(1/o)``, rectified (:func:`reste_factor`):

        f(x) = m^(1/o) / m                 if |x| <= m       (secant over [0, m]; x = 0 included)
        f(x) = (1/o) |x|^((1-o)/o)         if m < |x| <= t
        f(x) = 0                           if |x| > t

    At ``o = 1`` this is an STE clipped at ``t``. ``f`` is also the exact derivative of the continuous
    ``G(x) = x m^(1/o)/m`` (``|x| <= m``), ``sign(x)|x|^(1/o)`` (``m < |x| <= t``), ``sign(x) t^(1/o)``
    (beyond), so ``G(x) + (sign(x) - G(x)).detach()`` gives the same gradients, only slower.

    Args:
        x: Input tensor (any floating dtype, any device).
        o: Exponent, ``o >= 1`` (a float or a 0-d tensor); annealed from 1 to ``o_end`` in training.
        t: Gradient threshold (1.5 in the paper).
        m: Small interval around 0 (0.1 in the paper), ``0 < m < t``.

    Returns:
        ``torch.sign(x)``, with the gradient above.
    """
    if not isinstance(o, torch.Tensor):
        check_exponent(o)
    return Estimator("reste", "reste", t, m)(x, o)


def sign_approx(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign (Bi-Real Net, Liu et al., ECCV 2018).

    Forward: ``sign(x)``. Backward: ``grad * max(2 - 2|x|, 0)`` (:func:`approxsign_factor`).
    """
    return _ESTIMATORS["approxsign"](x)


def sign_ede(x: torch.Tensor, progress: Number = 0.0) -> torch.Tensor:
    """Error decay estimator (EDE, IR-Net, Qin et al., CVPR 2020).

    Forward: ``sign(x)``. Backward: ``grad * k t (1 - tanh^2(t x))`` with ``(k, t)`` from
    :func:`ede_parameters` at the current training ``progress`` (:func:`ede_factor`).
    """
    return _ESTIMATORS["ede"](x, 1.0, progress)
