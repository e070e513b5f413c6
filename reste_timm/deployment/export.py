"""Exported graphs of binary models: ONNX (``torch.onnx``, dynamo) and ``torch.export`` programs (pt2).

Both are traced from the model's export form (:func:`export_form`), where each
:class:`~reste_timm.nn.BinaryConv2d` becomes a :class:`SignWeightConv2d`: its weight stored as int8
signs plus one float32 scale, expanded in the graph (``signs * scale``), so the file holds a byte per
binary weight instead of four, and plain ops only (no ``reste_timm`` op), so ONNX Runtime or
``torch.export.load`` run it without this package. The export form computes exactly what the model
computes in eval mode: ``sign(w) * mean(|w|)`` is exact in any float type.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import PathLike, atomic_write
from ..nn.layers import BinaryConv2d, replace_binary_layers

__all__ = ["ONNX_OPSET", "SignWeightConv2d", "export_form", "export_onnx", "export_pt2", "input_size_of"]

ONNX_OPSET = 18


class SignWeightConv2d(nn.Module):
    """A :class:`BinaryConv2d` for inference and export: int8 ``weight_sign``, a 0-d ``weight_scale``.

    ``conv2d(sign(x) if binarize_input else x, weight_sign * weight_scale, bias)``, with the layer's
    stride, padding (including ``padding_mode``), dilation and groups.
    """

    def __init__(self, layer: BinaryConv2d):
        super().__init__()
        w = layer.weight.detach()
        self.register_buffer("weight_sign", torch.sign(w).to(torch.int8))
        self.register_buffer("weight_scale", layer.binary_scale().detach().float().reshape(()))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                 layer.groups)
        self.padding_mode, self.binarize_input = layer.padding_mode, layer.binarize_input
        self.pre_padding = layer._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_sign.to(x.dtype) * self.weight_scale.to(x.dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pre_padding, mode=self.padding_mode), 0
        if self.binarize_input:
            x = torch.sign(x)
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)


def export_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every binary conv as a :class:`SignWeightConv2d`."""
    model = copy.deepcopy(model).eval()
    replace_binary_layers(model, SignWeightConv2d)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def input_size_of(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Optional[Sequence[int]]:
    """``input_size`` when given, else the model's ``pretrained_cfg["input_size"]`` (None if it has none)."""
    return input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size")


def _example(model: nn.Module, input_size: Optional[Sequence[int]], batch: int) -> torch.Tensor:
    size = input_size_of(model, input_size)
    if not size:
        raise ValueError("input size unknown: pass input_size=(C, H, W) (the model has no pretrained_cfg)")
    param = next(model.parameters())
    return torch.randn(batch, *size, device=param.device, dtype=param.dtype)


def _write_file(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def export_onnx(model: nn.Module, path: PathLike, input_size: Optional[Sequence[int]] = None,
                opset: int = ONNX_OPSET) -> Path:
    """Writes ``model`` as one ONNX file (opset >= 17, dynamic batch), binary weights as int8 signs.

    Args:
        model: A timm model (binary or not).
        path: The ``.onnx`` file to write (its data inside it, no external file).
        input_size: ``(C, H, W)`` of the traced input; default the model's ``pretrained_cfg``.
        opset: ONNX opset version.

    Returns:
        The path.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    form = export_form(model)
    example = _example(form, input_size, batch=2)

    def write(tmp: Path) -> None:
        torch.onnx.export(form, (example,), str(tmp), dynamo=True, opset_version=opset, external_data=False,
                          optimize=False,  # the optimizer would fold small int8 weights into float32
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)

    return _write_file(Path(path), write)


def export_pt2(model: nn.Module, path: PathLike, input_size: Optional[Sequence[int]] = None) -> Path:
    """Writes ``model`` as a ``torch.export`` program (``torch.export.load(path).module()`` runs it),
    dynamic in the batch size, binary weights as int8 signs."""
    form = export_form(model)
    example = _example(form, input_size, batch=2)
    program = torch.export.export(form, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return _write_file(Path(path), lambda tmp: torch.export.save(program, str(tmp)))
