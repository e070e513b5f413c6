"""reste_timm.study (plan, collect, aggregate, table) and scripts/study.py.

The library is tested on hand-made run folders; one real study (2 estimators, 1 seed, 2 steps of one
epoch each) checks that scripts/study.py drives train.py and writes the report.
"""

from __future__ import annotations

import importlib
import json
import re
import statistics

import pytest
import yaml
from PIL import Image

from reste_timm.analysis.study import (
    TABLE_COLUMNS,
    aggregate,
    collect_runs,
    load_run,
    plan_runs,
    render_table,
)

NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"


def load_script(name):
    """The ``reste-timm <name>`` subcommand's module (scripts/<name>.py is a thin wrapper of it)."""
    return importlib.import_module(f"reste_timm.cli.{name}")


def make_run(folder, estimator, o_end, seed, top1, errors, stabilities, finished=True):
    """A run folder as train.py leaves it: config.yaml, metrics.jsonl (with indicators), results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": "resnet20_1w1a_reste", "dataset": "digits", "estimator": estimator, "o_end": o_end,
              "seed": seed, "epochs": len(errors), "max_train_steps": 0, "cal_ind": True}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for e, (error, stability) in enumerate(zip(errors, stabilities, strict=True)):
        lines.append(json.dumps({"epoch": e, "lr": 0.1, "o": o_end, "val_top1": top1,
                                 "estimating_error": error, "gradient_stability": stability,
                                 "mean_estimating_error": statistics.fmean(errors[:e + 1]),
                                 "sum_gradient_stability": sum(stabilities[:e + 1])}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (folder / "results.json").write_text(json.dumps({"final_top1": top1, "best_top1": top1 + 1}))
    return folder


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "study"
    make_run(root / "ste/seed1", "ste", 1.0, 1, 90.0, [10.0, 8.0], [1e-4, 2e-4])
    make_run(root / "ste/seed2", "ste", 1.0, 2, 92.0, [12.0, 10.0], [3e-4, 2e-4])
    make_run(root / "reste_o3/seed1", "reste", 3.0, 1, 95.0, [4.0, 2.0], [1e-3, 1e-3])
    make_run(root / "reste_o1.5/seed1", "reste", 1.5, 1, 93.0, [6.0, 6.0], [5e-4, 5e-4])
    make_run(root / "ede/seed1", "ede", 1.0, 1, 91.0, [9.0, 9.0], [2e-4, 2e-4], finished=False)
    return root


def table_rows(markdown):
    """Header, separator and body of the markdown table, each a list of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1], cells[2:]


def test_plan_runs_one_config_per_reste_exponent():
    specs = plan_runs(["ReSTE", "ede", "ste", "approxsign"], [3, 1.5], [1, 2], baseline_o_end=1.0)
    configs = list(dict.fromkeys(s.folder.split("/")[0] for s in specs))
    assert configs == ["ste", "approxsign", "ede", "reste_o1.5", "reste_o3"]
    assert len(specs) == 10 and {s.seed for s in specs} == {1, 2}
    assert all(s.o_end == 1.0 for s in specs if s.estimator != "reste")
    assert specs[-1].folder == "reste_o3/seed2"


def test_load_run_reads_the_last_epoch(study_dir):
    run = load_run(study_dir / "ste/seed2")
    assert (run["estimator"], run["o_end"], run["seed"], run["epochs"]) == ("ste", 1.0, 2, 2)
    assert run["final_top1"] == 92.0
    assert run["mean_estimating_error"] == pytest.approx(11.0)
    assert run["sum_gradient_stability"] == pytest.approx(5e-4)
    with pytest.raises(FileNotFoundError):
        load_run(study_dir / "ede/seed1")  # unfinished: no results.json


def test_aggregate_means_and_sample_stds_over_seeds(study_dir):
    runs = collect_runs(study_dir)
    assert len(runs) == 4  # the unfinished EDE run is left out
    rows = aggregate(runs)
    assert [r["label"] for r in rows] == ["STE", "ReSTE o=1.5", "ReSTE o=3"]
    ste = rows[0]
    assert ste["seeds"] == [1, 2] and ste["n_seeds"] == 2 and ste["epochs"] == [2]
    assert ste["top1_mean"] == pytest.approx(91.0) and ste["top1_std"] == pytest.approx(2 ** 0.5)
    assert ste["est_error_mean"] == pytest.approx(10.0)  # mean of 9 and 11
    assert ste["stability_mean"] == pytest.approx(4e-4)  # mean of 3e-4 and 5e-4
    assert rows[2]["top1_std"] is None and rows[2]["stability_mean"] == pytest.approx(2e-3)


def test_table_has_one_parsable_row_per_config(study_dir):
    rows = aggregate(collect_runs(study_dir))
    markdown = render_table(rows, {"model": "resnet20_1w1a_reste", "dataset": "digits", "wall_s": 90})
    header, separator, body = table_rows(markdown)
    assert header == list(TABLE_COLUMNS)
    assert all(re.fullmatch(r"-{3,}", c) for c in separator) and len(separator) == len(header)
    assert [r[0] for r in body] == ["STE", "ReSTE o=1.5", "ReSTE o=3"]
    assert [r[1] for r in body] == ["(1)", "1.5", "3"]
    assert [r[2] for r in body] == ["2", "1", "1"] and [r[3] for r in body] == ["2", "2", "2"]
    top1, error, stability = (re.fullmatch(rf"({NUMBER}) ± ({NUMBER})", c) for c in body[0][4:])
    assert float(top1[1]) == 91.0 and float(top1[2]) == pytest.approx(1.41, abs=0.01)
    assert float(error[1]) == 10.0 and float(stability[1]) == pytest.approx(4e-4)
    assert float(body[2][4]) == 95.0 and float(body[2][5]) == 3.0  # one seed: no ±
    assert "o = 1" in markdown and "1.5 min" in markdown


def test_report_only_rebuilds_the_report(study_dir, tmp_path, capsys):
    report = tmp_path / "report"
    argv = ["--output-dir", str(study_dir), "--report-dir", str(report), "--report-only",
            "--note", "digits are not CIFAR-10"]
    assert load_script("study").main(argv) == 0
    printed = capsys.readouterr().out.split()
    names = ["study.md", "study.json", "study_scatter.png", "estimators.png"]
    assert printed == [str(report / n) for n in names]
    data = json.loads((report / "study.json").read_text())
    assert len(data["rows"]) == 3 and len(data["runs"]) == 4 and data["meta"]["dataset"] == "digits"
    assert data["rows"][0]["est_errors"] == [9.0, 11.0]  # per seed, drawn as the scatter's small markers
    assert "- digits are not CIFAR-10\n" in (report / "study.md").read_text()
    with Image.open(report / "study_scatter.png") as image:
        image.verify()


@pytest.mark.parametrize("argv", [["--seed", "3"], ["--estimator", "ste"], ["--o-end=2"],
                                  ["--", "--est", "ede"], ["--output-dir", "x", "--resume"]])
def test_study_owned_train_flags_cannot_be_passed_through(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        load_script("study").parse_args(argv)
    assert exc.value.code == 2 and "set by the study itself" in capsys.readouterr().err


def test_other_flags_pass_through_to_train():
    argv = ["--seeds", "4", "--lr", "0.05", "--", "--workers", "1"]
    args, passthrough = load_script("study").parse_args(argv)
    assert args.seeds == [4] and passthrough == ["--lr", "0.05", "--workers", "1"]


@pytest.mark.slow
def test_real_study_end_to_end(tmp_path, capsys, monkeypatch):
    study = load_script("study")
    out = tmp_path / "runs"
    argv = ["--estimators", "ste", "reste", "--o-ends", "2", "--seeds", "1", "--epochs", "1", "--jobs", "2",
            "--output-dir", str(out), "--", "--warmup-epochs", "0", "--max-train-steps", "1",
            "--batch-size", "32"]
    assert study.main(argv) == 0, (out / "reste_o2/seed1/train.log").read_text()[-3000:]
    for name in ("study.md", "study.json", "study_scatter.png", "estimators.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    header, _, body = table_rows((out / "study.md").read_text())
    assert [r[:4] for r in body] == [["STE", "(1)", "1", "1 (capped steps)"], ["ReSTE o=2", "2", "1",
                                                                                  "1 (capped steps)"]]
    for row in body:
        assert 0.0 <= float(row[4]) <= 100.0 and float(row[5]) > 0 and float(row[6]) > 0
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert [r["o_end"] for r in runs] == [1.0, 2.0] and all(r["train_seconds"] > 0 for r in runs)
    capsys.readouterr()
    assert study.main(argv) == 0  # same command again: the finished runs are reused, not retrained
    assert capsys.readouterr().out.count(": reused") == 2
    again = json.loads((out / "study.json").read_text())["runs"]
    assert [r["train_seconds"] for r in again] == [r["train_seconds"] for r in runs]
    assert "2 training processes" in (out / "study.md").read_text()
