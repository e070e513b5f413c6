"""Faults, bad input and untrusted files, each provoked for real: what the user sees, and what is kept.

docs/RELIABILITY.md tabulates these tests. Training runs are tiny (3 steps of the digits per epoch,
CPU, seeded); faults that must happen at an exact point (SIGKILL while a checkpoint is written, a
NaN batch, a signal at one batch, a full disk in one file, an exception on one process) come from
tests/fault_helpers/faulty_train.py, which runs ``reste-timm train``'s own ``main`` with one
function patched. Uploads go to the fake Hub of conftest.py.
"""

from __future__ import annotations

import pickle
import re
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import make_image_folder
from train_helpers import (
    MODEL,
    TINY,
    TRAIN,
    VALIDATE,
    assert_ok,
    assert_same_weights,
    checkpoint_names,
    error_lines,
    in_process,
    read_metrics,
    train,
)

import reste_timm.train.checkpoints as checkpoints
from reste_timm.hub import (
    CheckpointError,
    convert_official_checkpoint,
    load_model,
)

# ------------------------------------------------------------------------------------- killed training

@pytest.mark.slow
def test_sigkill_during_and_after_checkpoints_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    args = [*TINY, "--checkpoint-every", "1", "--output-dir", out]
    # 1. SIGKILL while step 2's checkpoint is written: files in .tmp-step_00000002, weights torn
    proc = train(args, fault="kill-during:step_00000002")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint_names(out) == [".tmp-step_00000002", "step_00000001"]
    assert (out / ".lock").is_file()  # SIGKILL runs no cleanup: the lock of a dead pid is left
    with pytest.raises(Exception):  # noqa: B017  (safetensors has its own error type)
        safetensors.torch.load_file(out / "checkpoints" / ".tmp-step_00000002" / "model.safetensors")
    assert checkpoints.latest_checkpoint(out / "checkpoints").name == "step_00000001"
    # 2. resume mid-epoch 0 from step 1 (never the torn folder); SIGKILL right after step 5 is complete
    proc = train([*args, "--resume"], fault="kill-after:step_00000005")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "removed the partial checkpoint" in proc.stdout
    assert re.search(r"was locked by the run of pid \d+ on .*, which has ended: lock taken over", proc.stderr)
    assert "resumed from" in proc.stdout and "step_00000001 (epoch 0, step 1 of it" in proc.stdout
    assert checkpoint_names(out) == ["step_00000004", "step_00000005"]  # --keep-checkpoints 2
    # 3. resume mid-epoch 1 from step 5, to the end
    proc = train([*args, "--resume"])
    assert_ok(proc)
    assert "step_00000005 (epoch 1, step 2 of it, global step 5)" in proc.stdout
    assert not [n for n in checkpoint_names(out) if n.startswith(".tmp-")]
    assert_same_weights(uninterrupted / "final" / "model.safetensors", out / "final" / "model.safetensors")
    straight, resumed = read_metrics(uninterrupted), read_metrics(out)
    assert [m["epoch"] for m in resumed] == [0, 1]
    for a, b in zip(straight, resumed, strict=True):  # train_* cover only the resumed part of an epoch
        for key in ("lr", "o", "val_loss", "val_top1"):
            assert a[key] == b[key], key


class _OneProcess:
    """The part of an Accelerator that save_checkpoint uses, writing a two-file checkpoint."""

    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin"):
            (Path(path) / name).write_bytes(b"\0" * 64)


def test_killed_while_deleting_an_old_checkpoint_never_looks_complete(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    checkpoints.save_checkpoint(_OneProcess(), ckpts, "step_00000001", keep=1)
    time.sleep(0.01)  # distinct mtimes
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, ignore_errors=False):
        path = Path(path)
        if path.name.startswith(".tmp-old-") and path.exists():
            (path / "model.safetensors").unlink()  # half deleted, then the process dies
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(_OneProcess(), ckpts, "step_00000002", keep=1)
    assert checkpoint_names(tmp_path) == [".tmp-old-step_00000001", "step_00000002"]
    assert checkpoints.latest_checkpoint(ckpts).name == "step_00000002"
    (ckpts / ".tmp-step_00000003").mkdir()  # a newer, unfinished write
    assert checkpoints.latest_checkpoint(ckpts).name == "step_00000002"
    monkeypatch.undo()
    assert checkpoints.remove_partial_checkpoints(ckpts) == [".tmp-old-step_00000001", ".tmp-step_00000003"]
    assert checkpoint_names(tmp_path) == ["step_00000002"]


# ------------------------------------------------------------------------------------ non-finite loss

@pytest.mark.slow
def test_absurd_learning_rate_stops_naming_the_step_and_keeps_finite_checkpoint(tmp_path):
    out = tmp_path / "lr"
    proc = train([*TINY, "--epochs", "1", "--lr", "1e30", "--checkpoint-every", "1", "--output-dir", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    found = re.search(r"non-finite loss \(nan\) at epoch 0 step (\d+);", line)
    assert found and "Traceback" not in proc.stderr
    kept = f"step_{int(found[1]):08d}"  # steps 0..N-1 were good: the checkpoint after step N-1
    assert f"the last good checkpoint, {out / 'checkpoints' / kept}, is kept" in line
    assert checkpoint_names(out)[-1] == kept and not [n for n in checkpoint_names(out) if n.startswith(".")]
    weights = safetensors.torch.load_file(out / "checkpoints" / kept / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_nan_batch_stops_keeps_checkpoint_then_skip_nonfinite_counts_it(uninterrupted, tmp_path):
    out = tmp_path / "nan"
    proc = train([*TINY, "--output-dir", out], fault="nan-at:1:1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "non-finite loss (nan) at epoch 1 step 1" in line and "epoch_00001" in line
    assert checkpoint_names(out) == ["epoch_00001"] and len(read_metrics(out)) == 1
    # unchanged since epoch 0 ended: the same weights as best/, exported then
    assert_same_weights(out / "checkpoints" / "epoch_00001" / "model.safetensors",
                        out / "best" / "model.safetensors")
    assert_same_weights(out / "best" / "model.safetensors", uninterrupted / "best" / "model.safetensors")
    # the kept checkpoint resumes; the same bad batch is now skipped and counted
    proc = train([*TINY, "--output-dir", out, "--resume", "--skip-nonfinite"], fault="nan-at:1:1")
    assert_ok(proc)
    assert [m["skipped_nonfinite"] for m in read_metrics(out)] == [0, 1]
    final = safetensors.torch.load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values() if w.is_floating_point())
    straight = safetensors.torch.load_file(uninterrupted / "final" / "model.safetensors")
    assert not torch.equal(final["linear.weight"], straight["linear.weight"])  # one step fewer


# ---------------------------------------------------------------------------------- bad configuration

def test_unknown_column_exits_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    code = in_process(TRAIN)([*TINY, "--image-column", "nope", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("reste-timm train: error: digits: no column 'nope'")
    assert not out.exists()


def test_checkpoint_every_must_respect_grad_accum(capsys):
    from reste_timm.train.config import parse_config

    with pytest.raises(SystemExit) as exc:
        parse_config(["--checkpoint-every", "3", "--grad-accum", "2"])
    assert exc.value.code == 2 and "key 'checkpoint_every': 3 must be a multiple of grad_accum (2)" in \
        capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad model files



def _truncated_copy(saved: Path, dest: Path) -> Path:
    bad = shutil.copytree(saved, dest)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def test_validate_names_a_corrupt_checkpoint(saved, tmp_path, capsys):
    bad = _truncated_copy(saved, tmp_path / "bad")
    single = shutil.copy(bad / "model.safetensors", tmp_path / "single.safetensors")
    main = in_process(VALIDATE)
    for args, named in ((["--model", MODEL, "--checkpoint", str(bad)], bad / "model.safetensors"),
                        (["--model", f"local-dir:{bad}"], bad / "model.safetensors"),
                        (["--model", MODEL, "--checkpoint", str(single)], single)):
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"reste-timm validate: error: {named}: unreadable, truncated or corrupt")


def test_train_init_from_a_broken_folder_exits_2_naming_the_file(saved, tmp_path, capsys):
    bad = _truncated_copy(saved, tmp_path / "bad")
    out = tmp_path / "out"
    code = in_process(TRAIN)([*TINY, "--init", f"local-dir:{bad}", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"{bad / 'model.safetensors'}: unreadable, truncated or corrupt" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------- untrusted input

class _RunsCode:
    """Unpickling this creates ``path``: proof that a loader executed code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_only_folder(saved: Path, dest: Path, payload) -> Path:
    dest.mkdir()
    shutil.copy(saved / "config.json", dest / "config.json")
    torch.save(payload, dest / "pytorch_model.bin")
    return dest


def test_local_dir_with_only_a_pickle_is_refused_where_timm_would_unpickle(saved, tmp_path):
    state = safetensors.torch.load_file(saved / "model.safetensors")
    plain = _pickle_only_folder(saved, tmp_path / "plain", state)
    # timm itself falls back to torch.load(pytorch_model.bin, weights_only=True)
    model = timm.create_model(f"local-dir:{plain}", pretrained=True)
    assert torch.equal(model.linear.weight, state["linear.weight"])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing; found only pickled weights "
                                              r"\(pytorch_model\.bin\)"):
        load_model(f"local-dir:{plain}")
    marker = tmp_path / "pwned"
    evil = _pickle_only_folder(saved, tmp_path / "evil", {"linear.weight": _RunsCode(marker)})
    with pytest.raises(CheckpointError, match="found only pickled weights"):
        load_model(f"local-dir:{evil}")
    assert not marker.exists()


def test_train_init_refuses_a_pickle_only_folder(saved, tmp_path, capsys):
    state = safetensors.torch.load_file(saved / "model.safetensors")
    plain = _pickle_only_folder(saved, tmp_path / "plain", state)
    out = tmp_path / "out"
    code = in_process(TRAIN)([*TINY, "--init", f"local-dir:{plain}", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pytorch_model.bin" in err[0] and not out.exists()


def test_hub_repo_with_only_a_pickle_is_refused(saved, tmp_path, hub):
    state = safetensors.torch.load_file(saved / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    hub.add_repo("some-org/pickled", {"config.json": (saved / "config.json").read_bytes(),
                                      "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})
    # timm: no model.safetensors, so it unpickles pytorch_model.bin (weights_only=True)
    model = timm.create_model("hf-hub:some-org/pickled", pretrained=True)
    assert torch.equal(model.linear.weight, state["linear.weight"])
    with pytest.raises(CheckpointError, match=r"hf-hub:some-org/pickled/model\.safetensors"):
        load_model("hf-hub:some-org/pickled")


def test_code_in_pickles_is_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_best.pth.tar"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"linear.weight": _RunsCode(marker)}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_official_checkpoint(evil, MODEL, tmp_path / "converted")
    code = in_process(VALIDATE)(["--model", MODEL, "--checkpoint", str(evil), "--allow-pickle"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refused by torch.load(weights_only=True)" in err[0]
    assert not marker.exists() and not (tmp_path / "converted").exists()


# ---------------------------------------------------------------------------------------------- data

@pytest.mark.slow
def test_corrupt_image_stops_the_run_or_is_skipped_and_counted(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    bad = data / "train" / "class1" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = ["--dataset", "imagefolder", "--data-path", data, "--model", MODEL, "--batch-size", "4",
            "--val-batch-size", "7", "--epochs", "2", "--report-to", "none"]
    proc = train([*args, "--output-dir", tmp_path / "strict"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert f"{bad}: unreadable image" in line and "--skip-bad-images" in line
    assert "Traceback" not in proc.stderr
    proc = train([*args, "--output-dir", tmp_path / "lenient", "--skip-bad-images"])
    assert_ok(proc)
    assert [m["skipped_images"] for m in read_metrics(tmp_path / "lenient")] == [1, 2]  # running total
    assert (tmp_path / "lenient" / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ preemption
