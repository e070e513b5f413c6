"""scripts/train.py end to end: resume exactness, two CPU processes, validate.py, the saved folders.

Each test launches real training runs on tiny real data (a few steps of the digits or a 19-image
folder), so they are the slowest of the suite; they share nothing and clean up in tmp_path.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, launch_two_cpu_processes, make_image_folder, run_script
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here launches training or validation processes

TRAIN = str(ROOT / "scripts" / "train.py")
VALIDATE = str(ROOT / "scripts" / "validate.py")
TINY = ["--dataset", "digits", "--model", "resnet20_1w1a_reste", "--batch-size", "32", "--val-batch-size",
        "120", "--max-train-steps", "3", "--lr", "0.05", "--warmup-epochs", "1", "--report-to", "none"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_resume_gives_the_same_final_weights(tmp_path):
    common = TINY + ["--epochs", "3", "--cal-ind", "--anneal", "step"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(run_script([TRAIN, *common, "--output-dir", str(straight)]))
    assert_ok(run_script([TRAIN, *common, "--output-dir", str(split), "--stop-after-epochs", "1"]))
    assert not (split / "final").exists() and (split / "checkpoints" / "epoch_00001").is_dir()
    assert_ok(run_script([TRAIN, *common, "--output-dir", str(split), "--resume"]))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = read_metrics(straight), read_metrics(split)
    assert [m["epoch"] for m in mb] == [0, 1, 2]
    for x, y in zip(ma, mb, strict=True):  # same step, lr, o and indicators, summed across the resume
        for key in ("lr", "o", "train_loss", "val_top1", "estimating_error", "sum_gradient_stability"):
            assert x[key] == pytest.approx(y[key], rel=1e-6), key
    assert ma[1]["o"] > ma[0]["o"] > 1.0 - 1e-9


def test_two_cpu_processes_train_and_count_each_sample_once(tmp_path):
    data = make_image_folder(tmp_path / "imgs", n_train=(9, 9), n_val=(4, 3))
    out = tmp_path / "ddp"
    launch = launch_two_cpu_processes()
    args = [TRAIN, "--dataset", "imagefolder", "--data-path", str(data), "--model", "resnet20_1w1a_reste",
            "--batch-size", "4", "--val-batch-size", "2", "--epochs", "2", "--report-to", "none",
            "--output-dir", str(out)]
    proc = run_script(launch + args, env={"CUDA_VISIBLE_DEVICES": ""})
    assert_ok(proc)
    metrics = read_metrics(out)
    assert [m["world_size"] for m in metrics] == [2, 2]
    assert all(m["val_count"] == 7 for m in metrics)  # 7 images, uneven over 2 processes x batch 2
    assert (out / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    assert_ok(run_script([TRAIN, *TINY, "--epochs", "1", "--warmup-epochs", "0", "--output-dir", str(out),
                           "--data-on-device"]))
    return out


def test_run_folder_layout(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "results.json", "final/model.safetensors",
                 "final/config.json", "final/README.md", "best/model.safetensors"):
        assert (trained_run / name).is_file(), name
    record = read_metrics(trained_run)[0]
    for key in ("epoch", "lr", "o", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "img_per_s", "world_size"):
        assert key in record, key
    results = json.loads((trained_run / "results.json").read_text())
    assert results["final_top1"] == pytest.approx(record["val_top1"])  # reloaded weights score the same


def test_validate_script_on_saved_folder(trained_run, tmp_path):
    out = tmp_path / "val.json"
    proc = run_script([VALIDATE, "--model", "resnet20_1w1a_reste", "--checkpoint", str(trained_run / "final"),
                       "--dataset", "digits", "--json", str(out)])
    assert_ok(proc)
    result = json.loads(out.read_text())
    assert result["val_count"] == 360
    assert result["val_top1"] == pytest.approx(read_metrics(trained_run)[0]["val_top1"], abs=1e-4)
    assert "top-1" in proc.stdout


def test_validate_refuses_pickles_without_flag(trained_run, tmp_path):
    state = load_file(trained_run / "final" / "model.safetensors")
    pth = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, pth)
    args = [VALIDATE, "--model", "resnet20_1w1a_reste", "--checkpoint", str(pth), "--dataset", "digits"]
    proc = run_script(args)
    assert proc.returncode == 2
    assert "refusing to unpickle" in proc.stderr and "--allow-pickle" in proc.stderr
    assert_ok(run_script(args + ["--allow-pickle"]))
