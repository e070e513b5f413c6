"""``reste-timm plot``: write a run's training-curve PNGs into its folder and print their paths.

    reste-timm plot outputs/resnet20_1w1a_reste
    reste-timm plot outputs/resnet20_1w1a_reste --estimators   # also estimators.png
    reste-timm plot docs/figures --estimators                   # only the estimator figure

Needs the optional extra ``plot`` (matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..analysis.plotting import plot_estimators, plot_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reste-timm plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (with metrics.jsonl), or any folder with --estimators")
    parser.add_argument("--estimators", action="store_true",
                        help="also write the estimator figure (ReSTE F_o and its gradient beside STE)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    has_metrics = (run_dir / "metrics.jsonl").is_file()
    if not has_metrics and not args.estimators:
        print(f"reste-timm plot: error: {run_dir / 'metrics.jsonl'} not found", file=sys.stderr)
        return 2
    try:
        paths = plot_run(run_dir) if has_metrics else []
        if args.estimators:
            paths.append(plot_estimators(run_dir / "estimators.png"))
    except (ImportError, ValueError) as e:
        print(f"reste-timm plot: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

