"""``reste-timm export``: write a saved model in another format.

    reste-timm export --checkpoint outputs/x/final --format packed --out packed/        # 1-bit folder
    reste-timm export --checkpoint packed/ --format safetensors --out float/            # float folder

Formats: ``safetensors`` (a folder timm loads, float32 weights), ``packed`` (sign bits plus one scale
per binary conv; timm loads it too). The checkpoint is a saved folder, ``local-dir:``, ``hf-hub:`` or a
registered name. Exit code 2 and one line naming the file for a bad checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Optional, Sequence

import torch.nn as nn

from ..files import CheckpointError
from ..hub.packed import export_packed
from ..hub.save import save_pretrained
from .models import load_source

PROG = "reste-timm export"


def _safetensors(model: nn.Module, args) -> str:
    return str(save_pretrained(model, args.out))


def _packed(model: nn.Module, args) -> str:
    return str(export_packed(model, args.out, float_dtype=args.float_dtype))


FORMATS: Dict[str, Callable[[nn.Module, argparse.Namespace], str]] = {
    "safetensors": _safetensors,
    "packed": _packed,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="saved folder, local-dir:, hf-hub: or model name")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="output folder (or file for single-file formats)")
    parser.add_argument("--float-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="packed: dtype of the non-binary tensors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_source(args.checkpoint).eval()
        written = FORMATS[args.format](model, args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
