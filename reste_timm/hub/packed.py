"""Packed 1-bit folders: :func:`export_packed` writes one, :func:`load_packed` rebuilds the model.

The tensors are :func:`reste_timm.nn.packing.packed_state_dict`'s (sign bits and one scale per binary
conv, the rest in float16 by default); ``config.json`` follows timm's layout (``architecture``,
``model_args``, ``pretrained_cfg``) plus a ``reste_timm_packed`` section, so ``timm.create_model(
"local-dir:FOLDER", pretrained=True)`` loads the folder too (the models' checkpoint filter unpacks it).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..files import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, first_line, save_files
from ..nn.layers import BinaryConv2d, set_weight_cache
from ..nn.packing import DTYPES, PACKED_FORMAT, PACKED_VERSION, packed_state_dict, unpack_state_dict
from .check import check_folder

__all__ = ["export_packed", "load_packed"]

_SKIP_CFG_KEYS = ("architecture", "file", "source", "state_dict", "url", "hf_hub_id", "hf_hub_filename")


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
        WriteError: A file could not be written (full disk...); the folder is left as it was.
    """
    if float_dtype not in DTYPES:
        raise ValueError(f"float_dtype must be one of {sorted(DTYPES)}, got {float_dtype!r}")
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or pretrained_cfg.get("architecture")
    if not architecture:
        raise ValueError("architecture unknown: pass architecture= (the model has no pretrained_cfg)")
    tensors = packed_state_dict(model, float_dtype)
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
    # Staged, then renamed into place config.json last: a failed export leaves the folder as it was.
    config_text = json.dumps(config, indent=2)
    return save_files(folder, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt",
                                                                      "packing": PACKED_FORMAT}),
        CONFIG_NAME: lambda p: p.write_text(config_text, encoding="utf-8"),
    })


def _packed_config(file: Path) -> Dict[str, Any]:
    """``config.json`` of a packed export, or a CheckpointError naming it."""
    try:
        config = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(file, None, "missing: not a saved folder (or an unfinished save)") from None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise CheckpointError(file, None, f"invalid JSON: {first_line(e)}") from e
    info = config.get("reste_timm_packed") if isinstance(config, dict) else None
    version = info.get("version", 0) if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("format") != PACKED_FORMAT or not isinstance(version, int) \
            or version > PACKED_VERSION:
        raise CheckpointError(file, "reste_timm_packed",
                              f"not a {PACKED_FORMAT} export this version can read")
    return config


# The packed parts of a binary conv (reste_timm.nn.packing) and the dtypes they must have.
_PACKED_PARTS = {
    "weight_sign": lambda t: t.dtype == torch.uint8,
    "weight_zero": lambda t: t.dtype == torch.uint8,
    "weight_scale": lambda t: t.is_floating_point(),
    "weight_shape": lambda t: not t.is_floating_point() and t.dtype != torch.bool,
    "weight_zero_index": lambda t: not t.is_floating_point() and t.dtype != torch.bool,
}


def _check_dtypes(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], file: Path) -> None:
    """Refuses a tensor stored with the wrong kind of dtype: an integer header entry over a float
    tensor's bytes is a valid file, and ``load_state_dict`` would cast it into garbage weights."""
    for key, tensor in state.items():
        fits = _PACKED_PARTS.get(key.rsplit(".", 1)[-1])
        ok = fits(tensor) if fits is not None else \
            key not in expected or tensor.is_floating_point() == expected[key].is_floating_point()
        if not ok:
            wanted = expected[key].dtype if key in expected else "another dtype"
            raise CheckpointError(file, key, f"dtype {tensor.dtype}, but the model needs {wanted}")


@contextlib.contextmanager
def _blaming(file: Path, what: str):
    """Turns any error of the block but a CheckpointError into one naming ``file``: a config or
    weights file that passed the checks can still hold values the model cannot be built from."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (timm, torch and the model raise many types for a bad value)
        raise CheckpointError(file, None, f"{what}: {first_line(e)}") from e


def load_packed(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                cache_weights: bool = False, **kwargs) -> nn.Module:
    """Rebuilds a model written by :func:`export_packed`, in eval mode.

    Args:
        folder: The export folder.
        device: Where to put the model.
        cache_weights: Compute each binary weight once for no-grad forwards
            (:func:`reste_timm.nn.set_weight_cache`); faster inference at the cost of one float
            copy of the binary weights.
        **kwargs: ``timm.create_model`` overrides on top of the stored ``model_args``.

    Raises:
        CheckpointError: The folder is not a packed export of a known version, or a file in it is
            missing, corrupt or does not match its config (checked by :func:`check_folder` first).
    """
    folder = Path(folder)
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _packed_config(config_file)
    with _blaming(config_file, "malformed"):
        check_folder(folder)
    overrides = " and the overrides" if kwargs else ""
    with _blaming(config_file, f"cannot build the model from its model_args{overrides}"):
        model = timm.create_model(config["architecture"], pretrained=False,
                                  **{**config.get("model_args", {}), **kwargs})
        model.pretrained_cfg = {**config.get("pretrained_cfg", {}), "architecture": config["architecture"]}
    with _blaming(weights, f"does not unpack into the model{overrides}"):
        state = load_file(str(weights))
        _check_dtypes(state, model.state_dict(), weights)
        model.load_state_dict(unpack_state_dict(state, model))
    set_weight_cache(model, cache_weights)
    return model.to(device).eval()
