"""Checkpoints: saving, sharing on the Hugging Face Hub, checking, packed 1-bit folders, conversion."""

from ..files import CheckpointError
from .check import check_folder, check_pretrained, load_model
from .convert import convert_official_checkpoint
from .packed import export_packed, load_packed
from .save import binary_model_args, push_folder, push_to_hub, save_pretrained

__all__ = ["CheckpointError", "binary_model_args", "check_folder", "check_pretrained",
           "convert_official_checkpoint", "export_packed", "load_model", "load_packed", "push_folder",
           "push_to_hub", "save_pretrained"]
