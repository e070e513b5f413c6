"""Converting a checkpoint of the reference implementation into a saved timm folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import clean_state_dict, resolve_pretrained_cfg, split_model_name_tag

from ..files import CheckpointError, PathLike, compare_shapes, first_line
from .save import push_to_hub, save_pretrained

__all__ = ["convert_official_checkpoint"]

def _official_state_dict(checkpoint: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state dict (``module.`` stripped) and the other entries of a reference checkpoint."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors have many types)
        raise CheckpointError(checkpoint, None,
                              f"cannot be read with weights_only=True: {first_line(e)}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state_dict, extra = ckpt["state_dict"], {k: v for k, v in ckpt.items() if k != "state_dict"}
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict, extra = ckpt, {}  # a bare state dict
    else:
        raise CheckpointError(checkpoint, "state_dict", "missing: not a reference-implementation checkpoint")
    return clean_state_dict(state_dict), extra


def convert_official_checkpoint(checkpoint: PathLike, model_name: str, out: PathLike,
                                num_classes: Optional[int] = None, push_to_hub_id: Optional[str] = None,
                                **save_kwargs: Any) -> nn.Module:
    """Converts a checkpoint of the reference implementation into a saved folder.

    The keys must match ``timm.create_model(model_name)`` exactly (after stripping ``module.``);
    1W/1A and 1W/32A checkpoints have the same keys, so ``model_name`` chooses between them.

    Args:
        checkpoint: ``.pth.tar`` with ``state_dict`` (and ``epoch``, ``best_prec1``, ...).
        model_name: Registered timm model name, e.g. ``resnet20_1w1a_reste``.
        out: Output folder.
        num_classes: Classifier size; default: read from the checkpoint's classifier.
        push_to_hub_id: Also upload to this Hub repo.
        **save_kwargs: Passed to :func:`save_pretrained` / :func:`push_to_hub`.

    Returns:
        The converted model (eval mode).

    Raises:
        CheckpointError: Unreadable checkpoint or a key/shape that does not match the model.
    """
    state_dict, extra = _official_state_dict(checkpoint)
    arch = split_model_name_tag(model_name)[0]
    if not timm.is_model(arch):
        raise CheckpointError(checkpoint, None, f"unknown model {model_name!r}")
    classifier = resolve_pretrained_cfg(arch).classifier
    if num_classes is None and f"{classifier}.weight" in state_dict:
        num_classes = state_dict[f"{classifier}.weight"].shape[0]
    model = timm.create_model(model_name, num_classes=num_classes)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, found, checkpoint, model_name)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    metrics = {"top1": float(extra["best_prec1"])} if "best_prec1" in extra else None
    train_config = {"source": "reference implementation checkpoint", "checkpoint": Path(checkpoint).name}
    train_config.update({k: extra[k] for k in ("model", "epoch") if isinstance(extra.get(k), (str, int))})
    save_kwargs.setdefault("train_config", train_config)
    if metrics:
        save_kwargs.setdefault("results_note", "Top-1 is the `best_prec1` recorded in the reference "
                               "checkpoint (best epoch of its run), not re-measured here.")
    save_pretrained(model, out, metrics=metrics, **save_kwargs)
    if push_to_hub_id:
        push_to_hub(model, push_to_hub_id, metrics=metrics, **save_kwargs)
    return model
