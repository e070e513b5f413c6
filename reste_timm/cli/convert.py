"""``reste-timm convert``: a checkpoint of the ReSTE reference implementation into a timm model folder.

    reste-timm convert model_best.pth.tar --model resnet20_1w1a_reste --out out/r20
    reste-timm convert ckpt.pth.tar --model resnet20_1w32a_reste --out out/r20a32 \\
        --push-to-hub my-org/resnet20_1w32a_reste.cifar10

The reference saves 1W/1A and 1W/32A models with the same keys: ``--model`` chooses. Exit code 2
when the checkpoint cannot be read or does not match the model (one line on stderr names the key).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..files import CheckpointError
from ..hub.convert import convert_official_checkpoint


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reste-timm convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="reference .pth.tar (a dict with 'state_dict')")
    parser.add_argument("--model", required=True, help="registered model name, e.g. resnet20_1w1a_reste")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, card)")
    parser.add_argument("--push-to-hub", default=None, metavar="ID", help="also upload to this Hub repo")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: read from the checkpoint)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        convert_official_checkpoint(args.checkpoint, args.model, args.out, num_classes=args.num_classes,
                                    push_to_hub_id=args.push_to_hub)
    except CheckpointError as e:
        print(f"reste-timm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.model} to {args.out}" + (f" and {args.push_to_hub}" if args.push_to_hub else ""))
    return 0

