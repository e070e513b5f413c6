"""Packed 1-bit export of binary models: sign bits plus one scale per binary conv, in safetensors.

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

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers import BinaryConv2d

__all__ = ["export_packed", "load_packed", "pack_bits", "unpack_bits", "unpack_state_dict", "summary"]

PACKED_FORMAT = "reste-timm-packed"
PACKED_VERSION = 1
WEIGHTS_NAME = "model.safetensors"  # timm's preferred name, so local-dir loading finds it
CONFIG_NAME = "config.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SKIP_CFG_KEYS = ("architecture", "file", "source", "state_dict", "url", "hf_hub_id", "hf_hub_filename")


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
    dtype = _DTYPES[float_dtype]
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


def _infer_model_args(model: nn.Module) -> Dict[str, Any]:
    args: Dict[str, Any] = {}
    if getattr(model, "num_classes", None) is not None:
        args["num_classes"] = int(model.num_classes)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        args["in_chans"] = int(first_conv.in_channels)
    layer = next((m for m in model.modules() if isinstance(m, BinaryConv2d)), None)
    if layer is not None:
        args["estimator"] = layer.estimator
        args["binarize_input"] = layer.binarize_input
    return args


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def export_packed(model: nn.Module, folder: Union[str, Path], float_dtype: str = "float16",
                  architecture: Optional[str] = None, model_args: Optional[Dict[str, Any]] = None) -> Path:
    """Writes ``model.safetensors`` (packed) and ``config.json`` into ``folder``.

    Args:
        model: A model with :class:`BinaryConv2d` layers (an FP model works too, nothing is packed).
        folder: Output folder, created if needed.
        float_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` for the non-binary
            tensors; float32 makes the rebuilt model's predictions match to float rounding.
        architecture: timm model name; default ``model.pretrained_cfg["architecture"]``.
        model_args: Extra ``timm.create_model`` arguments, merged over the inferred ``num_classes``,
            ``in_chans``, ``estimator`` and ``binarize_input``.

    Returns:
        The folder.

    Raises:
        ValueError: unknown ``float_dtype``, no architecture, or a non-finite binary weight.
    """
    from safetensors.torch import save_file

    if float_dtype not in _DTYPES:
        raise ValueError(f"float_dtype must be one of {sorted(_DTYPES)}, got {float_dtype!r}")
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or pretrained_cfg.get("architecture")
    if not architecture:
        raise ValueError("architecture unknown: pass architecture= (the model has no pretrained_cfg)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = packed_state_dict(model, float_dtype)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "packing": PACKED_FORMAT})
    layers = {n: {"shape": list(m.weight.shape), "zeros": int((m.weight == 0).sum())}
              for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    config = {
        "architecture": architecture,
        "num_classes": getattr(model, "num_classes", None),
        "num_features": getattr(model, "num_features", None),
        "model_args": {**_infer_model_args(model), **(model_args or {})},
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items()
                           if k not in _SKIP_CFG_KEYS and _jsonable(v)},
        "reste_timm_packed": {"format": PACKED_FORMAT, "version": PACKED_VERSION,
                              "float_dtype": float_dtype, "binary_layers": layers},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def load_packed(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                cache_weights: bool = False, **kwargs) -> nn.Module:
    """Rebuilds a model written by :func:`export_packed`, in eval mode.

    Args:
        folder: The export folder.
        device: Where to put the model.
        cache_weights: Compute each binary weight once for no-grad forwards
            (:func:`reste_timm.layers.set_weight_cache`); faster inference at the cost of one float
            copy of the binary weights.
        **kwargs: ``timm.create_model`` overrides on top of the stored ``model_args``.

    Raises:
        ValueError: the folder is not a packed export of a known version.
    """
    import timm
    from safetensors.torch import load_file

    from .layers import set_weight_cache

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    info = config.get("reste_timm_packed", {})
    if info.get("format") != PACKED_FORMAT or info.get("version", 0) > PACKED_VERSION:
        raise ValueError(f"{folder} is not a {PACKED_FORMAT} export this version can read")
    model = timm.create_model(config["architecture"], pretrained=False,
                              **{**config.get("model_args", {}), **kwargs})
    model.load_state_dict(unpack_state_dict(load_file(str(folder / WEIGHTS_NAME)), model))
    model.pretrained_cfg = {**config.get("pretrained_cfg", {}), "architecture": config["architecture"]}
    set_weight_cache(model, cache_weights)
    return model.to(device).eval()


def _row(name: str, module: nn.Module, float_bits: int) -> Optional[Dict[str, Any]]:
    params = list(module.parameters(recurse=False))
    if not params:
        return None
    total = sum(p.numel() for p in params)
    binary = module.weight.numel() if isinstance(module, BinaryConv2d) else 0
    floats = total - binary
    # A binary layer stores its bits (rounded up to bytes) and one float32 scale.
    packed_bytes = (math.ceil(binary / 8) + 4 if binary else 0) + floats * float_bits // 8
    act_bits = 1 if isinstance(module, BinaryConv2d) and module.binarize_input else 32
    return {"name": name or "(model)", "type": type(module).__name__,
            "weight_bits": 1 if binary else float_bits, "input_bits": act_bits,
            "binary_params": binary, "float_params": floats, "params": total,
            "float32_bytes": total * 4, "packed_bytes": packed_bytes}


def summary(model: nn.Module, float_bits: int = 16, print_fn: Optional[Callable[[str], None]] = print
            ) -> Dict[str, Any]:
    """Per-layer bit-widths, parameter counts and memory, like larq's ``model_summary``.

    Memory counts parameters only (buffers such as BatchNorm statistics are not parameters): float32
    for the float model; for the packed one, 1 bit per binary weight plus a float32 scale per binary
    layer, and ``float_bits`` per other parameter.

    Args:
        model: Any model.
        float_bits: Bits per non-binary parameter in the packed model (16 or 32).
        print_fn: Where the table goes; None prints nothing.

    Returns:
        ``{"layers": [row, ...], "params", "binary_params", "float_params", "float32_bytes",
        "packed_bytes", "compression"}`` where ``compression = float32_bytes / packed_bytes``.
    """
    rows = [r for n, m in model.named_modules() if (r := _row(n, m, float_bits)) is not None]
    totals = {k: sum(r[k] for r in rows)
              for k in ("params", "binary_params", "float_params", "float32_bytes", "packed_bytes")}
    totals["compression"] = totals["float32_bytes"] / max(totals["packed_bytes"], 1)
    if print_fn is not None:
        print_fn(_format_summary(rows, totals, float_bits))
    return {"layers": rows, **totals}


def _format_summary(rows, totals, float_bits: int) -> str:
    head = (f"{'Layer':<28} {'Type':<14} {'W bits':>6} {'A bits':>6} {'# 1-bit':>10} "
            f"{'# float':>10} {'Mem fp32 kB':>12} {'Mem packed kB':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:28]:<28} {r['type'][:14]:<14} {r['weight_bits']:>6} {r['input_bits']:>6} "
                     f"{r['binary_params']:>10,} {r['float_params']:>10,} {r['float32_bytes'] / 1e3:>12.1f} "
                     f"{r['packed_bytes'] / 1e3:>14.1f}")
    lines += ["-" * len(head),
              f"Total params: {totals['params']:,} ({totals['binary_params']:,} 1-bit, "
              f"{totals['float_params']:,} at {float_bits} bits)",
              f"Memory: {totals['float32_bytes'] / 1e6:.2f} MB float32 -> "
              f"{totals['packed_bytes'] / 1e6:.2f} MB packed, compression x{totals['compression']:.1f}"]
    return "\n".join(lines)
