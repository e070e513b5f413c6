"""The packed 1-bit form of binary models' weights: sign bits plus one scale per binary conv.

A :class:`~reste_timm.layers.BinaryConv2d` only ever uses ``sign(w)`` and ``mean(|w|)`` of its latent
weight, so that is all a deployable file needs. For a binary layer ``<name>`` the file holds

- ``<name>.weight_sign``: ``uint8``, 8 signs per byte (bit 1 = ``w > 0``), most significant bit first,
  in the weight's row-major order, the last byte zero-padded;
- exact zeros (``sign(0) = 0`` is a third value) only when the layer has some: the flat indices as
  ``<name>.weight_zero_index`` (``int32``) while fewer than one weight in 32 is zero, else a bit plane
  ``<name>.weight_zero`` in the layout above (bit 1 = ``w == 0``). Trained weights practically never
  hit 0.0, so the file carries about 1 bit per weight, and every sign survives the round trip;
- ``<name>.weight_scale``: ``float32[1]``, the layer's ``mean(|w|)``;
- ``<name>.weight_shape``: ``int64[4]``.

Every other tensor (FP stem, downsample convs, classifier, BatchNorm) is stored in float16 by default
(float32 or bfloat16 on request; a tensor outside float16's range stays float32) and integer buffers as
they are. ``config.json`` follows timm's layout (``architecture``, ``model_args``, ``pretrained_cfg``)
plus a ``reste_timm_packed`` section.

Rebuilding sets each latent weight to ``sign * s'`` with ``s' ~ scale * N / nnz`` (``~ scale`` without
zeros) adjusted by a few ulps so that ``mean(|w'|)`` recomputes ``scale`` bit for bit: ``est(w') = sign``
and the binary weights ``bw`` equal the source's exactly, and so do the predictions when the rest is
stored in float32 (float16 rounds BatchNorm and the FP layers; a binary network can flip the sign of
an activation that lies within that rounding of 0).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .layers import BinaryConv2d

__all__ = ["DTYPES", "PACKED_FORMAT", "PACKED_VERSION", "PackedFormatError", "is_packed", "pack_bits",
           "packed_state_dict", "unpack_bits", "unpack_state_dict", "unpacked_shapes"]

PACKED_FORMAT = "reste-timm-packed"
PACKED_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Packs a boolean tensor into ``uint8``, 8 values per byte, most significant bit first.

    The same layout as ``numpy.packbits``: the flattened (row-major) values, the last byte padded with
    zeros.
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # A sum of distinct powers of two never exceeds 255: the uint8 result is exact.
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` values as a flat boolean tensor."""
    bits = packed.reshape(-1, 1).to(torch.uint8).bitwise_and(_BIT_WEIGHTS.to(packed.device))
    return bits.ne(0).reshape(-1)[:numel]


def _pack_layer(name: str, layer: BinaryConv2d) -> Dict[str, torch.Tensor]:
    w = layer.weight.detach()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}.weight has non-finite values: its signs are undefined")
    with torch.no_grad():
        scale = layer.binary_scale().float().reshape(1).cpu()
    out = {
        f"{name}.weight_sign": pack_bits(w > 0),
        f"{name}.weight_scale": scale,
        f"{name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }
    zeros = (w == 0).reshape(-1)
    count = int(zeros.sum())
    if count * 32 < zeros.numel():  # a few zeros: their flat indices are smaller than a bit plane
        if count:
            out[f"{name}.weight_zero_index"] = zeros.nonzero().reshape(-1).to(torch.int32)
    else:
        out[f"{name}.weight_zero"] = pack_bits(zeros)
    return out


def _store_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16 and t.numel() and t.float().abs().max() > torch.finfo(torch.float16).max:
        return t.float()  # would overflow to inf
    return t.to(dtype)


def packed_state_dict(model: nn.Module, float_dtype: str = "float16") -> Dict[str, torch.Tensor]:
    """The tensors :func:`export_packed` writes (see the module docstring for the keys)."""
    dtype = DTYPES[float_dtype]
    state = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BinaryConv2d):
            state.pop(f"{name}.weight")
            out.update(_pack_layer(name, module))
    for key, value in state.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = _store_float(value, dtype)
        # clone: safetensors refuses tensors that share storage with others.
        out[key] = value.clone().contiguous()
    return out


def unpack_state_dict(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None
                      ) -> Dict[str, torch.Tensor]:
    """Turns a packed state dict back into an ordinary one (a no-op on ordinary state dicts).

    Its signature is timm's ``pretrained_filter_fn(state_dict, model)``, so a model built with
    ``pretrained_filter_fn=unpack_state_dict`` loads packed folders through
    ``timm.create_model("local-dir:<folder>", pretrained=True)``. Floating tensors keep their stored
    dtype; ``load_state_dict`` casts them to the model's.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".weight_sign")]:
        prefix = key[: -len("weight_sign")]
        shape = [int(s) for s in out.pop(prefix + "weight_shape").tolist()]
        numel = math.prod(shape)
        positive = unpack_bits(out.pop(key), numel)
        zero_bits = out.pop(prefix + "weight_zero", None)
        zero_index = out.pop(prefix + "weight_zero_index", None)
        zero = unpack_bits(zero_bits, numel) if zero_bits is not None else torch.zeros_like(positive)
        if zero_index is not None:
            zero[zero_index.long()] = True
        scale = out.pop(prefix + "weight_scale").float().reshape(())
        out[prefix + "weight"] = _latent_weight(positive, zero, scale, shape)
    return out


class PackedFormatError(ValueError):
    """A packed file whose binary-conv tensors do not fit together; ``key`` names the tensor."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


def is_packed(metadata: Optional[Mapping[str, str]]) -> bool:
    """Whether a safetensors header's metadata marks a file written by :func:`export_packed`."""
    return (metadata or {}).get("packing") == PACKED_FORMAT


def unpacked_shapes(shapes: Dict[str, Tuple[int, ...]], read_tensor: Callable[[str], torch.Tensor]
                    ) -> Dict[str, Tuple[int, ...]]:
    """The shapes :func:`unpack_state_dict` gives a packed file, without unpacking it.

    Args:
        shapes: The file's tensor shapes (its safetensors header).
        read_tensor: Reads one tensor; only the small ``<conv>.weight_shape`` ones are read.

    Raises:
        PackedFormatError: A binary conv lacks its shape or scale, or its sign bits do not fit its shape.
    """
    out = dict(shapes)
    for key in [k for k in shapes if k.endswith(".weight_sign")]:
        prefix = key[: -len("weight_sign")]
        missing = [prefix + k for k in ("weight_shape", "weight_scale") if prefix + k not in shapes]
        if missing:
            raise PackedFormatError(missing[0], "missing: a packed binary conv needs its shape and scale "
                                    "beside its sign bits")
        for part in ("weight_sign", "weight_shape", "weight_scale", "weight_zero", "weight_zero_index"):
            out.pop(prefix + part, None)
        shape = tuple(int(s) for s in read_tensor(prefix + "weight_shape").tolist())
        if shapes[key] != ((math.prod(shape) + 7) // 8,):
            raise PackedFormatError(key, f"{shapes[key]} bytes of sign bits, but a {shape} weight needs "
                                    f"{(math.prod(shape) + 7) // 8}")
        out[prefix + "weight"] = shape
    return out


def _latent_weight(positive: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """``±s'`` (0 where zero) such that ``mean(|w'|)``, computed as the layer does, is ``scale`` exactly.

    ``s' = scale * N / nnz`` is right up to the rounding of the float32 sum, whose resolution is too
    coarse when all addends are equal; the magnitude of one weight (its sign stays) is then searched
    so that the sum lands on a value that rounds to ``scale``. The rebuilt conv sees bit-identical
    weights, which a binary network needs: one ulp can flip the sign of an activation lying near 0.
    """
    numel, nonzero = positive.numel(), positive.numel() - int(zero.sum())
    if not nonzero:
        return torch.zeros(shape)
    magnitude = torch.full((numel,), float(scale.double() * numel / nonzero)).masked_fill_(zero, 0.0)
    _match_mean(magnitude, int((~zero).to(torch.uint8).argmax()), shape, float(scale))
    return torch.where(positive, magnitude, -magnitude).view(shape)


def _match_mean(magnitude: torch.Tensor, index: int, shape, target: float) -> None:
    """Sets ``magnitude[index]`` so that ``magnitude.view(shape).mean() == target``, if any value does.

    The mean is non-decreasing in that one element: bracket the target by doubling steps, then bisect
    over float32 values. Leaves the closest value found below the target when none hits it exactly.
    """
    def mean_at(v: float) -> float:
        magnitude[index] = v
        return float(magnitude.view(shape).mean())

    def f32(v: float) -> float:
        return float(torch.tensor(max(v, torch.finfo(torch.float32).tiny), dtype=torch.float32))

    lo = f32(float(magnitude[index]))
    got = mean_at(lo)
    up = got < target
    step = abs(target - got) * magnitude.numel()
    hi = lo
    for _ in range(64):  # expand until the target is bracketed (or hit)
        if got == target:
            return
        hi = f32(lo + step if up else lo - step)
        got = mean_at(hi)
        if got == target or (got > target) == up:
            break
        lo, step = hi, step * 2
    for _ in range(64):  # bisect between lo (on the start side) and hi (past the target)
        if got == target:
            return
        mid = f32((lo + hi) / 2)
        if mid in (lo, hi):
            break
        got = mean_at(mid)
        lo, hi = (mid, hi) if (got < target) == up else (lo, mid)
    mean_at(lo)


