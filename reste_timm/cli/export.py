"""``reste-timm export``: write a saved model in another format.

    reste-timm export --checkpoint outputs/x/final --format packed --out packed/        # 1-bit folder
    reste-timm export --checkpoint packed/ --format safetensors --out float/            # float folder
    reste-timm export --checkpoint outputs/x/final --format onnx --out model.onnx      # ONNX Runtime
    reste-timm export --checkpoint outputs/x/final --format pt2 --out model.pt2        # torch.export
    reste-timm export --checkpoint outputs/x/final --format deploy --out deployed/     # bitwise inference

Formats: ``safetensors`` (a folder timm loads, float32 weights), ``packed`` (sign bits plus one scale
per binary conv; timm loads it too), ``onnx`` (one file, opset 18, dynamic batch, binary weights as
int8 signs), ``pt2`` (a ``torch.export`` program, the same graph) and ``deploy`` (a packed folder with
float32 non-binary tensors, checked to run on this machine's bitwise kernel:
``reste_timm.load_packed(FOLDER, deploy=True)`` loads it for inference). The checkpoint is a saved
folder, ``local-dir:``, ``hf-hub:`` or a registered name. Exit code 2 and one line naming the file
for a bad checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..deployment.bitwise import bitwise_available
from ..deployment.export import ONNX_OPSET, export_onnx, export_pt2, input_size_of
from ..deployment.networks import load_packed
from ..files import CheckpointError
from ..hub.packed import export_packed
from ..hub.save import save_pretrained
from .models import load_source

PROG = "reste-timm export"


def _safetensors(model: nn.Module, args) -> str:
    return str(save_pretrained(model, args.out))


def _packed(model: nn.Module, args) -> str:
    return str(export_packed(model, args.out, float_dtype=args.float_dtype))


def _onnx(model: nn.Module, args) -> str:
    return str(export_onnx(model, args.out, input_size=args.input_size, opset=args.opset))


def _pt2(model: nn.Module, args) -> str:
    return str(export_pt2(model, args.out, input_size=args.input_size))


def _deploy(model: nn.Module, args) -> str:
    folder = export_packed(model, args.out, float_dtype="float32")
    size = input_size_of(model, args.input_size) or (3, 32, 32)
    deployed = load_packed(folder, deploy=True)
    with torch.no_grad():  # the folder deploys here, and predicts as the model it came from
        x = torch.randn(1, *size)
        same = bool((deployed(x).argmax(1) == model.float()(x).argmax(1)).all())
    kind = "bitwise" if bitwise_available() else "float: no C compiler for the bitwise kernel"
    return (f"{folder} ({kind} inference, same top-1 as the source: {same}); load it with "
            f"reste_timm.load_packed({str(folder)!r}, deploy=True)")


FORMATS: Dict[str, Callable[[nn.Module, argparse.Namespace], str]] = {
    "safetensors": _safetensors,
    "packed": _packed,
    "onnx": _onnx,
    "pt2": _pt2,
    "deploy": _deploy,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="saved folder, local-dir:, hf-hub: or model name")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="output folder (or file for single-file formats)")
    parser.add_argument("--float-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="packed: dtype of the non-binary tensors")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="onnx, pt2, deploy: the (traced, checked) input's size (default: the model's "
                             "pretrained_cfg)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="onnx: opset version (>= 17)")
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
