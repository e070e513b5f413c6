"""Deployment: exported graphs (ONNX, ``torch.export``) and bitwise inference."""

from .export import SignWeightConv2d, export_form, export_onnx, export_pt2

__all__ = ["SignWeightConv2d", "export_form", "export_onnx", "export_pt2"]
