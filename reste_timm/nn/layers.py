"""The binary convolution layer (method: docs/method.md) and helpers acting on every binary layer."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .binary_conv import binary_conv2d, conv_arguments
from .estimators import check_exponent, get_estimator

__all__ = ["BinaryConv2d", "binary_layers", "replace_binary_layers", "set_exponent", "set_progress",
           "set_weight_cache"]


class BinaryConv2d(nn.Conv2d):
    """A conv whose weights (and, for 1W/1A, inputs) are binarized by a sign estimator.

    ``bw = est(w) * mean(|w|)`` with one scale per layer (the gradient flows through the scale too,
    as in the reference); ``ba = est(a)`` when ``binarize_input`` else ``a``; then an ordinary
    ``conv2d(ba, bw)``. Zero padding is applied after binarization, as in the reference.

    Built-in estimators run as one registered op (:func:`reste_timm.nn.binary_conv.binary_conv2d`) that
    keeps ``a`` but not ``sign(a)``, so a 1W/1A layer holds no more activation memory than a float conv
    (on CPU, in float32, its forward counts sign matches on packed bits);
    estimators registered as functions run the plain ``conv(est(a), est(w) * mean(|w|))``. Every path
    keeps the input's memory format and follows autocast.

    The exponent ``o`` (ReSTE) and the training ``progress`` (EDE) live in a non-persistent float64
    buffer ``hparams = [o, progress, t, m]`` (``t``, ``m``: the estimator's threshold and interval): the
    state dict keeps the reference's keys, the values move with the layer to any device, and
    ``torch.compile`` sees a tensor, so annealing ``o`` never recompiles.
    :attr:`exponent` and :attr:`progress` read and write it as numbers.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        estimator: Registered estimator name (``"reste"``, ``"ste"``, ...).
        binarize_input: True for 1W/1A, False for 1W/32A.
        **kwargs: The rest of ``nn.Conv2d``'s arguments (stride, padding, bias, padding_mode, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, *,
                 estimator: str = "reste", binarize_input: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.estimator = str(estimator).lower()
        self._estimate = get_estimator(self.estimator)
        self.binarize_input = bool(binarize_input)
        self.register_buffer("hparams", self._estimate.hyperparameters(1.0, 0.0), persistent=False)
        # Opt-in (see set_weight_cache): reuse bw across no-grad forwards while w is unchanged.
        self.cache_weight = False
        self._cached: Optional[Tuple[tuple, torch.Tensor]] = None

    @property
    def exponent(self) -> float:
        """ReSTE's exponent ``o`` (a number ``>= 1``)."""
        return float(self.hparams[0])

    @exponent.setter
    def exponent(self, o: float) -> None:
        with torch.no_grad():
            self.hparams[0] = check_exponent(o)

    @property
    def progress(self) -> float:
        """The training progress in [0, 1] (EDE's schedule)."""
        return float(self.hparams[1])

    @progress.setter
    def progress(self, value: float) -> None:
        with torch.no_grad():
            self.hparams[1] = min(max(float(value), 0.0), 1.0)

    def _apply(self, fn, recurse=True):
        # .half() or .to(bfloat16) must not round the exponent: hparams stays float64 (float32 where
        # the device has no float64), whatever dtype the parameters take.
        hparams = self._buffers.pop("hparams")
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.weight.device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._buffers["hparams"] = hparams.to(device=device, dtype=dtype)
        return self

    def binary_scale(self) -> torch.Tensor:
        """The layer's scale ``mean(|w|)``, a 0-d tensor that carries its gradient ``sign(w) / N``."""
        return self.weight.abs().mean()

    def binary_weight(self) -> torch.Tensor:
        """The weight the conv sees: ``est(w) * mean(|w|)``, with the estimator's gradient."""
        return self._estimate.apply(self.weight, self.hparams) * self.binary_scale()

    def _inference_weight(self) -> torch.Tensor:
        # The key changes whenever w is replaced or modified in place through autograd-visible ops
        # (optimizer steps, load_state_dict, .to()); writes through ``.data`` bypass the version
        # counter, which is why the cache is opt-in.
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape, self.estimator)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.binary_weight())
        return self._cached[1]

    def _padded(self, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
        """``x`` padded ahead of the op where the op's plain zero padding cannot express it
        (``padding_mode``, ``padding="same"``). Zeros may come before the sign: ``sign(0) = 0``."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0, 0]
        if isinstance(self.padding, str):
            return F.pad(x, self._reversed_padding_repeated_twice), [0, 0]
        return x, list(self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        estimate = self._estimate
        if self.cache_weight and not torch.is_grad_enabled():
            weight = self._inference_weight()
        elif estimate.kind is None:  # an estimator written as a function: autograd's composition
            self._cached = None
            weight = self.binary_weight()
        else:
            self._cached = None
            if x.dim() == 3:  # an unbatched (C, H, W) input, as conv2d allows
                return self.forward(x.unsqueeze(0)).squeeze(0)
            x, padding = self._padded(x)
            device = x.device.type
            compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            conv = conv_arguments(self.stride, padding, self.dilation, self.groups, self.binarize_input)
            return binary_conv2d(x, self.weight, self.bias, self.hparams, conv, estimate.kind, compute)[0]
        if self.binarize_input:
            x = estimate.apply(x, self.hparams)
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, estimator={self.estimator}, "
                f"binarize_input={self.binarize_input}, o={self.exponent:.4g}")


def binary_layers(model: nn.Module) -> Iterator[BinaryConv2d]:
    """Every :class:`BinaryConv2d` of a model, found by type (not by parameter names)."""
    return (m for m in model.modules() if isinstance(m, BinaryConv2d))


def replace_binary_layers(model: nn.Module, make: Callable[[BinaryConv2d], nn.Module]) -> None:
    """Replaces, in place, every :class:`BinaryConv2d` child of ``model`` (at any depth) with
    ``make(layer)``; ``make`` may return the layer itself to keep it."""
    for name, child in model.named_children():
        if isinstance(child, BinaryConv2d):
            setattr(model, name, make(child))
        else:
            replace_binary_layers(child, make)


def set_exponent(model: nn.Module, o: float) -> int:
    """Sets the ReSTE exponent of every binary layer; returns how many layers were set."""
    o = check_exponent(o)
    count = 0
    for layer in binary_layers(model):
        layer.exponent = o
        count += 1
    return count


def set_progress(model: nn.Module, progress: float) -> int:
    """Sets the training progress in [0, 1] (EDE's schedule) of every binary layer."""
    count = 0
    for layer in binary_layers(model):
        layer.progress = progress
        count += 1
    return count


def set_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Lets every binary layer compute ``bw`` once and reuse it in no-grad forwards (inference).

    The cached ``bw`` costs one float copy of the binary weights and is dropped at the next forward
    with gradients. It is refreshed when the weight is replaced or changed by autograd-visible in-place
    ops (optimizer steps, ``load_state_dict``), but not after writes through ``weight.data``.

    Returns:
        How many layers were set.
    """
    count = 0
    for layer in binary_layers(model):
        layer.cache_weight = bool(enabled)
        layer._cached = None
        count += 1
    return count
