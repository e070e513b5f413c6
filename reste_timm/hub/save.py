"""Saving and sharing ReSTE models in timm's Hugging Face Hub format.

A saved model is a folder with ``model.safetensors`` (never a pickle), ``config.json`` in timm's
layout (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``, ``model_args``) and a
``README.md`` model card. Loading goes through timm itself::

    import reste_timm  # registers the architectures
    timm.create_model("local-dir:FOLDER", pretrained=True)
    timm.create_model("hf-hub:reste-timm/resnet20_1w1a_reste.cifar10", pretrained=True)
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import safetensors.torch
import timm
import torch.nn as nn
from huggingface_hub import HfApi
from timm.models import resolve_pretrained_cfg, split_model_name_tag
from timm.models._hub import save_config_for_hf

from ..files import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, PathLike, save_files
from ..nn.layers import binary_layers
from .card import render_model_card
from .check import check_folder

__all__ = ["binary_model_args", "push_folder", "push_to_hub", "save_pretrained"]


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
        # a Path: timm 1.0.16 to 1.0.30 call config_path.open() on it
        save_config_for_hf(model, Path(tmp, CONFIG_NAME), model_args=model_args)
        config = json.loads(Path(tmp, CONFIG_NAME).read_text(encoding="utf-8"))
    if "in_chans" in model_args:  # keep the data config consistent with the stem timm cannot see
        config["pretrained_cfg"]["input_size"][0] = model_args["in_chans"]
    return config


def save_pretrained(model: nn.Module, folder: PathLike, metrics: Optional[Mapping[str, Any]] = None,
                    train_config: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                    model_name: Optional[str] = None, **card_kwargs: Any) -> Path:
    """Saves a model as a folder that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads.

    Writes ``model.safetensors``, ``README.md`` and ``config.json`` into a staging folder inside
    ``folder``, checks that with :func:`check_folder`, and only then renames the files into place,
    ``config.json`` last (:func:`reste_timm.files.save_files`). A full disk, an interrupt or a bad
    model therefore leaves a folder that was saved before exactly as it was, still loadable.

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

    Raises:
        WriteError: A file could not be written (full disk...), named; the folder is unchanged.
        CheckpointError: The saved files would not load back (the folder is unchanged).
    """
    with _export_cfg(model, model_name) as cfg:  # everything is prepared before the folder is touched
        config = _export_config(model, _model_args(model, cfg))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = render_model_card(config, metrics=metrics, train_config=train_config, dataset=dataset,
                             **card_kwargs)
    config_text = json.dumps(config, indent=2)
    return save_files(folder, {
        WEIGHTS_NAME: lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"format": "pt"}),
        CARD_NAME: lambda p: p.write_text(card, encoding="utf-8"),
        CONFIG_NAME: lambda p: p.write_text(config_text, encoding="utf-8"),  # last: marks it complete
    }, check=check_folder)


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
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metrics=metrics, train_config=train_config,
                        **{"repo_id": repo_id, **kwargs})
        return push_folder(tmp, repo_id, private=private, revision=revision, commit_message=commit_message,
                           token=token, create_pr=create_pr)


def push_folder(folder: PathLike, repo_id: str, private: Optional[bool] = None,
                revision: Optional[str] = None, commit_message: str = "Add ReSTE model",
                token: Optional[str] = None, create_pr: bool = False):
    """Uploads a folder that :func:`save_pretrained` (or training) wrote, after checking it.

    Only the saved model's files are sent (``model.safetensors``, ``config.json``, ``README.md``).
    ``reste-timm push FOLDER REPO`` runs this; it is also how a failed upload at the end of training
    is retried.

    Args:
        folder: The saved folder.
        repo_id: ``org/name`` on the Hub (created if missing); the other arguments as :func:`push_to_hub`.

    Returns:
        The ``CommitInfo`` of the upload.

    Raises:
        CheckpointError: The folder is not a complete, loadable saved model.
    """
    check_folder(folder)
    api = HfApi(token=token, library_name="timm", library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=commit_message, create_pr=create_pr,
                             allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
