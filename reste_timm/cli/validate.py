"""``reste-timm validate``: top-1/top-5 of a model on a dataset's validation split.

    reste-timm validate --model resnet20_1w1a_reste --checkpoint outputs/x/final --dataset digits
    reste-timm validate --model hf-hub:someone/my-bnn --dataset uoft-cs/cifar10
    reste-timm validate --model local-dir:outputs/x/final --dataset digits --json results.json

``--checkpoint`` takes a saved folder (model.safetensors + config.json) or a ``.safetensors`` file.
A pickled checkpoint (``.pth``, ``.pth.tar``, ``.bin``) can run code when loaded, so it is refused
unless ``--allow-pickle`` is given; even then it is read with ``torch.load(weights_only=True)``.
Folders and Hub repos are checked before loading (:func:`reste_timm.hub.load_model`) and must hold
``model.safetensors``. Exit code 2 and one line naming the file for a bad checkpoint or dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from ..files import PICKLE_SUFFIXES, CheckpointError, first_line
from ..hub.check import load_model as load_checked
from ..train.data import (
    DataError,
    ImageTransform,
    build_transforms,
    collate_images,
    default_recipe,
    load_splits,
)
from ..train.loop import evaluate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reste-timm validate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model name, hf-hub:ID or local-dir:PATH")
    p.add_argument("--checkpoint", default=None, help="folder or .safetensors file of weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickled checkpoint (.pth/.tar/.bin), read with weights_only=True")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-path", default=None)
    p.add_argument("--image-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--val-split", default=None)
    p.add_argument("--recipe", choices=("cifar", "imagenet", "digits"), default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", default=None, help="where to write the results (default: print only)")
    return p.parse_args(argv)


def read_state_dict(path: Path, allow_pickle: bool) -> dict:
    """Weights from a .safetensors file, or (with ``--allow-pickle``) a reference-style pickle.

    Raises:
        CheckpointError: An unreadable file, or a pickle that ``weights_only`` refuses (one line).
        ValueError: A pickle without ``--allow-pickle``, or an unknown format.
    """
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(path, None, f"unreadable, truncated or corrupt: {first_line(e)}") from None
    if path.name.endswith(PICKLE_SUFFIXES) or path.name.endswith(".pth.tar"):
        if not allow_pickle:
            raise ValueError(f"{path}: refusing to unpickle a checkpoint (a pickle can run code when "
                             "loaded); pass --allow-pickle to read it with torch.load(weights_only=True), "
                             "or convert it with reste-timm convert")
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (unpickling errors have many types)
            raise CheckpointError(path, None, f"refused by torch.load(weights_only=True): {first_line(e)}") \
                from None
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        return {k.removeprefix("module."): v for k, v in state.items()}
    raise ValueError(f"{path}: unknown checkpoint format (expected a folder, .safetensors or .pth)")


def load_model(args, num_classes: int) -> torch.nn.Module:
    """The model of ``--model`` with the weights of ``--checkpoint`` (strictly matched) if given."""
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.is_dir():
        return load_checked(f"local-dir:{ckpt}")
    if ckpt is not None and not ckpt.exists():
        raise ValueError(f"{ckpt}: checkpoint not found")
    if ckpt is None:
        if args.model.startswith(("hf-hub:", "local-dir:")):
            return load_checked(args.model)
        return timm.create_model(args.model, num_classes=num_classes)
    state = read_state_dict(ckpt, args.allow_pickle)
    model = timm.create_model(args.model, num_classes=num_classes)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{ckpt}: keys do not match {args.model}: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator()
    try:
        splits = load_splits(args.dataset, args.data_path, args.image_column, args.label_column,
                             val_split=args.val_split)
        model = load_model(args, args.num_classes or splits.num_classes)
    except (DataError, ValueError, OSError, RuntimeError) as e:
        print(f"reste-timm validate: error: {e}", file=sys.stderr)
        return 2
    cfg = resolve_data_config(model=model)
    recipe = args.recipe or default_recipe(args.dataset, cfg["input_size"])
    _, val_tf = build_transforms(recipe, cfg["input_size"], cfg["mean"], cfg["std"],
                                 cfg.get("crop_pct", 0.875))
    splits.val.set_transform(ImageTransform(val_tf, splits.image_column, splits.label_column,
                                            splits.num_classes))
    loader = DataLoader(splits.val, batch_size=args.batch_size, collate_fn=collate_images)
    model, loader = accelerator.prepare(model, loader)
    try:
        measured = evaluate(model, loader, accelerator)
    except DataError as e:  # an unreadable image or a label outside the classes, named
        print(f"reste-timm validate: error: {e}", file=sys.stderr)
        return 2
    result = dict(model=args.model, checkpoint=args.checkpoint, dataset=args.dataset, **measured)
    accelerator.print(f"top-1 {result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}%  "
                      f"({result['val_count']} images)")
    if args.json and accelerator.is_main_process:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0

