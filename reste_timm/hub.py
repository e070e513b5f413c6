"""Saving, sharing and checking ReSTE models in timm's Hugging Face Hub format.

A saved model is a folder with ``model.safetensors`` (never a pickle), ``config.json`` in timm's
layout (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``, ``model_args``) and a
``README.md`` model card. Loading goes through timm itself::

    import reste_timm  # registers the architectures
    timm.create_model("local-dir:FOLDER", pretrained=True)
    timm.create_model("hf-hub:reste-timm/resnet20_1w1a_reste.cifar10", pretrained=True)

:func:`load_model` is the same call preceded by :func:`check_pretrained`, which turns a bad file
into one :class:`CheckpointError` naming the file and the key instead of a partial load.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from timm.models import parse_model_name, resolve_pretrained_cfg, split_model_name_tag
from timm.models._hub import hf_split, load_model_config_from_path, save_config_for_hf
from timm.models._pretrained import PretrainedCfg

from ._card import render_model_card
from .layers import binary_layers
from .packing import PackedFormatError, is_packed, unpack_state_dict, unpacked_shapes

__all__ = [
    "CheckpointError", "binary_model_args", "check_folder", "check_pretrained", "convert_official_checkpoint",
    "load_model", "push_to_hub", "render_model_card", "save_pretrained", "strict_pretrained_filter",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PathLike = Union[str, os.PathLike]
# Weight files that timm would read with torch.load (a pickle) when no safetensors file is there.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".tar", ".ckpt", ".pkl")
PICKLE_REFUSED = ("not a .safetensors file: refusing to unpickle weights (a pickle can run code when "
                  "loaded); convert them to safetensors, or pass allow_pickle=True to read them with "
                  "torch.load(weights_only=True)")


class CheckpointError(ValueError):
    """A saved model (folder, Hub file or checkpoint) that cannot be loaded as it is.

    Attributes:
        file: The offending file (or folder).
        key: The config or state-dict key at fault, when there is one.
        problem: What is wrong with it.
    """

    def __init__(self, file: PathLike, key: Optional[str], problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{file} [{key}]" if key else str(file)
        super().__init__(f"{where}: {problem}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------- writing

def _fsync_dir(folder: Path) -> None:
    # Makes the renames durable; not every platform can open a directory (Windows), which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temp file in the same folder, fsync and ``os.replace``.

    A crash leaves either the old file or the new one, never a truncated one under the real name.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared model folder should be readable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def binary_model_args(model: nn.Module) -> Dict[str, Any]:
    """``estimator`` and ``binarize_input`` read from the model's binary layers (``{}`` for FP models).

    Read from the layers rather than from the construction kwargs, so that a model built with the
    defaults, or changed after construction, is saved as it really is.

    Raises:
        ValueError: The binary layers disagree, which ``model_args`` cannot express.
    """
    settings = {(layer.estimator, layer.binarize_input) for layer in binary_layers(model)}
    if len(settings) > 1:
        raise ValueError(f"binary layers mix estimator/binarize_input settings {sorted(settings)}; "
                         "config.json can hold only one")
    if not settings:
        return {}
    estimator, binarize_input = settings.pop()
    return {"estimator": estimator, "binarize_input": binarize_input}


@contextlib.contextmanager
def _export_cfg(model: nn.Module, model_name: Optional[str]):
    """Gives the model the pretrained_cfg that timm's exporter reads, restoring the old one after."""
    missing = object()
    old = model.__dict__.get("pretrained_cfg", missing)
    if model_name is None and old is missing:
        raise ValueError("the model has no pretrained_cfg (not built by timm.create_model): pass model_name=")
    if model_name is not None:
        name, tag = split_model_name_tag(model_name)
        if not timm.is_model(name):
            raise ValueError(f"unknown architecture {name!r}: not registered with timm")
        model.pretrained_cfg = resolve_pretrained_cfg(name, tag or None).to_dict()
    try:
        yield model.pretrained_cfg
    finally:
        if old is missing:
            del model.pretrained_cfg
        else:
            model.pretrained_cfg = old


def _model_args(model: nn.Module, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    args = binary_model_args(model)
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        # Our models keep no ``in_chans`` attribute, so timm would record the source cfg's 3 channels.
        args["in_chans"] = model.get_submodule(first_conv).in_channels
    if isinstance(getattr(model, "global_pool_type", None), str):
        args["global_pool"] = model.global_pool_type  # VGG-small's head is not a timm pool module
    return args


def _export_config(model: nn.Module, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """config.json content, written by timm's own exporter."""
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, os.path.join(tmp, CONFIG_NAME), model_args=model_args)
        config = json.loads(Path(tmp, CONFIG_NAME).read_text(encoding="utf-8"))
    if "in_chans" in model_args:  # keep the data config consistent with the stem timm cannot see
        config["pretrained_cfg"]["input_size"][0] = model_args["in_chans"]
    return config


def save_pretrained(model: nn.Module, folder: PathLike, metrics: Optional[Mapping[str, Any]] = None,
                    train_config: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                    model_name: Optional[str] = None, **card_kwargs: Any) -> Path:
    """Saves a model as a folder that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads.

    Writes ``model.safetensors``, ``README.md`` and, last, ``config.json``: the config is removed first
    and written only once the rest is on disk, then the folder is checked with :func:`check_folder`, so
    an interrupted or bad save never leaves a folder that passes for a good one.

    Args:
        model: The model; estimator and binarize_input are read from its binary layers.
        folder: Target folder (created if needed; files of the same names are replaced).
        metrics: Measured results, e.g. ``{"top1": 86.75}`` (percent); they go into the card.
        train_config: The training configuration, shown in the card.
        dataset: Hub dataset id; defaults from the pretrained tag (``cifar10``, ``imagenet-1k``).
        model_name: timm name (``arch`` or ``arch.tag``) of the weights; defaults to the model's
            pretrained_cfg, and is needed for a model not built by ``timm.create_model``.
        **card_kwargs: ``repo_id``, ``license``, ``description``, ``results_note``, extra ``tags``.

    Returns:
        The folder.
    """
    with _export_cfg(model, model_name) as cfg:  # everything is prepared before the folder is touched
        config = _export_config(model, _model_args(model, cfg))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = render_model_card(config, metrics=metrics, train_config=train_config, dataset=dataset,
                             **card_kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    _fsync_dir(folder)
    _atomic_write(folder / WEIGHTS_NAME,
                  lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(folder / CARD_NAME, lambda p: p.write_text(card, encoding="utf-8"))
    config_text = json.dumps(config, indent=2)
    _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(config_text, encoding="utf-8"))
    try:
        check_folder(folder)
    except CheckpointError:
        (folder / CONFIG_NAME).unlink(missing_ok=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------- sharing

def push_to_hub(model: nn.Module, repo_id: str, metrics: Optional[Mapping[str, Any]] = None,
                train_config: Optional[Mapping[str, Any]] = None, private: Optional[bool] = None,
                revision: Optional[str] = None, commit_message: str = "Add ReSTE model",
                token: Optional[str] = None, create_pr: bool = False, **kwargs: Any):
    """Saves the model with :func:`save_pretrained` into a temp folder and uploads exactly that folder.

    Args:
        model: The model.
        repo_id: ``org/name`` on the Hub (created if missing).
        metrics: Measured results for the card.
        train_config: Training configuration for the card.
        private: Visibility of a newly created repo (None: the Hub's default).
        revision: Branch to push to (created from main if missing).
        commit_message: Commit message.
        token: Hub token (default: the logged-in one).
        create_pr: Open a pull request instead of committing to the branch.
        **kwargs: Passed to :func:`save_pretrained` (``dataset``, ``model_name``, card fields).

    Returns:
        The ``CommitInfo`` of the upload (its ``commit_url``, ``oid``...).
    """
    api = HfApi(token=token, library_name="timm", library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    kwargs.setdefault("repo_id", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metrics=metrics, train_config=train_config, **kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)


# -------------------------------------------------------------------------------------------- checking

def _read_shapes(path: Path, allow_pickle: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of a weights file; safetensors is read from its header only.

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
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                # A packed export (export_packed) is checked as the state dict it unpacks to.
                return unpacked_shapes(shapes, f.get_tensor) if is_packed(f.metadata()) else shapes
        return {k: tuple(v.shape) for k, v in timm.models.load_state_dict(str(path)).items()}
    except PackedFormatError as e:
        raise CheckpointError(path, e.key, str(e)) from None
    except Exception as e:  # noqa: BLE001  (any reader error means an unreadable file)
        raise CheckpointError(path, None, f"unreadable, truncated or corrupt: {_first_line(e)}") from e


def _expected_shapes(name: str, pretrained_cfg: Mapping[str, Any], model_args: Mapping[str, Any],
                     config_file: PathLike) -> Dict[str, Tuple[int, ...]]:
    """State-dict shapes of the model that the config describes, built on the meta device (no memory)."""
    if not timm.is_model(name):
        raise CheckpointError(config_file, "architecture", f"unknown architecture {name!r}: not registered "
                              "with timm (is the plugin that defines it imported?)")
    try:
        PretrainedCfg(**pretrained_cfg)
    except TypeError as e:
        raise CheckpointError(config_file, "pretrained_cfg", _first_line(e)) from e
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, pretrained_cfg=dict(pretrained_cfg),
                                      **model_args)
    except Exception as e:  # noqa: BLE001  (a model that cannot be built from its config is a bad config)
        raise CheckpointError(config_file, "model_args", f"cannot build {name!r}: {_first_line(e)}") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(expected: Mapping[str, tuple], found: Mapping[str, tuple], file: PathLike, name: str,
             exempt: frozenset = frozenset()) -> None:
    expected = {k: v for k, v in expected.items() if k not in exempt}
    found = {k: v for k, v in found.items() if k not in exempt}
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(file, missing[0], f"missing key ({name} expects it; {len(missing)} missing)")
    extra = [k for k in found if k not in expected]
    if extra:
        raise CheckpointError(file, extra[0],
                              f"unexpected key ({name} has no such tensor; {len(extra)} extra)")
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise CheckpointError(file, key, f"shape {tuple(found[key])} but {name} expects {shape}")


def _names(value: Any) -> Tuple[str, ...]:
    """A pretrained_cfg module entry (``classifier``, ``first_conv``): None, a name or names."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def strict_pretrained_filter(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn`` that refuses partial loads inside ``timm.create_model`` itself.

    When ``num_classes`` differs from the checkpoint, timm loads non-strictly and only logs missing
    keys; this checks every key and shape first, except the classifier and the stem conv weight,
    which timm replaces or adapts afterwards.

    Raises:
        CheckpointError: Naming the weight source (folder, file or Hub id) and the key.
    """
    state_dict = unpack_state_dict(state_dict)  # a packed folder (export_packed) loads like a float one
    cfg = getattr(model, "pretrained_cfg", {})
    exempt = {f"{c}.{p}" for c in _names(cfg.get("classifier")) for p in ("weight", "bias")}
    exempt |= {f"{c}.weight" for c in _names(cfg.get("first_conv"))}
    source = cfg.get("file") or cfg.get("hf_hub_id") or "pretrained weights"
    _compare({k: tuple(v.shape) for k, v in model.state_dict().items()},
             {k: tuple(v.shape) for k, v in state_dict.items()}, source,
             cfg.get("architecture") or type(model).__name__, frozenset(exempt))
    return state_dict


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
    except KeyError as e:
        raise CheckpointError(config_file, str(e.args[0]), "missing entry") from e
    except (TypeError, AttributeError) as e:
        raise CheckpointError(config_file, None, f"malformed: {_first_line(e)}") from e
    for key in ("file", "source"):  # added by timm's parser, not part of the saved config
        pretrained_cfg.pop(key, None)
    expected = _expected_shapes(name, pretrained_cfg, model_args, config_file)
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
    except EntryNotFoundError as e:
        raise CheckpointError(f"hf-hub:{model_id}/{filename}", None, f"not found: {_first_line(e)}") from e


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
        found, where = {k: tuple(v.shape) for k, v in cfg["state_dict"].items()}, "pretrained_cfg.state_dict"
    elif cfg.get("file"):
        where = Path(cfg["file"])
        found = _read_shapes(where, allow_pickle)
    elif cfg.get("hf_hub_id"):
        where = _hub_weights(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), cache_dir, allow_pickle)
        found = _read_shapes(where, allow_pickle)
    elif cfg.get("url") and not allow_pickle:  # timm reads a URL with torch.load
        raise CheckpointError(cfg["url"], None, PICKLE_REFUSED)
    else:
        return  # a url with allow_pickle (timm downloads and checks it), or no weights: timm reports it
    # The weights must match the model of the cfg's own classes and channels; timm adapts them after.
    build_args = {k: v for k, v in kwargs.items() if k not in (
        "num_classes", "in_chans", "features_only", "out_indices", "feature_cls", "pretrained_model_args")}
    _compare(_expected_shapes(arch, cfg, build_args, f"pretrained_cfg of {arch}"), found, where, arch)


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


# Kept importable from here, where it lived first.
from .convert_official import convert_official_checkpoint  # noqa: E402
