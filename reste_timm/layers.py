"""Binary convolution (spec section 2) and helpers that act on every binary layer of a model."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from .estimators import _check_finite_exponent, get_estimator

__all__ = ["BinaryConv2d", "binary_layers", "set_exponent", "set_progress"]


class BinaryConv2d(nn.Conv2d):
    """A conv whose weights (and, for 1W/1A, inputs) are binarized by a sign estimator.

    ``bw = est(w) * mean(|w|)`` with one scale per layer (the gradient flows through the scale too,
    as in the reference); ``ba = est(a)`` when ``binarize_input`` else ``a``; then an ordinary
    ``conv2d(ba, bw)``. Zero padding is applied after binarization, as in the reference.

    The exponent ``o`` (ReSTE) and the training ``progress`` (EDE) are plain attributes, not buffers,
    so the state dict keeps the reference's keys; the annealing hook sets them every epoch and holds
    them in its own state for checkpoints.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        estimator: Registered estimator name (``"reste"``, ``"ste"``, ...).
        binarize_input: True for 1W/1A, False for 1W/32A.
        **kwargs: The rest of ``nn.Conv2d``'s arguments (stride, padding, bias, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, *,
                 estimator: str = "reste", binarize_input: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.estimator = str(estimator).lower()
        self._estimate = get_estimator(self.estimator)
        self.binarize_input = bool(binarize_input)
        self.exponent = 1.0
        self.progress = 0.0

    def binary_weight(self) -> torch.Tensor:
        """The weight the conv sees: ``est(w) * mean(|w|)``."""
        w = self.weight
        return self._estimate(w, self.exponent, self.progress) * w.abs().mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binarize_input:
            x = self._estimate(x, self.exponent, self.progress)
        return self._conv_forward(x, self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, estimator={self.estimator}, "
                f"binarize_input={self.binarize_input}, o={self.exponent:.4g}")


def binary_layers(model: nn.Module) -> Iterator[BinaryConv2d]:
    """Every :class:`BinaryConv2d` of a model, found by type (not by parameter names)."""
    return (m for m in model.modules() if isinstance(m, BinaryConv2d))


def set_exponent(model: nn.Module, o: float) -> int:
    """Sets the ReSTE exponent of every binary layer; returns how many layers were set."""
    o = _check_finite_exponent(o)
    count = 0
    for layer in binary_layers(model):
        layer.exponent = o
        count += 1
    return count


def set_progress(model: nn.Module, progress: float) -> int:
    """Sets the training progress in [0, 1] (EDE's schedule) of every binary layer."""
    progress = min(max(float(progress), 0.0), 1.0)
    count = 0
    for layer in binary_layers(model):
        layer.progress = progress
        count += 1
    return count
