"""A per-layer summary of a model: bit-widths, parameters, memory and multiply-accumulates.

Like larq's ``model_summary``: each layer with parameters gets its weight and input bit-widths, its
1-bit and float parameters, its memory as float32 and as packed bits, and the multiply-accumulates of
one forward pass, split into binary MACs (1-bit weights times 1-bit inputs: what XNOR/popcount
kernels run) and float MACs (everything else, 1W/32A convs included).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..nn.layers import BinaryConv2d

__all__ = ["count_macs", "summary"]

_TOTALS = ("params", "binary_params", "float_params", "float32_bytes", "packed_bytes", "binary_macs",
           "float_macs")


def _is_binary_mac(module: nn.Module) -> bool:
    return isinstance(module, BinaryConv2d) and module.binarize_input


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> Dict[str, int]:
    """Multiply-accumulates of each conv and linear layer for one image of ``input_size`` (C, H, W).

    Measured with forward hooks on a forward pass in eval mode (the model's mode is restored), so
    any input size, pooling or head the model allows is counted as it runs.
    """
    macs: Dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
                macs[name] = macs.get(name, 0) + output[0].numel() * per_out
            else:
                macs[name] = macs.get(name, 0) + output[0].numel() * module.in_features
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    try:
        model.eval()(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return macs


def _row(name: str, module: nn.Module, float_bits: int, macs: Dict[str, int]) -> Optional[Dict[str, Any]]:
    params = list(module.parameters(recurse=False))
    if not params:
        return None
    total = sum(p.numel() for p in params)
    binary = module.weight.numel() if isinstance(module, BinaryConv2d) else 0
    floats = total - binary
    # A binary layer stores its bits (rounded up to bytes) and one float32 scale.
    packed_bytes = (math.ceil(binary / 8) + 4 if binary else 0) + floats * float_bits // 8
    act_bits = 1 if _is_binary_mac(module) else 32
    mac, binary_mac = macs.get(name, 0), _is_binary_mac(module)
    return {"name": name or "(model)", "type": type(module).__name__,
            "weight_bits": 1 if binary else float_bits, "input_bits": act_bits,
            "binary_params": binary, "float_params": floats, "params": total,
            "float32_bytes": total * 4, "packed_bytes": packed_bytes,
            "binary_macs": mac if binary_mac else 0, "float_macs": 0 if binary_mac else mac}


def summary(model: nn.Module, float_bits: int = 16, input_size: Optional[Sequence[int]] = None,
            print_fn: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Per-layer bit-widths, parameter counts, memory and MACs, like larq's ``model_summary``.

    Memory counts parameters only (buffers such as BatchNorm statistics are not parameters): float32
    for the float model; for the packed one, 1 bit per binary weight plus a float32 scale per binary
    layer, and ``float_bits`` per other parameter.

    Args:
        model: Any model.
        float_bits: Bits per non-binary parameter in the packed model (16 or 32).
        input_size: ``(C, H, W)`` of one image for the MAC counts; default the model's
            ``pretrained_cfg["input_size"]``; MACs are 0 when neither is known.
        print_fn: Where the table goes; None prints nothing.

    Returns:
        ``{"layers": [row, ...], "params", "binary_params", "float_params", "float32_bytes",
        "packed_bytes", "binary_macs", "float_macs", "compression", "input_size"}`` where
        ``compression = float32_bytes / packed_bytes``.
    """
    input_size = input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    macs = count_macs(model, input_size) if input_size else {}
    rows = [r for n, m in model.named_modules() if (r := _row(n, m, float_bits, macs)) is not None]
    totals = {k: sum(r[k] for r in rows) for k in _TOTALS}
    totals["compression"] = totals["float32_bytes"] / max(totals["packed_bytes"], 1)
    totals["input_size"] = tuple(input_size) if input_size else None
    if print_fn is not None:
        print_fn(_format_summary(rows, totals, float_bits))
    return {"layers": rows, **totals}


def _format_summary(rows, totals, float_bits: int) -> str:
    head = (f"{'Layer':<28} {'Type':<14} {'W bits':>6} {'A bits':>6} {'# 1-bit':>10} {'# float':>10} "
            f"{'Mem fp32 kB':>12} {'Mem packed kB':>14} {'1-bit MMACs':>12} {'float MMACs':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:28]:<28} {r['type'][:14]:<14} {r['weight_bits']:>6} {r['input_bits']:>6} "
                     f"{r['binary_params']:>10,} {r['float_params']:>10,} {r['float32_bytes'] / 1e3:>12.1f} "
                     f"{r['packed_bytes'] / 1e3:>14.1f} {r['binary_macs'] / 1e6:>12.2f} "
                     f"{r['float_macs'] / 1e6:>12.2f}")
    size = "x".join(map(str, totals["input_size"])) if totals["input_size"] else "unknown input size"
    lines += ["-" * len(head),
              f"Total params: {totals['params']:,} ({totals['binary_params']:,} 1-bit, "
              f"{totals['float_params']:,} at {float_bits} bits)",
              f"Memory: {totals['float32_bytes'] / 1e6:.2f} MB float32 -> "
              f"{totals['packed_bytes'] / 1e6:.2f} MB packed, compression x{totals['compression']:.1f}",
              f"MACs per {size} image: {totals['binary_macs'] / 1e6:,.1f} M binary (1-bit x 1-bit), "
              f"{totals['float_macs'] / 1e6:,.1f} M float"]
    return "\n".join(lines)
