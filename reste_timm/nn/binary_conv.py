"""The binary convolution as one registered op, ``reste_timm::binary_conv2d`` (method: docs/method.md).

    out = conv2d(est(x) if binarize_input else x, est(w) * mean(|w|), bias)

The plain composition would keep both ``x`` (for the estimator) and ``sign(x)`` (for the conv's
weight gradient); the op keeps only ``x``, so a 1W/1A layer holds no more activation memory than a
float conv. On CPU, for float32 1W/1A layers, the forward packs the signs into bits and runs the bitwise
kernel of :mod:`reste_timm.nn.bitconv` (exact integer sums, scaled once) instead of the float conv of
the signs. Its backward, one more op (``reste_timm::binary_conv2d_backward``), takes the conv's input
gradient first (which needs no ``sign(x)``), then one pass over ``x`` turns it into the estimator's
gradient and yields ``sign(x)`` for the weight gradient, and the binary weight's gradient, through the
estimator and through ``mean(|w|)``, is one more pass; on CPU both passes are the C loops of
:mod:`reste_timm.nn.kernels`, writing into the conv's fresh gradients. As registered ops with fake
implementations, ``torch.compile`` and ``torch.export`` trace them, and the exponent is the tensor
``hp``: a new ``o`` never recompiles.

Under autocast the op computes the binary weight and the signs in the parameters' dtype and casts
them for the conv to ``compute_dtype``, as autocast would cast ``conv2d``'s inputs.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import bitconv
from .estimators import native_allowed, native_fits, native_plan, sign_grad_torch
from .kernels import Plan

__all__ = ["binary_conv2d", "binary_conv2d_backward", "conv_arguments", "scaled_sign_grad"]


def conv_arguments(stride, padding, dilation, groups: int, binarize_input: bool) -> List[int]:
    """The ops' ``conv`` list ``[sh, sw, ph, pw, dh, dw, groups, binarize_input]``: one argument
    rather than five, because a custom op's dispatch cost grows with its argument count."""
    return [*stride, *padding, *dilation, int(groups), int(binarize_input)]


def _unpack(conv: List[int]):
    return conv[0:2], conv[2:4], conv[4:6], conv[6], bool(conv[7])


def scaled_sign_grad(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, hp: torch.Tensor, kind: str,
                     plan: Optional[Plan] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient for ``w`` of ``est(w) * mean(|w|)``, through the estimator and through the scale:
    ``f(w) * grad * scale + sign(w) * sum(grad * sign(w)) / N``, in the order autograd computes it for
    the composition.

    Args:
        plan: :func:`~reste_timm.nn.estimators.native_plan`'s C calls: where the float32 CPU tensors fit,
            one C call (summing in double); None for autograd's ops.
        out: Where the C call writes (``grad`` itself may be given); a new tensor when None.
    """
    if plan is not None and native_fits(w, grad) and scale.dtype == torch.float32:
        out = torch.empty_like(grad) if out is None else out
        plan.weight_grad(w, grad, scale, out)
        return out
    sign_w = torch.sign(w)
    through_scale = sign_w * ((grad * sign_w).sum() / w.numel())
    return sign_grad_torch(w, grad * scale, hp, kind) + through_scale


@torch.library.custom_op("reste_timm::binary_conv2d", mutates_args=())
def binary_conv2d(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], hp: torch.Tensor,
                  conv: List[int], kind: str, compute_dtype: Optional[torch.dtype]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, bw, scale)``: the conv's output, the binary weight as the conv saw it, ``mean(|w|)``.

    Args:
        x, w, bias: The conv's input, latent weight and bias.
        hp: ``[o, progress, t, m]`` (:func:`reste_timm.nn.estimators.hyperparameters`).
        conv: :func:`conv_arguments`: stride, padding (zeros, applied after the sign), dilation, groups
            as ``conv2d``'s, and ``binarize_input`` (1 for 1W/1A, 0 for 1W/32A).
        kind: The built-in estimator.
        compute_dtype: The conv's dtype under autocast, None to keep the inputs'.
    """
    return _forward_impl(x, w, bias, conv, compute_dtype, bitwise=False)


def _forward_impl(x, w, bias, conv, compute_dtype, bitwise):
    """:func:`binary_conv2d`'s outputs; ``bitwise`` allows the bitwise kernel (CPU)."""
    stride, padding, dilation, groups, binarize_input = _unpack(conv)
    scale = w.abs().mean()
    bw = torch.sign(w).mul_(scale)
    out = _bitwise_output(x, w, bias, scale, conv) if bitwise and compute_dtype is None else None
    if out is not None:
        return out, bw, scale
    xb = torch.sign(x) if binarize_input else x
    if compute_dtype is not None:
        xb, bw = xb.to(compute_dtype), bw.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    return F.conv2d(xb, bw, bias, stride, padding, dilation, groups), bw, scale


def _bitwise_output(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                    conv: List[int]) -> Optional[torch.Tensor]:
    """``conv2d(sign(x), sign(w) * scale, bias)`` by the bitwise kernel (:mod:`reste_timm.nn.bitconv`),
    with the strides ``conv2d`` (and the op's fake implementation) would give; None where it does not
    apply: not 1W/1A float32, groups or dilation, an empty tensor, a weight that is exactly 0 (not a
    bit), no kernel (no C compiler), or the C kernels turned off
    (:func:`~reste_timm.nn.estimators.native_kernels`).

    The integer sums are exact, so the result differs from the float conv's only by the float conv's
    own rounding (it sums ``±scale`` terms one by one; here ``(float)sum * scale``, rounded once)."""
    stride, padding, dilation, groups, binarize_input = _unpack(conv)
    if not (binarize_input and groups == 1 and dilation == [1, 1] and x.dtype == w.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.numel() and w.numel()
            and native_allowed()):
        return None
    found = bitconv.kernel()
    if found is None:
        return None
    (kh, kw), (h, wd) = w.shape[2:], x.shape[2:]
    if h + 2 * padding[0] < kh or wd + 2 * padding[1] < kw:
        return None  # conv2d's own error
    weight_bits, zeros = found.pack_weights(w)
    if zeros:
        return None
    bits, mask, x_zeros = found.pack_signs(x)
    y = found.conv2d(bits, mask if x_zeros else None, weight_bits, list(w.shape), stride, padding,
                     float(scale), bias)[0]  # channels_last, as the kernel writes NHWC
    # conv2d's CPU rule (mkldnn and slow2d alike): channels_last when the input or the weight suggests it
    return y if _suggests_channels_last(x) or _suggests_channels_last(w) else y.new_empty(y.shape).copy_(y)


def _suggests_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t.suggest_memory_format()`` (ATen, not exposed in Python) is channels_last: ATen's
    ``is_channels_last_strides_2d`` on the strides, with its fallbacks to NCHW for ambiguous sizes."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        size, stride = t.size(d), t.stride(d)
        if size == 0 or stride < low or (d == 0 and low == t.stride(1)):
            return False
        low = stride * size if size > 1 else stride
    return True


@binary_conv2d.register_kernel("cpu")
def _(x, w, bias, hp, conv, kind, compute_dtype):
    return _forward_impl(x, w, bias, conv, compute_dtype, bitwise=True)


@binary_conv2d.register_fake
def _(x, w, bias, hp, conv, kind, compute_dtype):
    stride, padding, dilation, groups, _ = _unpack(conv)
    dtype = compute_dtype or x.dtype
    out = F.conv2d(torch.empty_like(x, dtype=dtype), torch.empty_like(w, dtype=dtype),
                   None if bias is None else torch.empty_like(bias, dtype=dtype), stride, padding, dilation,
                   groups)
    return out, torch.empty_like(w, dtype=dtype), w.new_empty(())


def _backward_impl(grad, x, w, bw, scale, hp, conv, kind, output_mask, native):
    """The three gradients (empty where ``output_mask`` says not needed); ``native`` allows the C loops."""
    stride, padding, dilation, groups, binarize_input = _unpack(conv)
    need_x, need_w, need_b = output_mask
    bias_sizes = [bw.shape[0]] if need_b else None
    plan = native_plan(kind, hp) if native else None
    grad_x, grad_w, grad_b = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: no aliased outputs
    # The input gradient reads only the input's shape, layout and dtype: x (or an empty twin in the
    # conv's dtype) stands in for sign(x).
    if need_x:
        grad_x = torch.ops.aten.convolution_backward(
            grad, x if x.dtype == bw.dtype else torch.empty_like(x, dtype=bw.dtype), bw, bias_sizes, stride,
            padding, dilation, False, [0, 0], groups, [True, False, False])[0]
    inp = x  # the conv's input as the weight gradient reads it: sign(x) for 1W/1A
    if binarize_input and need_x and plan is not None and native_fits(x, grad_x):
        inp = torch.empty_like(x) if need_w or need_b else None
        plan.grad(x, grad_x, grad_x, inp)  # in place: the estimator's gradient (and sign(x)), one pass
    elif binarize_input:
        grad_x = sign_grad_torch(x, grad_x, hp, kind) if need_x else grad_x
        inp = torch.sign(x) if need_w or need_b else None
    if need_w or need_b:
        _, grad_bw, grad_bias = torch.ops.aten.convolution_backward(
            grad, inp if inp.dtype == bw.dtype else inp.to(bw.dtype), bw, bias_sizes, stride, padding,
            dilation, False, [0, 0], groups, [False, need_w, need_b])
        grad_b = grad_bias if need_b else grad_b
        if need_w:
            # the C loop writes into the conv's fresh float32 gradient; other dtypes take autograd's ops
            native = plan if grad_bw.dtype == w.dtype else None
            grad_w = scaled_sign_grad(w, grad_bw.to(w.dtype), scale, hp, kind, native, out=grad_bw)
    return grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype), grad_w, grad_b


@torch.library.custom_op("reste_timm::binary_conv2d_backward", mutates_args=())
def binary_conv2d_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bw: torch.Tensor,
                           scale: torch.Tensor, hp: torch.Tensor, conv: List[int], kind: str,
                           output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`binary_conv2d` for ``x``, ``w`` and the bias (empty where not asked)."""
    return _backward_impl(grad, x, w, bw, scale, hp, conv, kind, output_mask, native=False)


@binary_conv2d_backward.register_kernel("cpu")
def _(grad, x, w, bw, scale, hp, conv, kind, output_mask):
    return _backward_impl(grad, x, w, bw, scale, hp, conv, kind, output_mask, native=True)


@binary_conv2d_backward.register_fake
def _(grad, x, w, bw, scale, hp, conv, kind, output_mask):
    # the torch implementation on fake tensors: the same shapes, dtypes and layouts as the real one
    return _backward_impl(grad, x, w, bw, scale, hp, conv, kind, output_mask, native=False)


def _setup(ctx, inputs, output):
    x, w, bias, hp, ctx.conv, ctx.kind, _ = inputs
    _, bw, scale = output
    ctx.save_for_backward(x, w, hp, bw, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(bw, scale)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_bw, _grad_scale):
    if grad is None:
        return (None,) * 7
    x, w, hp, bw, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2] and ctx.bias_dtype is not None]
    grad_x, grad_w, grad_b = binary_conv2d_backward(grad, x, w, bw, scale, hp, ctx.conv, ctx.kind, mask)
    return (grad_x if mask[0] else None, grad_w if mask[1] else None,
            grad_b.to(ctx.bias_dtype) if mask[2] else None, None, None, None, None)


binary_conv2d.register_autograd(_backward, setup_context=_setup)
