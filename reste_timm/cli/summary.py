"""``reste-timm summary``: per-layer bit-widths, parameters, memory and multiply-accumulates.

    reste-timm summary resnet18_1w1a_reste                     # the architecture
    reste-timm summary outputs/x/final --input-size 3 32 32   # a saved model, another input size
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..analysis.summary import summary
from ..files import CheckpointError
from .models import load_source

PROG = "reste-timm summary"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a registered name, a saved folder, local-dir:PATH or hf-hub:ID")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="image size for the MAC counts (default: the model's pretrained_cfg)")
    parser.add_argument("--float-bits", type=int, choices=(16, 32), default=16,
                        help="bits per non-binary parameter in the packed memory column")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    try:
        model = load_source(args.model, pretrained=False)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = summary(model, float_bits=args.float_bits, input_size=args.input_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
