"""Figures: the estimators of the paper, a run's training curves and the indicator study.

matplotlib is an optional extra (``pip install 'reste-timm[plot]'``): it is imported only inside these
functions, so the rest of the package works without it. Figures are drawn on an explicit Agg canvas
(``matplotlib.figure.Figure``, never ``pyplot``), so no GUI backend is touched and nothing global
changes in the calling process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..nn.estimators import RESTE_THRESHOLD, reste_equivalent_forward, reste_factor
from .study import read_metrics

__all__ = ["plot_estimators", "plot_run", "plot_study"]

_MISSING = "plotting needs matplotlib, the optional extra 'plot': pip install 'reste-timm[plot]'"


def _figure(ncols: int, nrows: int = 1, panel=(4.2, 3.2)):
    """A constrained-layout Agg figure with ``nrows x ncols`` axes (flattened)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_MISSING) from e
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the canvas: savefig renders with Agg whatever the default backend
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_estimators(path, orders: Sequence[float] = (1.0, 2.0, 3.0), span: float = 2.0) -> Path:
    """The paper's estimator figure: ReSTE's equivalent forward and its backward factor beside STE.

    Left: ``sign(x)``, STE's equivalent forward (the identity clipped to [-1, 1]) and
    ``F_o(x) = sign(x)|x|^(1/o)`` for each ``o``. Right: the factor each backward multiplies the
    incoming gradient by: STE's ``1[|x| <= 1]`` and ReSTE's rectified ``dF_o/dx`` (secant on
    ``|x| <= 0.1``, cut beyond ``|x| > 1.5``).

    Args:
        path: PNG file to write.
        orders: The exponents ``o`` to draw.
        span: The x axis covers ``[-span, span]``.

    Returns:
        The path written.
    """
    x = torch.linspace(-span, span, 4001, dtype=torch.float64)
    fig, (fwd, bwd) = _figure(2)
    fwd.plot(x, torch.sign(x), color="black", lw=2.2, label="sign(x) (every forward)")
    fwd.plot(x, x.clamp(-1, 1), color="grey", ls="--", label="STE: clip(x, -1, 1)")
    bwd.plot(x, (x.abs() <= 1).double(), color="grey", ls="--", lw=2.0, label="STE")
    for o in orders:
        fwd.plot(x, reste_equivalent_forward(x, o), label=f"ReSTE $F_o$, o={o:g}")
        bwd.plot(x, reste_factor(x, o), label=f"ReSTE o={o:g}")
    for ax in (fwd, bwd):
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for t in (-RESTE_THRESHOLD, RESTE_THRESHOLD):
        bwd.axvline(t, color="black", ls=":", lw=0.8)  # ReSTE's gradient cut-off t
    fwd.set_title("equivalent forward")
    bwd.set_title("backward factor (cut at |x| > t = 1.5)")
    return _save(fig, path)


def _series(records, key) -> tuple:
    """(epochs, values) of the records where ``key`` is a finite number."""
    pairs = [(r["epoch"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _panel(ax, records, keys: Sequence[tuple], title: str, log: bool = False) -> None:
    for key, label in keys:
        epochs, values = _series(records, key)
        if values:
            ax.plot(epochs, values, marker="o", ms=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.grid(alpha=0.3)
    if log and all(v > 0 for key, _ in keys for v in _series(records, key)[1]):
        ax.set_yscale("log")
    if len(keys) > 1:
        ax.legend(fontsize=8)


def plot_run(run_dir) -> List[Path]:
    """Training curves of a run from its ``metrics.jsonl``, written as PNGs into the run folder.

    ``curves.png``: loss and top-1 (train and val), learning rate and exponent ``o``.
    ``indicators.png`` (only when the run recorded them with ``--cal-ind``): the estimating error
    of each epoch with its running mean, and the gradient stability of each epoch.

    Args:
        run_dir: A folder holding ``metrics.jsonl``.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError: ``metrics.jsonl`` is missing.
        ValueError: it holds no record.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no epoch recorded")
    fig, axes = _figure(2, 2)
    _panel(axes[0], records, [("train_loss", "train"), ("val_loss", "val")], "cross-entropy loss")
    _panel(axes[1], records, [("train_top1", "train"), ("val_top1", "val")], "top-1 (%)")
    _panel(axes[2], records, [("lr", "lr")], "learning rate")
    _panel(axes[3], records, [("o", "o")], "exponent o (start of epoch)")
    name = "/".join(run_dir.resolve().parts[-2:])  # a study's runs are all named seed<N>: show the parent
    fig.suptitle(name)
    paths = [_save(fig, run_dir / "curves.png")]
    if _series(records, "estimating_error")[1]:
        fig, axes = _figure(2)
        errors = [("estimating_error", "epoch's last step"), ("mean_estimating_error", "mean over epochs")]
        _panel(axes[0], records, errors, "estimating error (at o = o_end)")
        _panel(axes[1], records, [("gradient_stability", "gradient stability")],
               "gradient stability (var |grad w|)", log=True)
        fig.suptitle(f"{name}: indicators")
        paths.append(_save(fig, run_dir / "indicators.png"))
    return paths


def plot_study(rows: Sequence[Dict[str, Any]], path, title: Optional[str] = None) -> Path:
    """Mean estimating error against summed gradient stability, one labelled point per estimator.

    Args:
        rows: Aggregated rows (:func:`reste_timm.study.aggregate`): ``estimator``, ``o_end``,
            ``label``, ``est_error_mean``, ``stability_mean`` and, to draw each seed, optional
            ``est_errors`` and ``stabilities`` (per-seed values).
        path: PNG file to write.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: no row has both indicators.
    """
    rows = [r for r in rows if r.get("est_error_mean") is not None and r.get("stability_mean") is not None]
    if not rows:
        raise ValueError("no row has both indicators (were the runs trained with --cal-ind?)")
    fig, (ax,) = _figure(1, panel=(6.4, 4.8))
    reste = sorted((r for r in rows if r.get("estimator") == "reste"), key=lambda r: r.get("o_end", 0.0))
    if len(reste) > 1:  # ReSTE's trade-off curve, in the order of o_end
        ax.plot([r["est_error_mean"] for r in reste], [r["stability_mean"] for r in reste], color="tab:blue",
                lw=0.8, alpha=0.6, label="ReSTE, by o_end")
    above = {id(r): i % 2 == 0 for i, r in enumerate(reste)}  # alternate: neighbouring o_end sit close
    for row in rows:
        is_reste = row.get("estimator") == "reste"
        color = "tab:blue" if is_reste else "tab:red"
        # Each seed as a faint hollow marker rather than ± bars, which a log axis cannot show below 0.
        seeds = [p for p in zip(row.get("est_errors") or [], row.get("stabilities") or [], strict=False)
                 if None not in p]
        ax.scatter([p[0] for p in seeds], [p[1] for p in seeds], s=14, facecolors="none", edgecolors=color,
                   alpha=0.6, lw=0.8)
        ax.scatter([row["est_error_mean"]], [row["stability_mean"]], s=40, color=color,
                   marker="o" if is_reste else "s", zorder=3)
        offset = ((5, 4) if above[id(row)] else (5, -11)) if is_reste else (6, -3)
        ax.annotate(row["label"], (row["est_error_mean"], row["stability_mean"]), fontsize=8,
                    xytext=offset, textcoords="offset points")
    values = [v for r in rows for v in [r["stability_mean"], *(r.get("stabilities") or [])] if v is not None]
    if min(values) > 0 and max(values) / min(values) > 30:  # otherwise ReSTE's large o squash the rest
        ax.set_yscale("log")
    ax.set_xlabel("mean estimating error (over epochs; lower: closer to sign)")
    ax.set_ylabel("summed gradient stability (over epochs; lower: more stable)")
    ax.grid(alpha=0.3)
    if len(reste) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title or "the equilibrium: estimating error vs gradient stability", fontsize=10)
    return _save(fig, path)
