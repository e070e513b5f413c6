"""The paper's two indicators (RESTE_SPEC.md, section 5) over the binary conv weights of a model.

Layers are found by type (:class:`~reste_timm.layers.BinaryConv2d`), so the FP stem, downsample
convs and classifier never count, whatever their names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .estimators import reste_equivalent_forward
from .layers import binary_layers

__all__ = ["estimating_error", "gradient_stability"]


@torch.no_grad()
def estimating_error(model: nn.Module, o: float) -> float:
    """Sum over binary layers of ``|| F_o(w) - sign(w) ||_2`` with ``F_o(w) = sign(w)|w|^(1/o)``.

    The reference evaluates it at ``o = o_end`` on the weights after the optimizer step. At ``o = 1``
    it is the distance of the weights from their signs.
    """
    total = 0.0
    for layer in binary_layers(model):
        w = layer.weight.detach().float()
        total += torch.linalg.vector_norm(reste_equivalent_forward(w, o) - torch.sign(w)).item()
    return total


@torch.no_grad()
def gradient_stability(model: nn.Module) -> Optional[float]:
    """Sum over binary layers of the variance of ``|grad w|`` (unbiased, ``torch.var``'s default).

    Returns None when no binary layer has a gradient yet.
    """
    total, found = 0.0, False
    for layer in binary_layers(model):
        if layer.weight.grad is not None:
            total += torch.var(layer.weight.grad.detach().float().abs()).item()
            found = True
    return total if found else None
