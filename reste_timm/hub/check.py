"""Checking saved models before timm loads them: every file, key and shape, named when wrong.

:func:`load_model` is ``timm.create_model`` preceded by :func:`check_pretrained`, which turns a bad
file into one :class:`~reste_timm.files.CheckpointError` naming the file and the key instead of a
partial load, and refuses pickled weights where timm would unpickle them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import safetensors
import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (  # .utils has them in every supported version; .errors from 0.25
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import parse_model_name, resolve_pretrained_cfg, split_model_name_tag
from timm.models._hub import hf_split, load_model_config_from_path
from timm.models._pretrained import PretrainedCfg

from ..files import (
    CONFIG_NAME,
    PICKLE_REFUSED,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    CheckpointError,
    PathLike,
    compare_shapes,
    first_line,
)
from ..models import check_published
from ..nn.packing import PackedFormatError, is_packed, unpacked_shapes

__all__ = ["check_folder", "check_pretrained", "load_model"]


def _kind(dtype: str) -> str:
    """``float``, ``int`` or ``bool`` of a safetensors dtype name (``F32``, ``BF16``, ``I64``, ``BOOL``)."""
    return "bool" if dtype == "BOOL" else "float" if dtype.startswith(("F", "BF")) else "int"


def _read_shapes(path: Path, allow_pickle: bool = False) -> Dict[str, Tuple[tuple, Optional[str]]]:
    """``{key: (shape, dtype kind)}`` of a weights file; safetensors is read from its header only.

    Any other file is a pickle: refused unless ``allow_pickle``, and then read with
    ``torch.load(weights_only=True)`` (timm's reader), which refuses code-running globals.
    """
    if not path.is_file():
        raise CheckpointError(path, None, "missing")
    if not path.name.endswith(".safetensors") and not allow_pickle:
        raise CheckpointError(path, None, PICKLE_REFUSED)
    try:
        if path.name.endswith(".safetensors"):
            with safetensors.safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                header = {k: (tuple(s.get_shape()), _kind(s.get_dtype())) for k, s in slices.items()}
                if not is_packed(f.metadata()):
                    return header
                # A packed export (export_packed) is checked as the state dict it unpacks to.
                shapes = unpacked_shapes({k: v[0] for k, v in header.items()}, f.get_tensor)
                return {k: (shape, header[k][1] if k in header else "float") for k, shape in shapes.items()}
        return {k: (tuple(v.shape), None) for k, v in timm.models.load_state_dict(str(path)).items()}
    except PackedFormatError as e:
        raise CheckpointError(path, e.key, str(e)) from None
    except Exception as e:  # noqa: BLE001  (any reader error means an unreadable file)
        raise CheckpointError(path, None, f"unreadable, truncated or corrupt: {first_line(e)}") from e


def _compare(expected: Dict[str, torch.Tensor], found: Dict[str, tuple], file: PathLike, name: str) -> None:
    """Keys and shapes, then dtype kinds: a float tensor stored as integers would load cast, as garbage."""
    compare_shapes({k: tuple(v.shape) for k, v in expected.items()}, {k: v[0] for k, v in found.items()},
                   file, name)
    for key, tensor in expected.items():
        want = "bool" if tensor.dtype == torch.bool else "float" if tensor.is_floating_point() else "int"
        kind = found[key][1]
        if kind is not None and kind != want:
            raise CheckpointError(file, key, f"{kind} tensor, but {name} expects {want} values")


def _expected_state(name: str, pretrained_cfg: Mapping[str, Any], model_args: Mapping[str, Any],
                    config_file: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict (meta tensors: shapes and dtypes, no memory) of the model the config describes."""
    if not timm.is_model(name):
        raise CheckpointError(config_file, "architecture", f"unknown architecture {name!r}: not registered "
                              "with timm (is the plugin that defines it imported?)")
    try:
        PretrainedCfg(**pretrained_cfg)
    except TypeError as e:
        raise CheckpointError(config_file, "pretrained_cfg", first_line(e)) from e
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, pretrained_cfg=dict(pretrained_cfg),
                                      **model_args)
    except Exception as e:  # noqa: BLE001  (a model that cannot be built from its config is a bad config)
        raise CheckpointError(config_file, "model_args", f"cannot build {name!r}: {first_line(e)}") from e
    return model.state_dict()


def _check_config_types(config_file: Path, name: Any, pretrained_cfg: Any, model_args: Any) -> None:
    """Refuses values of config.json that timm would pass on and crash on, naming the key."""
    if not isinstance(name, str):
        raise CheckpointError(config_file, "architecture", f"must be a model name, got {type(name).__name__}")
    if not isinstance(model_args, dict) or not isinstance(pretrained_cfg, dict):
        raise CheckpointError(config_file, "model_args", "model_args and pretrained_cfg must be mappings")
    for key, value in model_args.items():
        if value is None:
            raise CheckpointError(config_file, f"model_args.{key}", "null: give a value or leave it out")
    for key in ("first_conv", "classifier"):
        value = pretrained_cfg.get(key)
        names = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, str) for v in names):
            raise CheckpointError(config_file, f"pretrained_cfg.{key}", "must be a module name or names")


def check_folder(folder: PathLike) -> Dict[str, Any]:
    """Checks a saved folder as timm's ``local-dir:`` loader reads it, without loading any tensor.

    Returns:
        ``{"architecture", "model_args", "pretrained_cfg"}`` as timm parses them.

    Raises:
        CheckpointError: Naming the file and key: no config.json, bad JSON, unknown architecture,
            unbuildable model_args, missing/truncated safetensors, missing/extra/mis-shaped keys.
    """
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(config_file, None, "missing: not a saved model folder (or an unfinished save)")
    try:
        pretrained_cfg, name, model_args = load_model_config_from_path(folder)
    except json.JSONDecodeError as e:
        raise CheckpointError(config_file, None, f"invalid JSON: {e}") from e
    except UnicodeDecodeError:
        raise CheckpointError(config_file, None, "not a UTF-8 text file") from None
    except RecursionError:
        raise CheckpointError(config_file, None, "nested too deeply to be a model config") from None
    except KeyError as e:
        raise CheckpointError(config_file, str(e.args[0]), "missing entry") from e
    except (TypeError, AttributeError) as e:
        raise CheckpointError(config_file, None, f"malformed: {first_line(e)}") from e
    _check_config_types(config_file, name, pretrained_cfg, model_args)
    for key in ("file", "source"):  # added by timm's parser, not part of the saved config
        pretrained_cfg.pop(key, None)
    expected = _expected_state(name, pretrained_cfg, model_args, config_file)
    weights = folder / WEIGHTS_NAME
    pickles = sorted(p.name for p in folder.glob("*") if p.name.endswith(PICKLE_SUFFIXES))
    if not weights.is_file() and pickles:
        # timm would fall back to torch.load on these; a shared folder must not run code when loaded.
        raise CheckpointError(weights, None, f"missing; found only pickled weights ({', '.join(pickles)}), "
                              "which are not loaded (a pickle can run code): convert them to safetensors")
    _compare(expected, _read_shapes(weights), weights, name)
    return {"architecture": name, "model_args": model_args, "pretrained_cfg": pretrained_cfg}


def _hub_file(model_id: str, filename: str, cache_dir: Optional[PathLike]) -> Path:
    repo, revision = hf_split(model_id)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    library_name="timm", library_version=timm.__version__))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"hf-hub:{model_id}/{filename}", None, f"not found: {first_line(e)}") from e


def _hub_weights(model_id: str, filename: Optional[str], cache_dir: Optional[PathLike],
                 allow_pickle: bool) -> Path:
    """The file timm reads for a cfg's ``hf_hub_id``: as timm, the ``.safetensors`` twin of a ``.bin`` first.

    Where timm would go on to unpickle the ``.bin`` (or a ``.pth``), this refuses unless ``allow_pickle``.
    """
    filename = filename or "pytorch_model.bin"  # timm's default
    if filename.endswith(".safetensors"):
        return _hub_file(model_id, filename, cache_dir)
    twin = WEIGHTS_NAME if filename == "pytorch_model.bin" else (
        filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    try:
        if twin is not None:
            return _hub_file(model_id, twin, cache_dir)
        raise CheckpointError(f"hf-hub:{model_id}/{filename}", None, "not a .safetensors file")
    except CheckpointError as e:
        if not allow_pickle:
            raise CheckpointError(e.file, None, f"{e.problem}; timm would unpickle {filename} instead, "
                                  "which is refused unless allow_pickle=True") from None
    return _hub_file(model_id, filename, cache_dir)


def _check_registry_weights(name: str, pretrained_cfg: Any, overlay: Optional[Mapping[str, Any]],
                            cache_dir: Optional[PathLike], kwargs: Mapping[str, Any],
                            allow_pickle: bool = False) -> None:
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise CheckpointError(name, None, "unknown model: not registered with timm")
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg or tag or None, overlay).to_dict()
    if cfg.get("state_dict") is not None:
        found = {k: (tuple(v.shape), None) for k, v in cfg["state_dict"].items()}
        where = "pretrained_cfg.state_dict"
    elif cfg.get("file"):
        where = Path(cfg["file"])
        found = _read_shapes(where, allow_pickle)
    elif cfg.get("hf_hub_id"):
        check_published(arch, pretrained_cfg or tag or None, overlay, cache_dir)  # a reserved id, empty
        where = _hub_weights(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), cache_dir, allow_pickle)
        found = _read_shapes(where, allow_pickle)
    elif cfg.get("url") and not allow_pickle:  # timm reads a URL with torch.load
        raise CheckpointError(cfg["url"], None, PICKLE_REFUSED)
    else:
        return  # a url with allow_pickle (timm downloads and checks it), or no weights: timm reports it
    # The weights must match the model of the cfg's own classes and channels; timm adapts them after.
    build_args = {k: v for k, v in kwargs.items() if k not in (
        "num_classes", "in_chans", "features_only", "out_indices", "feature_cls", "pretrained_model_args")}
    _compare(_expected_state(arch, cfg, build_args, f"pretrained_cfg of {arch}"), found, where, arch)


def check_pretrained(model_name: str, pretrained_cfg: Any = None,
                     pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
                     cache_dir: Optional[PathLike] = None, allow_pickle: bool = False, **kwargs: Any) -> None:
    """Checks the files that ``timm.create_model(model_name, pretrained=True, ...)`` would load.

    Handles ``local-dir:FOLDER``, ``hf-hub:ORG/NAME[@REV]`` (files fetched through the Hub cache, so
    ``HF_HUB_OFFLINE=1`` works) and registry names (their cfg's ``file``, ``hf_hub_id`` or overlay).
    Saved folders and Hub repos must hold ``model.safetensors``: where timm would fall back to
    unpickling ``pytorch_model.bin``, this refuses.

    Args:
        model_name: As ``timm.create_model``; so are ``pretrained_cfg``, ``pretrained_cfg_overlay``,
            ``cache_dir`` and ``**kwargs``.
        allow_pickle: Accept a registry name's pickled weights (``file``, ``url`` or a ``.bin`` on the
            Hub without a safetensors twin), which timm reads with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: Naming the file and key at fault.
    """
    source, ident = parse_model_name(model_name)
    if source == "local-dir":
        check_folder(ident)
    elif source == "hf-hub":
        _hub_file(ident, WEIGHTS_NAME, cache_dir)  # same snapshot folder as the config below
        check_folder(_hub_file(ident, CONFIG_NAME, cache_dir).parent)
    else:
        _check_registry_weights(ident, pretrained_cfg, pretrained_cfg_overlay, cache_dir, kwargs,
                                allow_pickle)


def load_model(model_name: str, pretrained: bool = True, allow_pickle: bool = False,
               **kwargs: Any) -> nn.Module:
    """``timm.create_model`` preceded by :func:`check_pretrained` when ``pretrained``.

    timm would report a bad file without naming it, or, when the classifier is being replaced
    (``num_classes`` differs), load non-strictly and only log missing keys; and it would unpickle a
    folder or Hub repo that has ``pytorch_model.bin`` but no ``model.safetensors``.

    Args:
        model_name: ``local-dir:FOLDER``, ``hf-hub:ORG/NAME`` or a registered name.
        pretrained: Load the weights.
        allow_pickle: See :func:`check_pretrained`.
        **kwargs: ``timm.create_model`` keyword arguments (``num_classes``, ``in_chans``, ...).
    """
    if pretrained:
        check_pretrained(model_name, allow_pickle=allow_pickle, **kwargs)
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


