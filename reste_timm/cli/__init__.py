"""The ``reste-timm`` command (also ``python -m reste_timm``): one subcommand per task.

    reste-timm train --config digits/resnet20_1w1a_reste          # or under accelerate launch -m reste_timm
    reste-timm validate --model local-dir:outputs/x/final --dataset digits
    reste-timm export --checkpoint outputs/x/final --format onnx --out model.onnx

Each subcommand is a module with ``main(argv) -> exit code``, imported only when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

from ..version import __version__

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line description)
COMMANDS = {
    "train": ("reste_timm.train.run", "train a model from a config, alone or under accelerate launch"),
    "validate": ("reste_timm.cli.validate", "top-1/top-5 of a model on a dataset's validation split"),
    "export": ("reste_timm.cli.export", "a saved model as safetensors, packed bits, ONNX, pt2 or deploy"),
    "push": ("reste_timm.cli.push", "upload a saved model folder to the Hugging Face Hub"),
    "convert": ("reste_timm.cli.convert", "a reference-implementation checkpoint into a model folder"),
    "summary": ("reste_timm.cli.summary", "per-layer bit-widths, parameters, memory and MACs"),
    "configs": ("reste_timm.cli.configs", "list the packaged configs, or print one"),
    "plot": ("reste_timm.cli.plot", "draw a run's training curves"),
    "study": ("reste_timm.cli.study", "train several estimators and tabulate the paper's indicators"),
}


def _usage() -> str:
    lines = [f"usage: reste-timm <command> [options]   (reste-timm {__version__})", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`reste-timm <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``reste-timm <command> ...``; returns the command's exit code (2 for a bad command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"reste-timm {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"reste-timm: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        code = module.main(argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, rather than at exit
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """The reader of stdout went away (``reste-timm configs | head``): stop quietly, as Unix tools do.

    Python's own advice for this case: point stdout at /dev/null so that the flush at exit cannot raise
    a second time, and exit 1 (there is no traceback to show: nothing went wrong in the command).
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
