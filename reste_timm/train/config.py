"""Training configuration: argparse flags whose names are also the YAML keys.

Precedence is defaults < YAML file (``--config``) < command line. ``--config`` takes a path or the
name of a config shipped in the package (``cifar10/resnet20_1w1a_reste``; ``reste-timm configs``
lists them). YAML keys may be written with dashes or underscores (``data-path`` or ``data_path``); an
unknown key or a value of the wrong type exits with code 2 and one line naming the file, key and
value, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..files import first_line

__all__ = ["ConfigError", "build_parser", "packaged_configs", "parse_config", "resolve_config",
           "validate_config"]

PROG = "reste-timm train"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """All flags of ``reste-timm train``; their dest names are the YAML keys."""
    p = _OneLineParser(prog=PROG, description="Train a binary timm model with ReSTE.")
    p.add_argument("--config", type=str, default=None,
                   help="YAML file of flags: a path, or a packaged name such as cifar10/resnet20_1w1a_reste")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="resnet20_1w1a_reste")
    g.add_argument("--estimator", type=str, default="reste", help="sign estimator of the binary convs")
    g.add_argument("--o-end", type=float, default=3.0, help="final ReSTE exponent")
    g.add_argument("--anneal", choices=("epoch", "step"), default="epoch", help="when o moves")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    g.add_argument("--init", type=str, default=None,
                   help="start from pretrained weights: a model name, hf-hub:ID or local-dir:PATH")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="digits",
                   help="digits | cifar10-py | imagefolder | parquet | arrow | a Hub dataset id")
    g.add_argument("--data-path", type=str, default=None)
    g.add_argument("--image-column", type=str, default=None)
    g.add_argument("--label-column", type=str, default=None)
    g.add_argument("--train-split", type=str, default="train")
    g.add_argument("--val-split", type=str, default=None, help="default: validation, val or test")
    g.add_argument("--streaming", action="store_true", help="stream a Hub dataset (ImageNet scale)")
    g.add_argument("--recipe", choices=("cifar", "imagenet", "digits"), default=None,
                   help="augmentation recipe; default from the model's input size")
    g.add_argument("--data-on-device", action="store_true",
                   help="hold small datasets on the accelerator and augment there")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images, counted")
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--cpu-malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, keep freed activation memory in the process (reste_timm.allocator)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=256, help="per process")
    g.add_argument("--val-batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: what accelerate launch was given")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip batches whose loss is NaN/Inf (counted) instead of stopping")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=str, default=None, help="default: outputs/<config name>")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also save every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--report-to", choices=("tensorboard", "none"), default="tensorboard")
    g.add_argument("--cal-ind", action="store_true", help="record the paper's two indicators")
    g.add_argument("--push-to-hub", type=str, default=None, help="repo id to push the final weights to")
    g.add_argument("--stop-after-epochs", type=int, default=0,
                   help="end this job after N epochs (continue later with --resume); 0 runs them all")
    g.add_argument("--max-train-steps", type=int, default=0, help="stop each epoch early (debug)")
    return p


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line must stay one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit conversion limit
        return f"<an integer of {value.bit_length():,} bits>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    """Checks and converts one YAML value with the flag's own type and choices."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {_shown(value)}")
        return value
    if value is None:
        if action.default is not None:  # `epochs:` left empty: no value for a flag that needs one
            expected = getattr(action.type, "__name__", "a value")  # a flag of choices has no type
            raise ConfigError(f"{where}: no value given (expected {expected}, default {action.default!r})")
        return None
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {_shown(value)}")
    if isinstance(value, bool) or (action.type is int and not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {'an integer' if action.type is int else 'a value'}, "
                          f"got {_shown(value)}")
    try:
        # float("1e-4") matters: YAML 1.1 reads an exponent without a dot as a string.
        value = action.type(value) if action.type is not None else value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: invalid {action.type.__name__} value {_shown(value)}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {_shown(value)} is not one of {', '.join(map(str, action.choices))}")
    return value


def packaged_configs() -> Dict[str, Path]:
    """The configs shipped in the package, by name (``cifar10/resnet20_1w1a_reste``), sorted."""
    root = Path(str(importlib.resources.files("reste_timm.configs")))
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.glob("*/*.yaml"))}


def resolve_config(value: str) -> Path:
    """A config file: ``value`` itself when it is a file, else the packaged config of that name.

    ``configs/cifar10/resnet20_1w1a_reste.yaml``, ``cifar10/resnet20_1w1a_reste.yaml`` and
    ``cifar10/resnet20_1w1a_reste`` all name the same packaged file when no such path exists.

    Raises:
        ConfigError: Neither a file nor a packaged name.
    """
    path = Path(value)
    if path.is_file():
        return path
    name = value.removeprefix("configs/").removesuffix(".yaml")
    found = packaged_configs().get(name)
    if found is None:
        raise ConfigError(f"{value}: config file not found (give a path, or a packaged name: "
                          "`reste-timm configs` lists them)")
    return found


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Reads a YAML config into ``{dest: value}``, rejecting unknown keys and bad values."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # PyYAML's int() refuses 4,300+ digits
        raise ConfigError(f"{path}: not valid YAML ({_shown(first_line(e), 120)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"{path}: unknown key {_shown(str(key))}")
        values[dest] = _yaml_value(actions[dest], value, f"{path}: key '{key}'")
    return values


def parse_config(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses defaults < YAML < command line, then checks values; exits 2 on the first bad one."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    from_yaml: Dict[str, Any] = {}
    if known.config:
        try:
            known.config = str(resolve_config(known.config))
            from_yaml = load_yaml_defaults(parser, known.config)
        except ConfigError as e:
            parser.error(str(e))
        parser.set_defaults(**from_yaml, config=known.config)
    args = parser.parse_args(argv)
    args.config = known.config  # the resolved file, whichever way it was named
    _fit_warmup(args, from_yaml.get("epochs"))
    try:
        validate_config(args)
    except ConfigError as e:
        parser.error(str(e))
    if args.output_dir is None:
        name = Path(args.config).stem if args.config else args.model
        args.output_dir = str(Path("outputs") / name)
    return args


def _fit_warmup(args: argparse.Namespace, config_epochs: Optional[int]) -> None:
    """Scales the warm-up when ``--epochs`` is set at or below it (a shortened run), saying so once.

    The warm-up keeps its share of the config's epochs (CIFAR: 5 of 1000), rounded down and below
    ``epochs``: shortening a run is the first thing people do, and the warm-up would make it invalid.
    """
    if not (isinstance(args.epochs, int) and 0 < args.epochs <= args.warmup_epochs):
        return
    old, base = args.warmup_epochs, config_epochs or args.warmup_epochs
    args.warmup_epochs = min(old * args.epochs // max(base, 1), args.epochs - 1)
    if int(os.environ.get("RANK", "0")) == 0:  # once under accelerate launch
        print(f"{PROG}: warmup_epochs {old} >= epochs {args.epochs}: warm-up scaled to {args.warmup_epochs} "
              f"epoch(s) ({old} of the config's {base} epochs)", file=sys.stderr, flush=True)


def _checks(args: argparse.Namespace) -> List[tuple]:
    return [
        ("epochs", args.epochs > 0, "must be > 0"),
        ("batch_size", args.batch_size > 0, "must be > 0"),
        ("val_batch_size", args.val_batch_size > 0, "must be > 0"),
        ("grad_accum", args.grad_accum > 0, "must be > 0"),
        ("lr", args.lr >= 0, "must be >= 0"),
        ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
        ("o_end", args.o_end >= 1.0, "must be >= 1"),
        ("warmup_epochs", 0 <= args.warmup_epochs < args.epochs, "must be in [0, epochs)"),
        ("workers", args.workers >= 0, "must be >= 0"),
        ("checkpoint_every", args.checkpoint_every >= 0, "must be >= 0"),
        # a checkpoint between the micro-batches of one optimizer step would lose their gradients
        ("checkpoint_every", args.checkpoint_every % max(args.grad_accum, 1) == 0,
         f"must be a multiple of grad_accum ({args.grad_accum})"),
        ("stop_after_epochs", args.stop_after_epochs >= 0, "must be >= 0"),
        ("max_train_steps", args.max_train_steps >= 0, "must be >= 0"),
        ("num_classes", args.num_classes is None or args.num_classes > 0, "must be > 0"),
    ]


def validate_config(args: argparse.Namespace) -> None:
    """Semantic checks (ranges, known model, estimator and dataset)."""
    import timm

    from ..nn.estimators import list_estimators
    from .data import KNOWN_SOURCES, is_hub_dataset_id

    src = f"{args.config}: " if args.config else ""
    for key, ok, rule in _checks(args):
        if not ok:
            raise ConfigError(f"{src}key '{key}': {_shown(getattr(args, key))} {rule}")
    if not (args.model.startswith(("hf-hub:", "local-dir:")) or timm.is_model(args.model)):
        raise ConfigError(f"{src}key 'model': unknown model {_shown(args.model)}")
    if args.estimator.lower() not in list_estimators():
        raise ConfigError(f"{src}key 'estimator': unknown estimator {_shown(args.estimator)} "
                          f"(known: {', '.join(list_estimators())})")
    if args.dataset not in KNOWN_SOURCES and not is_hub_dataset_id(args.dataset):
        raise ConfigError(f"{src}key 'dataset': unknown dataset {_shown(args.dataset)} "
                          f"(known: {', '.join(KNOWN_SOURCES)} or a Hub id like org/name)")
    if args.dataset in ("cifar10-py", "imagefolder", "parquet", "arrow") and not args.data_path:
        raise ConfigError(f"{src}key 'data_path': required for dataset {_shown(args.dataset)}")
