"""Bitwise inference layers for 1W/1A convolutions, on the kernel of :mod:`reste_timm.nn.bitconv`.

:class:`BitwiseConv2d` holds a layer's weight packed once and runs the registered ops
``reste_timm::pack_signs`` and ``reste_timm::bitwise_conv2d``; :func:`bn_affine` gives an eval
BatchNorm's affine form for the kernel's epilogue. :mod:`reste_timm.deployment.networks` fuses whole
blocks with them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..nn.bitconv import bitwise_available, bitwise_conv2d, conv_list, kernel, kernel_path, pack_signs
from ..nn.layers import BinaryConv2d

__all__ = ["BitwiseConv2d", "bitwise_available", "bitwise_conv2d", "bn_affine", "conv_list", "kernel",
           "kernel_path", "pack_signs"]


def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)`` of an eval BatchNorm2d such that ``fmaf(y, alpha, beta)`` is torch's CPU result:
    ``alpha = rsqrt(var + eps) * weight`` in float32 (ATen's vectorized kernel rounds as ``torch.rsqrt``),
    ``beta = bias - mean * alpha`` rounded once (ATen contracts it to a fused multiply-add)."""
    var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()
    weight = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(var)
    alpha = torch.rsqrt(var + torch.tensor(bn.eps, dtype=torch.float32)) * weight
    beta = (bias.double() - mean.double() * alpha.double()).float()  # the product is exact in float64
    return alpha.contiguous(), beta.contiguous()


class BitwiseConv2d(nn.Module):
    """A 1W/1A :class:`BinaryConv2d` for inference on packed bits (its weight packed once).

    Called on a float tensor, it packs the signs itself and returns the float output (channels_last).
    :meth:`packed` runs it on packed input with a fused epilogue; the deployed networks chain those.

    A weight that is exactly 0 (``sign(0) = 0`` is not a bit) is packed as +1 and its contribution
    subtracted afterwards from the integer sums, exactly; such a layer runs its epilogue in torch.

    Raises:
        ValueError: The layer is not 1W/1A, has dilation or groups, or more than one weight in 1,000
            is exactly 0: such layers keep their float path.
    """

    def __init__(self, layer: BinaryConv2d):
        super().__init__()
        w = layer.weight.detach().float().cpu().contiguous()
        if not layer.binarize_input or layer.groups != 1 or tuple(layer.dilation) != (1, 1) \
                or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("bitwise convs take 1W/1A layers with zero padding, no dilation and no groups")
        cout, cin, kh, kw = w.shape
        packed, zeros = kernel().pack_weights(w, fast_copy=True)
        if zeros * 1000 > w.numel():
            raise ValueError(f"{zeros} weights are exactly 0: too many to correct for")
        self.register_buffer("weight_bits", packed)
        # (oc, ic, kh, kw) of each exact zero, packed as +1 and subtracted after the conv
        self.register_buffer("zero_taps", (w == 0).nonzero() if zeros else None)
        self.shape = [cout, cin, kh, kw]
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.scale = float(layer.binary_scale().detach())
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()

    def packed(self, bits: torch.Tensor, mask: Optional[torch.Tensor], relu: bool = False,
               bn: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               residual: Optional[torch.Tensor] = None, out_float: bool = True, out_bits: bool = False):
        """``(y, bits, mask or None)`` from packed input, with ``relu``, ``bn = (alpha, beta)`` and a
        ``residual`` fused after the conv."""
        if self.zero_taps is not None:
            return self._packed_with_zero_weights(bits, mask, relu, bn, residual, out_bits)
        alpha, beta = bn if bn is not None else (None, None)
        y, ob, om, zeros = bitwise_conv2d(bits, mask, self.weight_bits,
                                          conv_list(self.shape, self.stride, self.padding, relu, out_float,
                                                    out_bits), self.scale, self.bias, alpha, beta, residual)
        return y, ob, (om if out_bits and int(zeros) else None)

    def _packed_with_zero_weights(self, bits, mask, relu, bn, residual, out_bits):
        """The integer sums with each zero weight's +1 taken back out, then the epilogue in torch."""
        dots = bitwise_conv2d(bits, mask, self.weight_bits, conv_list(self.shape, self.stride, self.padding),
                              1.0)[0].clone()
        oh, ow = dots.shape[2:]
        (sh, sw), (ph, pw) = self.stride, self.padding
        planes = {}
        for oc, ic, i, j in self.zero_taps.tolist():
            if ic not in planes:
                word, bit = bits[..., ic // 64], ic % 64
                plane = 1.0 - 2.0 * ((word >> bit) & 1).float()  # sign(x) of channel ic, as packed
                if mask is not None:
                    plane = plane * ((mask[..., ic // 64] >> bit) & 1).float()
                planes[ic] = torch.nn.functional.pad(plane, (pw, pw, ph, ph))
            dots[:, oc] -= planes[ic][:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
        y = dots * self.scale  # the integer sums are exact in float: one rounding, as in the kernel
        y = y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        y = torch.relu(y) if relu else y
        y = y if bn is None else torch.addcmul(bn[1].view(1, -1, 1, 1), y, bn[0].view(1, -1, 1, 1))
        y = (y if residual is None else y + residual).contiguous(memory_format=torch.channels_last)
        if not out_bits:
            return y, None, None
        out_bits_, out_mask, zeros = pack_signs(y)
        return y, out_bits_, (out_mask if int(zeros) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits, mask, zeros = pack_signs(x.float())
        return self.packed(bits, mask if int(zeros) else None)[0]

    def extra_repr(self) -> str:
        cout, cin, kh, kw = self.shape
        return (f"{cin}, {cout}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}")
