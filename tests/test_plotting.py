"""reste_timm.plotting and scripts/plot.py on hand-made run folders (no training: fast)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from PIL import Image

from reste_timm.analysis.plotting import plot_estimators, plot_run

pytest.importorskip("matplotlib")


def load_script(name):
    """The ``reste-timm <name>`` subcommand's module (scripts/<name>.py is a thin wrapper of it)."""
    return importlib.import_module(f"reste_timm.cli.{name}")


def write_metrics(run_dir, epochs=3, indicators=True):
    """A metrics.jsonl as train.py writes it (the keys plot_run reads, and a few it ignores)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        record = {"epoch": e, "lr": 0.1 * (e + 1) / epochs, "o": 1.0 + e, "train_loss": 2.0 / (e + 1),
                  "train_top1": 30.0 + 20 * e, "img_per_s": 100.0, "val_loss": 2.2 / (e + 1),
                  "val_top1": 25.0 + 20 * e, "val_top5": 80.0, "world_size": 1}
        if indicators:
            record.update(estimating_error=100.0 - e, gradient_stability=1e-4 / (e + 1),
                          mean_estimating_error=100.0 - e / 2, sum_gradient_stability=1e-4 * (e + 1))
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def assert_png(path, min_size=(200, 150)):
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10, f"{path} looks blank"
    return pixels


def test_plot_script_writes_run_curves_indicators_and_estimators(tmp_path, capsys):
    run = write_metrics(tmp_path / "run")
    assert load_script("plot").main([str(run), "--estimators"]) == 0
    printed = capsys.readouterr().out.split()
    expected = [run / "curves.png", run / "indicators.png", run / "estimators.png"]
    assert printed == [str(p) for p in expected]
    for path in expected:
        assert_png(path)


def test_run_without_indicators_gets_only_the_curves(tmp_path):
    run = write_metrics(tmp_path / "plain", indicators=False)
    assert plot_run(run) == [run / "curves.png"]
    assert not (run / "indicators.png").exists()


def test_plot_script_errors_without_metrics(tmp_path, capsys):
    assert load_script("plot").main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert load_script("plot").main([str(tmp_path)]) == 2
    assert "no epoch recorded" in capsys.readouterr().err


def test_estimator_figure_draws_every_exponent(tmp_path):
    pixels = assert_png(plot_estimators(tmp_path / "sub" / "est.png"), min_size=(800, 300))
    # matplotlib's default cycle: o=1 blue, o=2 orange, o=3 green; each curve must leave pixels.
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        close = np.abs(pixels.astype(int) - np.array(rgb)).sum(axis=-1) < 30
        assert close.sum() > 200, rgb


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails
    with pytest.raises(ImportError, match=r"reste-timm\[plot\]"):
        plot_estimators(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
