"""Binary convolution (spec section 2) and helpers that act on every binary layer of a model."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._backward import _dense_alike
from .estimators import _check_finite_exponent, _surrogate, get_estimator

__all__ = ["BinaryConv2d", "binary_layers", "set_exponent", "set_progress", "set_weight_cache"]


def _scale_of(w: torch.Tensor) -> torch.Tensor:
    """``mean(|w|)``, the one formula of the scale: the training nodes, :meth:`BinaryConv2d.binary_scale`
    and the packed export (which stores it) must agree bit for bit."""
    return w.abs().mean()


def _scaled_sign(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sign(w) * scale, scale)``, the forward of both training nodes."""
    scale = _scale_of(w)
    return torch.sign(w).mul_(scale), scale


class _SignConv2d(torch.autograd.Function):
    """``conv2d(sign(x), sign(w) * mean(|w|))`` with the estimators' gradients, as one autograd node.

    The plain composition saves both ``x`` (for the estimator) and ``sign(x)`` (for the conv's weight
    gradient); here ``sign(x)`` is recomputed in backward, which saves an activation-sized tensor per
    binary layer (a 1W/1A ResNet-20 step at batch 128 peaks at 204 MB instead of 296 MB, the
    full-precision model's 200 MB). The recomputation costs no extra pass: the backward first takes
    the conv's input gradient (which needs no ``sign(x)``), then one fused pass over ``x`` turns it into
    the estimator's gradient in place and yields ``sign(x)`` for the weight gradient.

    The binary weight is made inside the same node (not in a :class:`_ScaledSign` node of its own):
    a training step runs its Python glue, cold after the convs, once per layer instead of twice
    (measured on ResNet-20: 3 ms less per step at batch 8, where little else differs).
    """

    @staticmethod
    def forward(ctx, x, w, bias, conv_args, kernel, params):
        stride, padding, dilation, groups = conv_args
        bw, scale = _scaled_sign(w)
        ctx.save_for_backward(x, w, bw, scale)
        ctx.conv_args, ctx.kernel, ctx.params, ctx.has_bias = conv_args, kernel, params, bias is not None
        # The C loops, looked up here: the backward calls them directly (see _direct).
        ctx.calls = kernel.native_calls(x, params) if w.dtype == x.dtype else None
        return F.conv2d(torch.sign(x), bw, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w, bw, scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        stride, padding, dilation, groups = ctx.conv_args
        bias_sizes = [bw.shape[0]] if ctx.has_bias else None

        def conv_backward(inp, mask):
            return torch.ops.aten.convolution_backward(grad, inp, bw, bias_sizes, stride, padding, dilation,
                                                       False, [0, 0], groups, mask)

        grad_x = grad_w = grad_b = None
        if need_x:
            # The input gradient reads only x's shape: x stands in for sign(x).
            grad_in = conv_backward(x, [True, False, False])[0]
            if _direct(ctx.calls, x, grad_in):
                sign_x = torch.empty_like(x)
                ctx.calls.grad(x, grad_in, grad_in, sign_x)
                grad_x = grad_in
            else:
                grad_x, sign_x = ctx.kernel.grad_and_sign(x, grad_in, ctx.params)
        elif need_w or need_b:
            sign_x = torch.sign(x)
        if need_w or need_b:
            _, grad_bw, grad_b = conv_backward(sign_x, [False, need_w, need_b])
            if need_w and _direct(ctx.calls, w, grad_bw):
                ctx.calls.weight_grad(w, grad_bw, scale, grad_bw)
                grad_w = grad_bw
            elif need_w:
                grad_w = ctx.kernel.scaled_sign_grad(w, grad_bw, scale, ctx.params, inplace=True)
        return grad_x, grad_w, grad_b, None, None, None


def _direct(calls, x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether :class:`_SignConv2d`'s backward calls the C loop itself, skipping the kernel's dispatch.

    The kernel's methods would reach the same call, but through several Python frames whose lookups
    run cold after the convolutions: on ResNet-20 at batch 128 the step ratio to FP went from
    0.89-0.91 to 0.91 in 60-round runs. ``grad`` comes from the conv's backward, so it is float32
    like ``x``; its layout is checked here.
    """
    return calls is not None and _dense_alike(x, grad)


class _ScaledSign(torch.autograd.Function):
    """``sign(w) * mean(|w|)`` forward, the gradient of ``est(w) * mean(|w|)`` backward, as one node
    (the binary weight of 1W/32A layers; 1W/1A layers make it inside :class:`_SignConv2d`).

    Autograd runs about ten small ops for the composition's backward (through the estimator, the
    product, the mean and the abs); on a binary layer's weight each costs more than its arithmetic
    (tens of microseconds in a training step, where other layers' work has left the caches cold), so
    the kernel's :meth:`~reste_timm._backward._BackwardKernel.scaled_sign_grad` runs them together.
    """

    @staticmethod
    def forward(ctx, w, kernel, params):
        bw, scale = _scaled_sign(w)
        ctx.save_for_backward(w, scale)
        ctx.kernel, ctx.params = kernel, params
        return bw

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        return ctx.kernel.scaled_sign_grad(w, grad, scale, ctx.params), None, None


class BinaryConv2d(nn.Conv2d):
    """A conv whose weights (and, for 1W/1A, inputs) are binarized by a sign estimator.

    ``bw = est(w) * mean(|w|)`` with one scale per layer (the gradient flows through the scale too,
    as in the reference); ``ba = est(a)`` when ``binarize_input`` else ``a``; then an ordinary
    ``conv2d(ba, bw)``. Zero padding is applied after binarization, as in the reference.

    In training, a 1W/1A layer runs both signs and the conv as one autograd node that keeps ``a``
    (which the estimator needs) but not ``sign(a)`` (recomputed in backward), so it holds no more
    activation memory than a float conv; the estimator's backward is one fused pass and
    ``mean(|w|)`` is computed once per forward. A 1W/32A layer's ``bw`` is one node of its own
    (its backward one call). Every op keeps the input's
    memory format, so channels_last models stay channels_last. Estimators registered by users,
    autocast and non-zero padding modes take the plain ``conv(est(a), bw)`` composition (users'
    estimators also the plain ``est(w) * mean(|w|)``), with the same numbers.

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
        # Opt-in (see set_weight_cache): reuse bw across no-grad forwards while w is unchanged.
        self.cache_weight = False
        self._cached: Optional[Tuple[tuple, torch.Tensor]] = None

    def binary_scale(self) -> torch.Tensor:
        """The layer's scale ``mean(|w|)``, a 0-d tensor that carries its gradient ``sign(w) / N``."""
        return _scale_of(self.weight)

    def binary_weight(self) -> torch.Tensor:
        """The weight the conv sees: ``est(w) * mean(|w|)``."""
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            surrogate = _surrogate(self._estimate, self.exponent, self.progress)
            if surrogate is not None:  # a built-in estimator: one autograd node (see _ScaledSign)
                return _ScaledSign.apply(w, *surrogate)
        return self._estimate(w, self.exponent, self.progress) * self.binary_scale()

    def _inference_weight(self) -> torch.Tensor:
        # The key changes whenever w is replaced or modified in place through autograd-visible ops
        # (optimizer steps, load_state_dict, .to()); writes through ``.data`` bypass the version
        # counter, which is why the cache is opt-in.
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape, self.estimator)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.binary_weight())
        return self._cached[1]

    def _fused_path(self, x: torch.Tensor):
        """``(kernel, params)`` when the layer can run as one :class:`_SignConv2d` node, else None."""
        if not self.binarize_input or not torch.is_grad_enabled():
            return None
        if not (x.requires_grad or self.weight.requires_grad):
            return None
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4:
            return None  # F.pad before the conv, or padding resolved by F.conv2d: the plain path
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return None  # autocast casts inside F.conv2d; an outer compiler fuses the plain ops itself
        return _surrogate(self._estimate, self.exponent, self.progress)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_path(x)
        if fused is not None:
            self._cached = None  # training resumed: do not hold a stale copy of bw
            conv_args = (self.stride, self.padding, self.dilation, self.groups)
            return _SignConv2d.apply(x, self.weight, self.bias, conv_args, *fused)
        caching = getattr(self, "cache_weight", False) and not torch.is_grad_enabled()
        if caching and not torch.compiler.is_compiling():
            weight = self._inference_weight()
        else:
            self._cached = None
            weight = self.binary_weight()
        if not self.binarize_input:
            return self._conv_forward(x, weight, self.bias)
        return self._conv_forward(self._estimate(x, self.exponent, self.progress), weight, self.bias)

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
