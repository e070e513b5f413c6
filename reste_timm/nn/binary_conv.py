"""The binary convolution as one registered op, ``reste_timm::binary_conv2d`` (method: docs/method.md).

    out = conv2d(est(x) if binarize_input else x, est(w) * mean(|w|), bias)

The plain composition would keep both ``x`` (for the estimator) and ``sign(x)`` (for the conv's
weight gradient); the op keeps only ``x``, so a 1W/1A layer holds no more activation memory than a
float conv. Its backward takes the conv's input gradient first (which needs no ``sign(x)``), then one
pass over ``x`` turns it into the estimator's gradient and yields ``sign(x)`` for the weight gradient
(``reste_timm::sign_grad_and_sign``), and the binary weight's gradient, through the estimator and
through ``mean(|w|)``, is one more op (``reste_timm::scaled_sign_grad``). As registered ops with fake
implementations, ``torch.compile`` and ``torch.export`` trace them, and the exponent is the tensor
``hp``: a new ``o`` never recompiles.

Under autocast the op computes the binary weight and the signs in the parameters' dtype and casts
them for the conv to ``compute_dtype``, as autocast would cast ``conv2d``'s inputs.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .estimators import native_plan, sign_grad_and_sign, sign_grad_torch

__all__ = ["binary_conv2d", "scaled_sign_grad"]


def _scaled_signsign_grad_torch(w, grad, scale, hp, kind, t, m):
    # The ops autograd runs for est(w) * mean(|w|), in its order: through the estimator, then the mean.
    sign_w = torch.sign(w)
    through_scale = sign_w * ((grad * sign_w).sum() / w.numel())
    return sign_grad_torch(w, grad * scale, hp, kind, t, m) + through_scale


@torch.library.custom_op("reste_timm::scaled_sign_grad", mutates_args=())
def scaled_sign_grad(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, hp: torch.Tensor, kind: str,
                     t: float, m: float) -> torch.Tensor:
    """The gradient for ``w`` of ``est(w) * mean(|w|)``: ``f(w) grad scale + sign(w) sum(grad sign(w))/N``."""
    return _scaled_signsign_grad_torch(w, grad, scale, hp, kind, t, m)


@scaled_sign_grad.register_kernel("cpu")
def _scaled_sign_grad_cpu(w, grad, scale, hp, kind, t, m):
    calls = native_plan(kind, w, grad, hp, t, m)
    if calls is None or scale.dtype != torch.float32:
        return _scaled_signsign_grad_torch(w, grad, scale, hp, kind, t, m)
    out = torch.empty_like(grad)
    calls.weight_grad(w, grad, scale, out)
    return out


@scaled_sign_grad.register_fake
def _(w, grad, scale, hp, kind, t, m):
    return torch.empty_like(grad)


@torch.library.custom_op("reste_timm::binary_conv2d", mutates_args=())
def binary_conv2d(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int, hp: torch.Tensor, kind: str, t: float,
                  m: float, binarize_input: bool, compute_dtype: Optional[torch.dtype]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, bw, scale)``: the conv's output, the binary weight as the conv saw it, ``mean(|w|)``.

    Args:
        x, w, bias: The conv's input, latent weight and bias.
        stride, padding, dilation, groups: As ``conv2d`` (padding: zeros, applied after the sign).
        hp: ``[o, progress]`` (:func:`reste_timm.nn.estimators.hyperparameters`).
        kind, t, m: The built-in estimator and ReSTE's threshold and interval.
        binarize_input: True for 1W/1A, False for 1W/32A.
        compute_dtype: The conv's dtype under autocast, None to keep the inputs'.
    """
    scale = w.abs().mean()
    bw = torch.sign(w).mul_(scale)
    xb = torch.sign(x) if binarize_input else x
    if compute_dtype is not None:
        xb, bw = xb.to(compute_dtype), bw.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    return F.conv2d(xb, bw, bias, stride, padding, dilation, groups), bw, scale


@binary_conv2d.register_fake
def _(x, w, bias, stride, padding, dilation, groups, hp, kind, t, m, binarize_input, compute_dtype):
    dtype = compute_dtype or x.dtype
    out = F.conv2d(torch.empty_like(x, dtype=dtype), torch.empty_like(w, dtype=dtype),
                   None if bias is None else torch.empty_like(bias, dtype=dtype), stride, padding, dilation,
                   groups)
    return out, torch.empty_like(w, dtype=dtype), w.new_empty(())


def _setup(ctx, inputs, output):
    x, w, bias, stride, padding, dilation, groups, hp, kind, t, m, binarize_input, _ = inputs
    _, bw, scale = output
    ctx.save_for_backward(x, w, hp, bw, scale)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.estimator = (kind, t, m)
    ctx.binarize_input, ctx.has_bias = binarize_input, bias is not None
    ctx.mark_non_differentiable(bw, scale)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_bw, _grad_scale):
    x, w, hp, bw, scale = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need_x, need_w = ctx.needs_input_grad[:2]
    need_b = ctx.needs_input_grad[2] and ctx.has_bias
    grad_x = grad_w = grad_b = None
    if grad is None:
        return (None,) * 13

    def conv_backward(inp, mask):
        return torch.ops.aten.convolution_backward(grad, inp, bw, [bw.shape[0]] if ctx.has_bias else None,
                                                   stride, padding, dilation, False, [0, 0], groups, mask)

    # The input gradient reads only the input's shape, layout and dtype: x (or an empty twin in the
    # conv's dtype) stands in for sign(x).
    shape_src = x if x.dtype == bw.dtype else torch.empty_like(x, dtype=bw.dtype)
    if need_x:
        grad_x = conv_backward(shape_src, [True, False, False])[0]
    inp = None
    if ctx.binarize_input:
        if need_x:
            grad_x, inp = sign_grad_and_sign(x, grad_x, hp, *ctx.estimator)
        elif need_w or need_b:
            inp = torch.sign(x)
    elif need_w or need_b:
        inp = x
    if need_w or need_b:
        _, grad_bw, grad_b = conv_backward(inp.to(bw.dtype), [False, need_w, need_b])
        if need_w:
            grad_w = scaled_sign_grad(w, grad_bw.to(w.dtype), scale, hp, *ctx.estimator)
        if need_b:
            grad_b = grad_b.to(ctx.saved_tensors[1].dtype)
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return (grad_x, grad_w, grad_b) + (None,) * 10


binary_conv2d.register_autograd(_backward, setup_context=_setup)
