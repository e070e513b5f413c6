"""The ReSTE estimator written like the reference implementation: boolean-mask indexing in backward.

Used only as the speed baseline of ``benchmarks/run.py``; its gradients equal
:func:`reste_timm.estimators.sign_reste` 's (``|x| == m`` takes the secant, ``|x| == t`` the power
derivative, ``|x| > t`` gets 0). Each masked read and write gathers or scatters through an index list,
which is what makes it slow.
"""

from __future__ import annotations

import torch


def _power_root(x: float, o: float) -> float:
    # The reference's approximate_function: sign(x) |x|^(1/o) on a Python float.
    return x ** (1.0 / o) if x >= 0 else -((-x) ** (1.0 / o))


class MaskedReSTE(torch.autograd.Function):
    """``sign(x)`` forward; backward fills the ReSTE factor region by region through boolean masks."""

    @staticmethod
    def forward(ctx, x, o, t, m):
        ctx.save_for_backward(x)
        ctx.params = (o, t, m)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        o, t, m = ctx.params
        factor = torch.zeros_like(x)
        pos = (x <= t) & (x > m)
        factor[pos] = (1.0 / o) * torch.pow(x[pos], (1.0 - o) / o)
        neg = (x >= -t) & (x < -m)
        factor[neg] = (1.0 / o) * torch.pow(-x[neg], (1.0 - o) / o)
        factor[(x <= m) & (x >= 0)] = _power_root(m, o) / m
        factor[(x <= 0) & (x >= -m)] = -_power_root(-m, o) / m
        return factor * grad.clone(), None, None, None


def masked_sign_reste(x: torch.Tensor, o: float = 1.0, t: float = 1.5, m: float = 0.1) -> torch.Tensor:
    """ReSTE with the reference's masked-indexing backward (slow; for comparisons only)."""
    return MaskedReSTE.apply(x, float(o), float(t), float(m))
