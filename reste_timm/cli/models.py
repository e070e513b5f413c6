"""How the subcommands name a model: a saved folder, ``local-dir:``, ``hf-hub:`` or a registered name."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from ..hub.check import load_model


def load_source(spec: str, pretrained: bool = True) -> nn.Module:
    """The model ``spec`` names, checked before loading (:func:`reste_timm.hub.load_model`).

    A path to a folder is read as ``local-dir:``; ``hf-hub:``/``local-dir:`` load their weights; a
    registered name builds the architecture (with its published weights when ``pretrained``).

    Raises:
        CheckpointError: A bad folder or file, named with its key.
        RuntimeError, ValueError: An unknown model name or unpublished weights (timm's and ours).
    """
    if Path(spec).is_dir():
        spec = f"local-dir:{spec}"
    if spec.startswith(("local-dir:", "hf-hub:")):
        return load_model(spec)
    if not timm.is_model(spec):
        raise ValueError(f"{spec}: neither a folder nor a registered model (timm.list_models('*reste*'))")
    return load_model(spec, pretrained=pretrained) if pretrained else timm.create_model(spec)
