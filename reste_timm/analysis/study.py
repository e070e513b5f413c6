"""The estimator study (``reste-timm study``) without the training: plan, collect, aggregate, report.

A study trains one model with several estimators (STE, ApproxSign, EDE, and ReSTE at several
``o_end``) over several seeds, each run with ``--cal-ind``, and puts each configuration's accuracy
beside the paper's two indicators (docs/method.md, section 5). Everything here reads the files that
``reste-timm train`` writes into a run folder (``config.yaml``, ``metrics.jsonl``, ``results.json``),
so it can be tested on hand-made folders and rerun on finished runs without training again.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml

__all__ = ["RunSpec", "plan_runs", "config_label", "read_metrics", "load_run", "collect_runs", "aggregate",
           "render_table", "write_study", "TABLE_COLUMNS", "STAMP"]

DISPLAY = {"ste": "STE", "approxsign": "ApproxSign", "ede": "EDE", "reste": "ReSTE"}
_ORDER = ("ste", "approxsign", "ede", "reste")
STAMP = "study_run.json"  # written by the study into a finished run: its train command and time
TABLE_COLUMNS = ("Estimator", "o_end", "Seeds", "Epochs", "Top-1 (%)", "Mean est. error",
                 "Summed grad. stability")


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study.

    Attributes:
        estimator: Registered estimator name.
        o_end: Final exponent passed to the training run; for estimators other than ReSTE it only sets the
            ``o`` at which the estimating error is evaluated.
        seed: Random seed.
    """

    estimator: str
    o_end: float
    seed: int

    @property
    def config_name(self) -> str:
        """The configuration's folder name, e.g. ``reste_o1.5`` or ``ste``."""
        return f"reste_o{self.o_end:g}" if self.estimator == "reste" else self.estimator

    @property
    def folder(self) -> str:
        """The run's folder relative to the study's output folder, e.g. ``reste_o3/seed1``."""
        return f"{self.config_name}/seed{self.seed}"


def plan_runs(estimators: Sequence[str], o_ends: Sequence[float], seeds: Sequence[int],
              baseline_o_end: float = 1.0) -> List[RunSpec]:
    """Every run of a study: ReSTE once per ``o_end``, any other estimator once, each over the seeds.

    Args:
        estimators: Estimator names (any case; duplicates dropped).
        o_ends: ReSTE's final exponents.
        seeds: Seeds of every configuration.
        baseline_o_end: The ``o`` of the estimating error for the estimators that have no exponent.

    Returns:
        The runs, configuration by configuration, in the table's order.
    """
    names = list(dict.fromkeys(e.lower() for e in estimators))
    specs = []
    for name in sorted(names, key=_estimator_rank):
        for o_end in (sorted(dict.fromkeys(map(float, o_ends))) if name == "reste" else [baseline_o_end]):
            specs.extend(RunSpec(name, float(o_end), int(seed)) for seed in dict.fromkeys(seeds))
    return specs


def _estimator_rank(name: str) -> tuple:
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def config_label(estimator: str, o_end: float) -> str:
    """A configuration's name in tables and figures: ``STE``, ``EDE``, ``ReSTE o=1.5``."""
    name = DISPLAY.get(estimator, estimator)
    return f"{name} o={o_end:g}" if estimator == "reste" else name


def read_metrics(path) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (one JSON object per line), one per epoch, by epoch.

    A repeated epoch keeps its last record (a log appended to after a crash).
    """
    by_epoch: Dict[int, Dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _number(value) -> Optional[float]:
    """A finite float, or None (missing, null or NaN values do not enter the means)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def load_run(run_dir) -> Dict[str, Any]:
    """One finished run: its settings, final top-1 and the indicators of its last epoch.

    Args:
        run_dir: A run folder (``config.yaml``, ``metrics.jsonl``, ``results.json``).

    Returns:
        ``run_dir``, ``estimator``, ``o_end``, ``seed``, ``model``, ``dataset``, ``epochs`` (epochs
        recorded), ``max_train_steps``, ``final_top1``, ``best_top1``, ``mean_estimating_error`` and
        ``sum_gradient_stability`` (None when the run had no ``--cal-ind``), and ``train_seconds``
        (the training process's wall time when the study ran it, else None).

    Raises:
        FileNotFoundError: a file is missing (an unfinished run has no ``results.json``).
        ValueError: ``metrics.jsonl`` holds no record.
    """
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no epoch recorded")
    results = json.loads((run_dir / "results.json").read_text())
    last = records[-1]
    stamp = run_dir / STAMP
    seconds = json.loads(stamp.read_text()).get("seconds") if stamp.is_file() else None
    return {
        "run_dir": str(run_dir), "estimator": str(config.get("estimator", "reste")).lower(),
        "o_end": float(config.get("o_end", 3.0)), "seed": config.get("seed"), "model": config.get("model"),
        "dataset": config.get("dataset"), "epochs": len(records),
        "max_train_steps": int(config.get("max_train_steps") or 0),
        "final_top1": _number(results.get("final_top1")), "best_top1": _number(results.get("best_top1")),
        "mean_estimating_error": _number(last.get("mean_estimating_error")),
        "sum_gradient_stability": _number(last.get("sum_gradient_stability")),
        "train_seconds": _number(seconds),
    }


def collect_runs(root) -> List[Dict[str, Any]]:
    """Every finished run (a folder with ``results.json`` and ``metrics.jsonl``) under ``root``."""
    found = sorted(p.parent for p in Path(root).rglob("results.json")
                   if (p.parent / "metrics.jsonl").is_file())
    return [load_run(folder) for folder in found]


def _mean_std(values: Iterable[Optional[float]]) -> tuple:
    """(mean, sample std) of the known values; std is None below two values, both None for none."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else None)


def aggregate(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration (estimator, ``o_end``): means and sample stds over its seeds.

    Args:
        runs: Records of :func:`load_run`.

    Returns:
        Rows in the table's order (STE, ApproxSign, EDE, then ReSTE by ``o_end``) with ``estimator``,
        ``o_end``, ``label``, ``seeds``, ``n_seeds``, ``epochs`` (sorted distinct counts),
        ``max_train_steps``, ``top1_mean``/``_std``, ``est_error_mean``/``_std``,
        ``stability_mean``/``_std``, the per-seed ``est_errors`` and ``stabilities``, ``train_seconds``
        (per run) and ``run_dirs``.
    """
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["estimator"], run["o_end"]), []).append(run)
    rows = []
    for (estimator, o_end), members in sorted(groups.items(), key=lambda kv: (_estimator_rank(kv[0][0]),
                                                                                kv[0][1])):
        top1 = _mean_std(r["final_top1"] for r in members)
        error = _mean_std(r["mean_estimating_error"] for r in members)
        stability = _mean_std(r["sum_gradient_stability"] for r in members)
        rows.append({
            "estimator": estimator, "o_end": o_end, "label": config_label(estimator, o_end),
            "seeds": sorted(r["seed"] for r in members), "n_seeds": len(members),
            "epochs": sorted({r["epochs"] for r in members}),
            "max_train_steps": sorted({r["max_train_steps"] for r in members}),
            "top1_mean": top1[0], "top1_std": top1[1], "est_error_mean": error[0], "est_error_std": error[1],
            "stability_mean": stability[0], "stability_std": stability[1],
            "est_errors": [r["mean_estimating_error"] for r in members],
            "stabilities": [r["sum_gradient_stability"] for r in members],
            "train_seconds": [r["train_seconds"] for r in members],
            "run_dirs": [r["run_dir"] for r in members],
        })
    return rows


def _cell(mean: Optional[float], std: Optional[float], fmt: str) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def _row_cells(row: Dict[str, Any]) -> List[str]:
    o_end = f"{row['o_end']:g}" if row["estimator"] == "reste" else f"({row['o_end']:g})"
    epochs = "/".join(str(e) for e in row["epochs"])
    if any(row["max_train_steps"]):
        epochs += " (capped steps)"
    return [row["label"], o_end, str(row["n_seeds"]), epochs, _cell(row["top1_mean"], row["top1_std"], ".2f"),
            _cell(row["est_error_mean"], row["est_error_std"], ".1f"),
            _cell(row["stability_mean"], row["stability_std"], ".3e")]


def _notes(meta: Dict[str, Any]) -> List[str]:
    baseline = meta.get("baseline_o_end", 1.0)
    return [
        "Top-1: the final weights (after the last epoch, reloaded) on the validation split; mean ± sample "
        "std over the row's seeds (no ± with one seed). Seeds and epochs are per row.",
        "Mean est. error: sum over the binary convs of ||F_o(w) - sign(w)||_2 with "
        "F_o(w) = sign(w)|w|^(1/o) at o = o_end, taken after the last step of each epoch and averaged "
        "over epochs; then mean over seeds.",
        "Summed grad. stability: sum over the binary convs of var(|grad w|) at the last step of each epoch, "
        "summed over epochs; then mean over seeds. Lower is more stable.",
        f"Parenthesised o_end: STE, ApproxSign and EDE have no exponent; their runs use o_end = {baseline:g} "
        "only as the o of the estimating error. At o = 1, F_1 is the identity, STE's own equivalent "
        "forward, so the value is the weights' distance from their signs, the same quantity as ReSTE "
        "at o = 1. ApproxSign's and EDE's own equivalent forwards (a piecewise quadratic, a scaled tanh) "
        "are not F_o: for them the number is this common distance, not their own estimating error.",
    ]


def render_table(rows: Sequence[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> str:
    """The study as markdown: a title line, the table (one row per configuration) and its notes.

    Args:
        rows: Rows of :func:`aggregate`.
        meta: ``model``, ``dataset``, ``baseline_o_end``, optional ``notes`` (extra lines) and
            ``command``, ``host``, ``wall_s``.

    Returns:
        The markdown text, ending with a newline.
    """
    meta = dict(meta or {})
    lines = [f"# Estimator study: {meta.get('model', '?')} on {meta.get('dataset', '?')}", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in [*_notes(meta), *meta.get("notes", [])]]
    if meta.get("command"):
        lines.append(f"- Command: `{meta['command']}`")
    seconds = [s for row in rows for s in row.get("train_seconds", []) if s is not None]
    if seconds:
        lines.append(f"- Training time: {len(seconds)} training processes (start-up included), "
                     f"{statistics.fmean(seconds):.0f} s each on average, {sum(seconds) / 60:.1f} min in all "
                     f"({meta.get('host', 'this host')}).")
    if meta.get("wall_s") is not None:
        lines.append(f"- Wall time of this study.py invocation: {meta['wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def write_study(out_dir, rows: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]],
                meta: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Writes ``study.md`` (:func:`render_table`) and ``study.json`` (meta, rows, runs) into ``out_dir``.

    Returns:
        The two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "study.md", out_dir / "study.json"
    md.write_text(render_table(rows, meta))
    payload = {"meta": dict(meta or {}), "rows": list(rows), "runs": list(runs)}
    js.write_text(json.dumps(payload, indent=2) + "\n")
    return [md, js]
