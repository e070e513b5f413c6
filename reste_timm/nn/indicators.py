"""The paper's two indicators (docs/method.md, section 5) over the binary conv weights of a model.

Layers are found by type (:class:`~reste_timm.layers.BinaryConv2d`), so the FP stem, downsample
convs and classifier never count, whatever their names. Each indicator sums its per-layer terms on
the weights' device and synchronises once (one ``.item()``), so calling it every step stays cheap.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .estimators import reste_equivalent_forward
from .layers import binary_layers

__all__ = ["estimating_error", "gradient_stability"]


def _sum(terms: Iterable[torch.Tensor]) -> Optional[float]:
    """Sums 0-d tensors in float64 on the first one's device; None when there is none."""
    total = None
    for term in terms:
        term = term.double()
        total = term if total is None else total + term.to(total.device)
    return None if total is None else total.item()


@torch.no_grad()
def estimating_error(model: nn.Module, o: float) -> float:
    """Sum over binary layers of ``|| F_o(w) - sign(w) ||_2`` with ``F_o(w) = sign(w)|w|^(1/o)``.

    The reference evaluates it at ``o = o_end`` on the weights after the optimizer step. At ``o = 1``
    it is the distance of the weights from their signs.

    Args:
        model: Any module (wrapped or not); its :class:`BinaryConv2d` weights are measured.
        o: Exponent of the equivalent forward, a finite number ``>= 1``.

    Returns:
        The sum (0.0 for a model without binary layers).

    Raises:
        ValueError: ``o`` is not a finite number ``>= 1``.
    """
    if not (math.isfinite(o) and o >= 1.0):
        raise ValueError(f"exponent o must be a finite number >= 1, got {o!r}")
    terms = []
    for layer in binary_layers(model):
        w = layer.weight.detach().float()
        terms.append(torch.linalg.vector_norm(reste_equivalent_forward(w, o) - torch.sign(w)))
    total = _sum(terms)
    return 0.0 if total is None else total


@torch.no_grad()
def gradient_stability(model: nn.Module) -> Optional[float]:
    """Sum over binary layers of the variance of ``|grad w|`` (unbiased, ``torch.var``'s default).

    Returns None when no binary layer has a gradient yet.
    """
    return _sum(torch.var(layer.weight.grad.detach().float().abs())
                for layer in binary_layers(model) if layer.weight.grad is not None)
