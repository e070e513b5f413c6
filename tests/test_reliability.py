"""Faults, bad input and untrusted files, each provoked for real: what the user sees, and what is kept.

docs/RELIABILITY.md tabulates these tests. Training runs are tiny (3 steps of the digits per epoch,
CPU, seeded); faults that must happen at an exact point (SIGKILL while a checkpoint is written, a
NaN batch, a signal at one batch, a full disk in one file, an exception on one process) come from
tests/fault_helpers/faulty_train.py, which runs ``reste-timm train``'s own ``main`` with one
function patched. Uploads go to the fake Hub of conftest.py.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import ROOT, make_image_folder, run_script

import reste_timm.hub.packed
import reste_timm.train.checkpoints as checkpoints
import reste_timm.train.run
from reste_timm.cli.push import main as push_main
from reste_timm.files import WriteError
from reste_timm.hub import (
    CheckpointError,
    convert_official_checkpoint,
    export_packed,
    load_model,
    load_packed,
    save_pretrained,
)
from reste_timm.train.lock import FolderInUse, RunLock

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


# ------------------------------------------------------------------------------------- killed training

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

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(timm.create_model(MODEL), tmp_path_factory.mktemp("saved") / "r20")


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

ARGS = [str(a) for a in TINY]
PREEMPTED = ("reste-timm train: preempted by {} at epoch {} step {}; checkpoint {} saved "
             "(continue with --resume)")


def test_sigterm_at_a_batch_checkpoints_that_step_exits_75_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "preempted"
    proc = train([*TINY, "--output-dir", out], fault="signal-at:1:1")
    assert proc.returncode == 75, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000005"  # epoch 1's batch 1 is finished first: global step 5
    assert notice_lines(proc) == [PREEMPTED.format("SIGTERM", 1, 2, ckpt)]
    assert checkpoint_names(out) == ["epoch_00001", "step_00000005"] and not (out / ".lock").exists()
    proc = train([*TINY, "--output-dir", out, "--resume"])
    assert_ok(proc)
    assert f"resumed from {ckpt} (epoch 1, step 2 of it, global step 5)" in proc.stdout
    assert_same_weights(uninterrupted / "final" / "model.safetensors", out / "final" / "model.safetensors")


def test_second_sigterm_while_the_checkpoint_is_written_does_not_cut_it_short(uninterrupted, tmp_path):
    out = tmp_path / "twice"
    proc = train([*TINY, "--output-dir", out], fault="signal-twice-at:0:1")
    assert proc.returncode == 75, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000002"
    assert notice_lines(proc) == [PREEMPTED.format("SIGTERM", 0, 2, ckpt)] and "Traceback" not in proc.stderr
    assert checkpoint_names(out) == ["step_00000002"]
    safetensors.torch.load_file(ckpt / "model.safetensors")
    assert_ok(train([*TINY, "--output-dir", out, "--resume"]))
    assert_same_weights(uninterrupted / "final" / "model.safetensors", out / "final" / "model.safetensors")


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the batch"
        time.sleep(0.02)


def _refused_line(capsys, out, pid):
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"reste-timm train: error: {out} is in use by the run of pid {pid} on "
                           f"{socket.gethostname()} since "), line
    return line


def test_real_sigusr1_to_the_job_with_workers_while_a_second_run_is_refused(uninterrupted, tmp_path, capsys):
    """As a cluster does: the signal goes to every process of the job, DataLoader workers included."""
    out, ready = tmp_path / "job", tmp_path / "ready"
    cmd = [sys.executable, FAULTY, *ARGS, "--workers", "1", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RESTE_FAULT=f"wait-at:0:1:{ready}")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _wait_for(ready, first)
        for extra in ([], ["--resume"]):  # a second run, even a --resume, refuses at once
            assert in_process(TRAIN)([*ARGS, "--output-dir", str(out), "--no-cpu-malloc-tuning", *extra]) == 2
            _refused_line(capsys, out, first.pid)
        os.killpg(first.pid, signal.SIGUSR1)  # the run and its DataLoader worker
        Path(f"{ready}.go").touch()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, err[-3000:]
    assert "preempted by SIGUSR1 at epoch 0 step 2; checkpoint" in err and "DataLoader worker" not in err
    assert_ok(train([*TINY, "--workers", "1", "--output-dir", out, "--resume"]))
    assert_same_weights(uninterrupted / "final" / "model.safetensors", out / "final" / "model.safetensors")


def test_signal_during_setup_stops_before_training_and_restores_the_handlers(tmp_path, capsys, monkeypatch):
    real_setup = reste_timm.train.run.setup

    def setup_then_signal(args, accelerator):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_setup(args, accelerator)

    monkeypatch.setattr(reste_timm.train.run, "setup", setup_then_signal)
    out = tmp_path / "early"
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        mine = signal.getsignal(signal.SIGTERM)
        assert in_process(TRAIN)([*ARGS, "--output-dir", str(out), "--no-cpu-malloc-tuning"]) == 75
        assert signal.getsignal(signal.SIGTERM) is mine  # main's handler was scoped to main
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip().splitlines() == [
        "reste-timm train: preempted by SIGTERM at epoch 0 step 0; no step taken, nothing new to save "
        "(continue with --resume)"]
    assert not (out / "checkpoints").exists() and not (out / ".lock").exists()


# ------------------------------------------------------------------------------ one run per output folder

def test_locked_folder_refuses_a_second_run_and_its_resume(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    with RunLock(out, ["test"]) as lock:
        for extra in ([], ["--resume"]):
            assert in_process(TRAIN)([*ARGS, "--output-dir", str(out), "--no-cpu-malloc-tuning", *extra]) == 2
            line = _refused_line(capsys, out, os.getpid())
            assert line.endswith(f"(lock file {lock.path}, touched 0 s ago); wait for it to end or choose "
                                 "another --output-dir")
        assert json.loads(lock.path.read_text())["argv"] == ["test"]
    assert not (tmp_path / "new").exists()  # the lock made both folders; nothing else was written


def test_lock_staleness_heartbeat_and_takeover(tmp_path):
    folder = tmp_path / "run"
    # the lock of a process of this machine that has died is taken over, and says whose it was
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with RunLock(folder) as lock:
        info = json.loads(lock.path.read_text())
    folder.mkdir()
    lock.path.write_text(json.dumps({**info, "pid": int(dead)}))
    with RunLock(folder) as lock:
        assert lock.took_over.startswith(f"the run of pid {dead} on {socket.gethostname()}")
        with pytest.raises(FolderInUse):
            RunLock(folder).acquire()
    other_host = {"pid": 1, "host": "elsewhere", "started": 0}
    for content, age, owner in ((other_host, 5, "the run of pid 1 on elsewhere"), (other_host, 3600, None),
                                (None, 5, "a run starting now"), (None, 3600, None)):
        lock = RunLock(folder, stale_after_s=600)
        lock.path.write_text(json.dumps(content) if content else "{half a js")  # None: being written
        os.utime(lock.path, (time.time() - age,) * 2)
        if owner is None:  # no heartbeat for an hour: stale
            lock.acquire()
            lock.release()
        else:
            with pytest.raises(FolderInUse, match=f"is in use by {owner}"):
                lock.acquire()
    with RunLock(folder, heartbeat_s=0.05) as lock:  # the heartbeat keeps a long run's lock fresh
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    assert folder.is_dir() and not lock.path.exists()  # a folder the lock did not create is kept


# ---------------------------------------------------------------------------------------- a full disk

NO_SPACE = "No space left on device"


def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "full"
    args = [*TINY, "--checkpoint-every", "1", "--output-dir", out]
    proc = train(args, fault="enospc:.tmp-step_00000002/model.safetensors")
    assert proc.returncode == 1, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert error_lines(proc) == [
        f"reste-timm train: error: {ckpts / 'step_00000002'}: checkpoint not written ({NO_SPACE}: "
        f"{ckpts / '.tmp-step_00000002' / 'model.safetensors'}); the last good checkpoint, "
        f"{ckpts / 'step_00000001'}, is kept (continue with --resume)"]
    assert checkpoint_names(out) == ["step_00000001"] and not (out / ".lock").exists()
    assert_ok(train([*args, "--resume"]))
    assert_same_weights(uninterrupted / "final" / "model.safetensors", out / "final" / "model.safetensors")


def test_full_disk_while_final_is_saved_keeps_the_previous_final(uninterrupted, tmp_path):
    out = shutil.copytree(uninterrupted, tmp_path / "again")
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    proc = train([*TINY, "--output-dir", out, "--resume"], fault="enospc:final/")  # done: only finish()
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert line.startswith(f"reste-timm train: error: {out / 'final' / 'model.safetensors'}: not written "
                           f"({NO_SPACE}: {out / 'final'}/.tmp-save-")
    assert line.endswith(f"the last good checkpoint, {out / 'checkpoints' / 'epoch_00002'}, is kept "
                         "(continue with --resume)")
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
    load_model(f"local-dir:{out / 'final'}")


def _no_space(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def test_full_disk_in_save_pretrained_or_export_packed_leaves_the_folder_as_it_was(saved, tmp_path,
                                                                                    monkeypatch):
    model = timm.create_model(MODEL)
    target, packed = shutil.copytree(saved, tmp_path / "saved"), export_packed(model, tmp_path / "packed")
    folders = {f: {p.name: p.read_bytes() for p in f.iterdir()} for f in (target, packed)}
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    monkeypatch.setattr(reste_timm.hub.packed, "save_file", _no_space)
    with pytest.raises(WriteError, match=rf"^{target / 'model.safetensors'}: not written \({NO_SPACE}"):
        save_pretrained(model, target)
    with pytest.raises(WriteError, match=rf"^{packed / 'model.safetensors'}: not written \({NO_SPACE}"):
        export_packed(model, packed)
    monkeypatch.undo()
    assert {f: {p.name: p.read_bytes() for p in f.iterdir()} for f in (target, packed)} == folders
    load_model(f"local-dir:{target}")
    load_packed(packed)


# ----------------------------------------------------------------------------------------- Hub upload

TOKEN = {"HF_TOKEN": "fake"}  # uploads need one; the fake Hub takes any


def _uploaded(hub, repo):
    return {k: v for k, v in hub.files(repo).items() if k != ".gitattributes"}  # the Hub adds it


def test_push_to_hub_at_the_end_uploads_exactly_final(hub, tmp_path):
    out, repo = tmp_path / "pushed", "my-org/trained-and-pushed"
    proc = train([*TINY, "--epochs", "1", "--output-dir", out, "--push-to-hub", repo], env=TOKEN)
    assert_ok(proc)
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert _uploaded(hub, repo) == final
    assert f'timm.create_model("hf-hub:{repo}"'.encode() in final["README.md"]  # the card names the repo


def test_failed_upload_keeps_final_says_how_to_retry_and_exits_3(hub, tmp_path, monkeypatch):
    out, repo = tmp_path / "unpushed", "my-org/push-fails"
    hub.fail(500, path="/commit/", times=None)
    proc = train([*TINY, "--epochs", "1", "--output-dir", out, "--push-to-hub", repo], env=TOKEN)
    assert proc.returncode == 3, proc.stderr[-3000:]
    final = out / "final"
    (line,) = error_lines(proc)
    assert line.startswith(f"reste-timm train: error: trained, but the upload of {final} to {repo} failed (")
    assert "500" in line and "/commit/" in line  # the Hub's answer, as huggingface_hub words it
    assert line.endswith(f"the model stays in {final}: retry with `reste-timm push {final} {repo}` (in "
                         f"Python: reste_timm.hub.push_folder('{final}', '{repo}'))")
    assert (out / "results.json").is_file() and not (out / ".lock").exists()
    hub.clear_faults()
    monkeypatch.setenv("HF_TOKEN", "fake")
    assert push_main([str(final), repo]) == 0  # the retry the line names
    assert _uploaded(hub, repo) == {p.name: p.read_bytes() for p in final.iterdir()}


# ------------------------------------------------------------------------------------- many processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch2():
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


def test_exception_on_one_of_two_processes_ends_both(tmp_path):
    start = time.monotonic()
    proc = run_script(_launch2() + [FAULTY, *TINY, "--output-dir", str(tmp_path / "ddp")], timeout=150,
                      env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="raise-on-rank:1:2"))
    assert proc.returncode != 0
    shown = proc.stdout + proc.stderr
    assert "RuntimeError: injected fault on rank 1 at training batch 2" in shown
    # train.py's @record puts the failing rank's exception into the launcher's summary
    assert re.search(r"Root Cause.*?rank\s*:\s*1 .*?injected fault on rank 1", shown, re.S)
    assert time.monotonic() - start < 150  # run_script would have raised TimeoutExpired on a hang


# ------------------------------------------------------------------------------- many processes, faults

def test_signal_on_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    out = tmp_path / "ddp-preempted"
    proc = run_script(_launch2() + [FAULTY, *ARGS, "--output-dir", str(out)], timeout=150,
                      env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="signal-at:0:1:SIGTERM:1"))
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*75", proc.stderr)  # each one's, reported
    ckpt = out / "checkpoints" / "step_00000002"
    assert notice_lines(proc) == [PREEMPTED.format("SIGTERM", 0, 2, ckpt)], proc.stderr[-3000:]
    assert checkpoint_names(out) == ["step_00000002"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}


def test_sigterm_to_accelerate_launch_is_passed_to_both_processes(tmp_path):
    out, ready = tmp_path / "ddp-launcher", tmp_path / "ready"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               RESTE_FAULT=f"wait-at:0:1:{ready}")
    launcher = subprocess.Popen(_launch2() + [FAULTY, *ARGS, "--output-dir", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, launcher)
        launcher.send_signal(signal.SIGTERM)  # only the launcher: torch elastic sends it on to its workers
        time.sleep(1)  # (forwarded asynchronously: on a busy machine they may stop one step later)
        Path(f"{ready}.go").touch()
        _, err = launcher.communicate(timeout=150)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    (line,) = [line for line in err.splitlines() if line.startswith("reste-timm train: ")]
    found = re.fullmatch(r"reste-timm train: preempted by SIGTERM at epoch \d step \d; checkpoint "
                         r"(\S+)/(step_\d+) saved \(continue with --resume\)", line)
    assert found and found[1] == str(out / "checkpoints") and checkpoint_names(out) == [found[2]], err[-3000:]


def test_full_disk_on_one_of_two_processes_ends_both_without_a_hang(tmp_path):
    out = tmp_path / "ddp-full"
    start = time.monotonic()
    proc = run_script(_launch2() + [FAULTY, *ARGS, "--output-dir", str(out)], timeout=150,
                      env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="enospc:random_states_1.pkl"))
    assert proc.returncode != 0 and time.monotonic() - start < 150
    ckpt, tmp = out / "checkpoints" / "epoch_00001", out / "checkpoints" / ".tmp-epoch_00001"
    assert sorted(error_lines(proc)) == [
        f"reste-timm train: error: [rank 0] {ckpt}: checkpoint not written: the write failed on 1 other "
        "process(es); no checkpoint had been saved yet",
        f"reste-timm train: error: [rank 1] {ckpt}: checkpoint not written ({NO_SPACE}: "
        f"{tmp / 'random_states_1.pkl'}); no checkpoint had been saved yet"], proc.stderr[-3000:]
    assert checkpoint_names(out) == [] and not (out / ".lock").exists()
