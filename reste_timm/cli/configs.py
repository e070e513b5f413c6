"""``reste-timm configs``: the configs shipped in the package (one per row of the paper's tables).

    reste-timm configs                               # names and the paper row each reproduces
    reste-timm configs cifar10/resnet20_1w1a_reste   # print one, to copy and edit
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..train.config import ConfigError, packaged_configs, resolve_config


def _headline(text: str) -> str:
    """A config's first comment line, without the ``#``."""
    first = next((line for line in text.splitlines() if line.startswith("#")), "")
    return first.lstrip("# ").strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="reste-timm configs", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="print this config (a packaged name or a path)")
    args = parser.parse_args(argv)
    if args.name:
        try:
            print(resolve_config(args.name).read_text(), end="")
        except ConfigError as e:
            print(f"reste-timm configs: error: {e}", file=sys.stderr)
            return 2
        return 0
    configs = packaged_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {_headline(path.read_text())}")
    print(f"\n{len(configs)} configs; train one with `reste-timm train --config NAME`")
    return 0
