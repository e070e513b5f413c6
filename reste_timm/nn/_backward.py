"""The estimators' backward kernels: ``grad * factor(x)`` through a C loop, a compiled or an eager kernel.

Each estimator's factor is written twice in :mod:`reste_timm.estimators`: a "fused" form (one
expression over flat tensors, compiled by ``torch.compile`` into a single vectorized pass) and an
"eager" form (a few in-place passes, for any device, dtype and strides). ReSTE's float32 CPU backward
also has a C loop (:mod:`reste_timm._ckernel`). :class:`_BackwardKernel` picks the fastest that
applies, falling back down the chain; :func:`set_fused_backward` chooses which are allowed.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["FUSED_MIN_NUMEL", "set_fused_backward", "fused_backward_mode"]

_FUSED_MODES = ("auto", "compile", "always", "never")
_fused_mode = os.environ.get("RESTE_TIMM_FUSED_BACKWARD", "auto").lower()
if _fused_mode not in _FUSED_MODES:
    _fused_mode = "auto"
# Below this many elements the eager kernel wins: a compiled call costs ~100 us of guards and dispatch
# (measured crossover on a 2-thread CPU: between 37K and 131K elements).
FUSED_MIN_NUMEL = 1 << 16


def set_fused_backward(mode: str) -> None:
    """Chooses how the estimators' backward runs.

    Args:
        mode: ``"auto"`` (default; also env ``RESTE_TIMM_FUSED_BACKWARD``): on CPU, ReSTE's float32
            backward runs in a small C loop built on first use (:mod:`reste_timm._ckernel`, any size),
            the other cases in a ``torch.compile`` d fused kernel for tensors of at least
            ``FUSED_MIN_NUMEL`` elements, falling back to eager for good (with one warning) if
            compiling fails; ``"compile"``: the same without the C loop; ``"always"``: the C loop on
            CPU and compiled kernels on every device (CUDA needs Triton); ``"never"``: eager only.
            The numbers are the same up to float32 rounding.

    Raises:
        ValueError: unknown mode.
    """
    global _fused_mode
    mode = str(mode).lower()
    if mode not in _FUSED_MODES:
        raise ValueError(f"unknown fused backward mode {mode!r}; known: {', '.join(_FUSED_MODES)}")
    _fused_mode = mode


def fused_backward_mode() -> str:
    """The mode set by :func:`set_fused_backward` (``"never"`` after a failed compile in ``"auto"``)."""
    return _fused_mode


def _dense_alike(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """True when x and grad are dense and laid out alike (both contiguous, or both channels_last):
    element i of one sits at the same memory offset as element i of the other."""
    if x.is_contiguous() and grad.is_contiguous():
        return True
    cl = torch.channels_last
    return x.dim() == 4 and x.is_contiguous(memory_format=cl) and grad.is_contiguous(memory_format=cl)


def _flat_pair(x: torch.Tensor, grad: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, Callable]]:
    """1-D views of x and grad in memory order, and the map back to x's shape and layout.

    Only :func:`_dense_alike` tensors qualify; anything else returns None and takes the eager
    kernel, which handles any strides.
    """
    if not _dense_alike(x, grad):
        return None
    if x.is_contiguous():
        return x.view(-1), grad.view(-1), lambda out: out.view(x.shape)
    nhwc = x.permute(0, 2, 3, 1)
    return (nhwc.reshape(-1), grad.permute(0, 2, 3, 1).reshape(-1),
            lambda out: out.view(nhwc.shape).permute(0, 3, 1, 2))


class _BackwardKernel:
    """``grad * factor(x)`` through a native C loop, a fused (compiled) expression or its eager twin.

    Args:
        name: For messages.
        fused: ``fn(x_flat, grad_flat, params_tensor)``, pure torch ops, compiled on first use.
        eager: ``fn(x, grad, *params)`` with Python floats.
        accepts: ``fn(params) -> bool``, False for parameters the fused form does not cover.
        native: ``fn(params) -> calls or None`` (:func:`reste_timm._ckernel.plan`): C loops for float32
            CPU tensors laid out alike, ``calls.grad(x, grad, out, sign)`` and
            ``calls.weight_grad(w, grad, scale, out)``, tried before the compiled kernel; None where
            unavailable for these parameters.
    """

    def __init__(self, name: str, fused: Callable, eager: Callable,
                 accepts: Callable[[Sequence[float]], bool] = lambda params: True,
                 native: Optional[Callable] = None):
        self.name, self.fused, self.eager, self.accepts, self.native = name, fused, eager, accepts, native
        self._compiled: Optional[Callable] = None
        self._compiled_with_sign: Optional[Callable] = None
        # The last parameters as a tensor: o changes once per epoch (or step), the kernel runs once per
        # binary layer per step, so building a new tensor each call would be wasted work.
        self._param_cache: Tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)

    def _fused_applies(self, x: torch.Tensor, grad: torch.Tensor, params: Sequence[float]) -> bool:
        if _fused_mode == "never" or x.numel() < FUSED_MIN_NUMEL or x.dtype != grad.dtype:
            return False
        if not self.accepts(params):
            return False
        if _fused_mode in ("auto", "compile") and x.device.type != "cpu":
            return False
        # Inside an outer torch.compile the eager ops are traced and fused by the outer graph.
        return not torch.compiler.is_compiling()

    def _params(self, params: Sequence[float], device: torch.device) -> torch.Tensor:
        key = (tuple(params), device)
        if self._param_cache[0] != key:
            self._param_cache = (key, torch.tensor(params, dtype=torch.float64, device=device))
        return self._param_cache[1]

    def _fused_call(self, flat: tuple, grad: torch.Tensor, params: Sequence[float], with_sign: bool):
        global _fused_mode
        x_flat, grad_flat, restore = flat
        p = self._params(params, x_flat.device)
        try:
            if with_sign:
                if self._compiled_with_sign is None:
                    self._compiled_with_sign = torch.compile(_with_sign(self.fused), dynamic=True,
                                                             fullgraph=True)
                sign_flat = self._compiled_with_sign(x_flat, grad_flat, p)
                return grad, restore(sign_flat)
            if self._compiled is None:
                self._compiled = torch.compile(self.fused, dynamic=True, fullgraph=True)
            return restore(self._compiled(x_flat, grad_flat, p))
        except Exception as err:  # no C++ compiler, no Triton, unsupported platform...
            _fused_mode = "never"
            warnings.warn(f"reste_timm: fused {self.name} backward unavailable, using eager ops ({err!r})",
                          RuntimeWarning, stacklevel=2)
            return None

    def native_calls(self, x: torch.Tensor, params: Sequence[float]):
        """The C calls (:class:`reste_timm._ckernel._Plan`) for float32 CPU tensors like ``x`` and these
        parameters, or None; the callers check that the gradient is laid out like ``x``."""
        if (self.native is None or _fused_mode in ("never", "compile") or not x.is_cpu
                or x.dtype != torch.float32 or torch.compiler.is_compiling()):
            return None
        return self.native(params)

    def _native_calls(self, x: torch.Tensor, grad: torch.Tensor, params: Sequence[float]):
        if grad.dtype != x.dtype or not _dense_alike(x, grad):
            return None
        return self.native_calls(x, params)

    def _run(self, x: torch.Tensor, grad: torch.Tensor, params: Sequence[float], with_sign: bool):
        # Fastest first: the C loop, the compiled kernel, then eager ops, which always apply. The C
        # loop works on the tensors' memory as it is (no views: in a training step every extra op
        # costs tens of microseconds); the compiled kernel needs flat views.
        calls = self._native_calls(x, grad, params)
        if calls is not None:
            sign = torch.empty_like(x) if with_sign else None
            out = grad if with_sign else torch.empty_like(grad)
            calls.grad(x, grad, out, sign)
            return (out, sign) if with_sign else out
        out = None
        if self._fused_applies(x, grad, params):
            flat = _flat_pair(x, grad)
            out = None if flat is None else self._fused_call(flat, grad, params, with_sign)
        if out is None:
            out = self.eager(x, grad, *params)
            out = (out, torch.sign(x)) if with_sign else out
        return out

    def __call__(self, x: torch.Tensor, grad: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
        return self._run(x, grad, params, with_sign=False)

    def grad_and_sign(self, x: torch.Tensor, grad: torch.Tensor,
                      params: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(grad * factor(x), sign(x))``, in one pass over ``x`` on the fused paths.

        The fused paths write the first result into ``grad``, so the caller must own ``grad`` (a
        fresh buffer nobody else reads). :class:`BinaryConv2d` uses it between the two halves of its
        conv backward: the input gradient needs no ``sign(x)``, the weight gradient does, so one pass
        over ``x`` serves both instead of two.
        """
        return self._run(x, grad, params, with_sign=True)

    def scaled_sign_grad(self, w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                         params: Sequence[float], inplace: bool = False) -> torch.Tensor:
        """The gradient for ``w`` of ``est(w) * scale`` with ``scale = mean(|w|)``, both paths.

        ``kernel(w, grad * scale) + sign(w) * sum(grad * sign(w)) / w.numel()``: the same ops, in
        the same order, as autograd runs for the composition (bit for bit on the torch path); the C
        loop, where it applies, runs them in one call and sums in double, writing into ``grad`` when
        ``inplace`` (the caller owns ``grad``: one allocation less).
        """
        calls = self._native_calls(w, grad, params)
        if calls is not None:
            out = grad if inplace else torch.empty_like(grad)
            calls.weight_grad(w, grad, scale, out)
            return out
        sign_w = torch.sign(w)
        through_scale = sign_w * ((grad * sign_w).sum() / w.numel())
        return self(w, grad * scale, params) + through_scale


def _with_sign(fused: Callable) -> Callable:
    """The fused kernel that also returns ``sign(x)`` and writes its result into ``grad``."""

    def fused_with_sign(x, grad, p):
        # The copy into the input is re-inplaced by inductor: one loop reads x and grad once and
        # writes grad and sign(x).
        grad.copy_(fused(x, grad, p))
        return torch.sign(x)

    return fused_with_sign
