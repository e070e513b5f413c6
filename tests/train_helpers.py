"""Shared pieces of the fault tests (test_reliability.py, test_cluster_faults.py): tiny digits runs of
``reste-timm train`` as subprocesses (or in this process), the files they leave, and their checks."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import ROOT, run_script

from reste_timm.hub import save_pretrained

TRAIN = str(ROOT / "scripts" / "train.py")
VALIDATE = str(ROOT / "scripts" / "validate.py")
FAULTY = str(ROOT / "tests" / "fault_helpers" / "faulty_train.py")
MODEL = "resnet20_1w1a_reste"
TINY = ["--dataset", "digits", "--model", MODEL, "--batch-size", "32", "--val-batch-size", "120",
        "--max-train-steps", "3", "--epochs", "2", "--anneal", "step", "--lr", "0.05", "--report-to", "none"]


def train(args, fault=None, timeout=240, env=None):
    script = [FAULTY] if fault else [TRAIN]
    return run_script(script + [str(a) for a in args], timeout=timeout,
                      env={**({"RESTE_FAULT": fault} if fault else {}), **(env or {})})


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def error_lines(proc, prog="reste-timm train"):
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]


def read_metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path):
    wa, wb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def checkpoint_names(run: Path):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def notice_lines(proc, prog="reste-timm train"):
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: ")]


def in_process(script):
    """A script's ``main`` run in this process (no interpreter start-up: for runs that stop early).

    ``__wrapped__`` skips torch elastic's ``@record``, which would re-point faulthandler at pytest's
    captured stderr.
    """
    main = runpy.run_path(script, run_name="reste_script")["main"]
    return getattr(main, "__wrapped__", main)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run: TINY straight through, no checkpoint between epochs."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert_ok(train([*TINY, "--output-dir", out]))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(timm.create_model(MODEL), tmp_path_factory.mktemp("saved") / "r20")
