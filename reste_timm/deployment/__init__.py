"""Deployment: exported graphs (ONNX, ``torch.export``) and bitwise inference on packed signs."""

from .bitwise import BitwiseConv2d, bitwise_available, kernel_path
from .export import SignWeightConv2d, export_form, export_onnx, export_pt2
from .networks import deploy, load_packed

__all__ = ["BitwiseConv2d", "SignWeightConv2d", "bitwise_available", "deploy", "export_form", "export_onnx",
           "export_pt2", "kernel_path", "load_packed"]
