"""``reste-timm study``: accuracy and the paper's indicators for several estimators, side by side.

Trains one model on one dataset with STE, ApproxSign, EDE and ReSTE at several ``o_end``, over several
seeds, each run with ``--cal-ind`` (one ``reste-timm train`` process per run), then writes
``study.md`` (table), ``study.json`` and ``study_scatter.png`` (mean estimating error against summed
gradient stability) and ``estimators.png``.

    reste-timm study                                  # ResNet-20 1W/1A on the digits
    reste-timm study --seeds 1 2 3 --o-ends 1 2 3 --epochs 20
    reste-timm study --output-dir outputs/study --report-dir docs/study
    reste-timm study --epochs 1 --max-train-steps 2   # unknown flags go to reste-timm train
    reste-timm study --report-only                    # rebuild the report from finished runs

A run whose folder already holds ``results.json`` from the same train command is reused, so an
interrupted study continues where it stopped when run again (``--rerun`` trains everything anew).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from ..analysis.plotting import plot_estimators, plot_study
from ..analysis.study import (
    STAMP,
    RunSpec,
    aggregate,
    collect_runs,
    config_label,
    load_run,
    plan_runs,
    write_study,
)
from ..nn.estimators import list_estimators
from ..train.config import resolve_config

# Flags that the study sets itself per run; passing them through would silently break the plan.
_RESERVED = ("--estimator", "--o-end", "--seed", "--output-dir", "--resume", "--report-to")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: train's --seed, --o-end, --estimator must not pass for --seeds, --o-ends, ...
    p = argparse.ArgumentParser(prog="reste-timm study", description=__doc__.splitlines()[0],
                                allow_abbrev=False,
                                epilog="Unknown flags (or everything after --) go to reste-timm train.")
    p.add_argument("--config", default="digits/resnet20_1w1a_reste",
                   help="train config: a packaged name or a path")
    p.add_argument("--model", default=None, help="default: the config's")
    p.add_argument("--dataset", default=None, help="default: the config's")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--o-ends", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0],
                   help="ReSTE's final exponents")
    p.add_argument("--estimators", nargs="+", default=["ste", "approxsign", "ede", "reste"])
    p.add_argument("--baseline-o-end", type=float, default=1.0,
                   help="o of the estimating error for the estimators without exponent (1: ||w - sign w||)")
    p.add_argument("--output-dir", default="outputs/study", help="run folders (checkpoints, weights)")
    p.add_argument("--report-dir", default=None, help="study.md, study.json, PNGs (default: --output-dir)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (threads split over them)")
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--report-only", action="store_true", help="no training: report the finished runs")
    p.add_argument("--note", action="append", default=[], help="a line to add to study.md's notes")
    return p


def parse_args(argv=None):
    """The study's options and the flags passed through to reste-timm train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    passthrough = unknown + tail
    # train accepts abbreviated flags too: --est would still override the study's --estimator.
    reserved = [f for f in passthrough if f.startswith("--")
                and any(r.startswith(f.split("=", 1)[0]) for r in _RESERVED)]
    if reserved:
        parser.error(f"{', '.join(reserved)}: set by the study itself, cannot be passed through")
    bad = [e for e in args.estimators if e.lower() not in list_estimators()]
    if bad:
        parser.error(f"unknown estimator(s) {', '.join(bad)} (known: {', '.join(list_estimators())})")
    try:
        args.config = str(resolve_config(args.config))
    except ValueError as e:
        parser.error(str(e))
    if args.jobs < 1 or args.epochs < 1 or min(args.o_ends) < 1.0 or args.baseline_o_end < 1.0:
        parser.error("--jobs and --epochs must be >= 1, o_end values >= 1")
    return args, passthrough


def train_command(args, passthrough, spec: RunSpec, run_dir: Path) -> list:
    """The train command's arguments for one run (the interpreter is added when it runs)."""
    cmd = ["-m", "reste_timm", "train", "--config", args.config, "--epochs", str(args.epochs),
           "--estimator", spec.estimator, "--o-end", f"{spec.o_end:g}", "--seed", str(spec.seed),
           "--cal-ind", "--report-to", "none", "--output-dir", str(run_dir)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--dataset", args.dataset] if args.dataset else []
    return cmd + passthrough


def run_one(cmd: list, run_dir: Path, threads: int, rerun: bool) -> tuple:
    """Trains one run (or reuses it); returns (status, seconds, log tail); status: ok, reused, failed.

    ``study_run.json`` records the train command and its wall time once the run has finished: a
    run is reused only when that command is the same and ``results.json`` exists.
    """
    stamp = run_dir / STAMP
    if not rerun and (run_dir / "results.json").is_file() and stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous.get("command") == cmd:
            return "reused", previous.get("seconds") or 0.0, ""
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    (run_dir / "results.json").unlink(missing_ok=True)  # a failed rerun must not pass as finished
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        rc = subprocess.run([sys.executable, *cmd], env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - start, 1)
    if rc != 0:
        return "failed", seconds, (run_dir / "train.log").read_text()[-3000:]
    stamp.write_text(json.dumps({"command": cmd, "seconds": seconds}))
    return "ok", seconds, ""


def run_all(args, passthrough, specs, out: Path) -> None:
    """Runs every spec, ``--jobs`` at a time; stops scheduling at the first failure.

    Raises:
        SystemExit: a run failed (its log's tail is printed first).
    """
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    failed = None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, train_command(args, passthrough, s, out / s.folder), out / s.folder,
                               threads, args.rerun): s for s in specs}
        for done, future in enumerate(as_completed(futures), start=1):
            spec = futures[future]
            status, seconds, tail = future.result()
            name = f"{config_label(spec.estimator, spec.o_end)} seed {spec.seed}"
            print(f"[{done}/{len(specs)}] {name}: {status} ({seconds:.0f} s)", flush=True)
            if status == "failed" and failed is None:
                failed = spec
                print(f"{out / spec.folder / 'train.log'} ends with:\n{tail}", file=sys.stderr, flush=True)
                for other in futures:
                    other.cancel()  # runs not yet started; the running ones finish
    if failed is not None:
        raise SystemExit(f"reste-timm study: error: {failed.folder} failed; fix it and run the same command "
                         "again (finished runs are reused)")


def report(runs, report_dir: Path, meta: dict) -> list:
    """Writes study.md, study.json and the figures; returns their paths."""
    rows = aggregate(runs)
    paths = write_study(report_dir, rows, runs, meta)
    try:
        epochs = "/".join(str(e) for e in meta["epochs"])
        title = f"{meta['model']} on {meta['dataset']}: {epochs} epochs, seeds {meta['seeds']}"
        paths.append(plot_study(rows, report_dir / "study_scatter.png", title=title))
        paths.append(plot_estimators(report_dir / "estimators.png"))
    except (ImportError, ValueError) as e:  # no matplotlib, or runs without indicators
        print(f"reste-timm study: no figures: {e}", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    out = Path(args.output_dir)
    report_dir = Path(args.report_dir or args.output_dir)
    specs = plan_runs(args.estimators, args.o_ends, args.seeds, args.baseline_o_end)
    start = time.perf_counter()
    if not args.report_only:
        run_all(args, passthrough, specs, out)
    runs = collect_runs(out) if args.report_only else [load_run(out / s.folder) for s in specs]
    first = runs[0] if runs else {}
    meta = {"model": first.get("model"), "dataset": first.get("dataset"),
            "epochs": sorted({r["epochs"] for r in runs}),
            "seeds": sorted({r["seed"] for r in runs}), "config": args.config,
            "baseline_o_end": args.baseline_o_end, "passthrough": passthrough, "notes": args.note,
            "command": shlex.join(["reste-timm", "study", *(sys.argv[1:] if argv is None else argv)]),
            "host": f"{platform.machine()}, {os.cpu_count()} CPU threads visible",
            "wall_s": None if args.report_only else round(time.perf_counter() - start, 1)}
    if not runs:
        print(f"reste-timm study: error: no finished run under {out}", file=sys.stderr)
        return 1
    for path in report(runs, report_dir, meta):
        print(path)
    return 0

