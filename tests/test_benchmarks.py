"""The benchmark script runs (its figures are not asserted here: timings belong in benchmarks/, never in
a test); each part writes the fields the docs quote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("part", ["estimator", "training", "packed", "deploy"])
def test_each_part_of_the_quick_benchmark_runs(part, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--part", part,
                       "--model", "resnet20", "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(Path(out).read_text())
    assert {"torch", "cpu_model", "commit", "threads"} <= set(result["env"])
    if part == "estimator":
        assert any("masked" in name for name in result["estimator"]["rows"])
    elif part == "training":
        row = result["training"][0]
        assert row["binary"] == "resnet20_1w1a_reste" and row["ratio"] > 0
    elif part == "packed":
        assert result["packed"]["sizes"] and result["packed"]["latency"]
    else:
        assert result["deploy"]["models"] and all(r["same_top1"] for r in result["deploy"]["models"])
