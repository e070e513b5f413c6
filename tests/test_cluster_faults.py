"""The faults of a cluster, each provoked for real on tiny digits runs: preemption (SIGTERM, SIGUSR1),
two runs in one output folder, a full disk, a failed Hub upload, faults on one of two processes.

Faults that must happen at an exact point come from tests/fault_helpers/faulty_train.py, which runs
``reste-timm train``'s own ``main`` with one function patched. docs/RELIABILITY.md tabulates them.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
from conftest import ROOT, launch_two_cpu_processes, run_script
from train_helpers import (
    FAULTY,
    MODEL,
    TINY,
    TRAIN,
    assert_ok,
    assert_same_weights,
    checkpoint_names,
    error_lines,
    in_process,
    notice_lines,
    train,
)

import reste_timm.hub.packed
import reste_timm.train.run
from reste_timm.cli.push import main as push_main
from reste_timm.files import WriteError
from reste_timm.hub import (
    export_packed,
    load_model,
    load_packed,
    save_pretrained,
)
from reste_timm.train.lock import FolderInUse, RunLock

ARGS = [str(a) for a in TINY]
PREEMPTED = ("reste-timm train: preempted by {} at epoch {} step {}; checkpoint {} saved "
             "(continue with --resume)")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_push_to_hub_at_the_end_uploads_exactly_final(hub, tmp_path):
    out, repo = tmp_path / "pushed", "my-org/trained-and-pushed"
    proc = train([*TINY, "--epochs", "1", "--output-dir", out, "--push-to-hub", repo], env=TOKEN)
    assert_ok(proc)
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert _uploaded(hub, repo) == final
    assert f'timm.create_model("hf-hub:{repo}"'.encode() in final["README.md"]  # the card names the repo


@pytest.mark.slow
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

@pytest.mark.slow
def test_exception_on_one_of_two_processes_ends_both(tmp_path):
    start = time.monotonic()
    proc = run_script([*launch_two_cpu_processes(), FAULTY, *TINY, "--output-dir", str(tmp_path / "ddp")],
                      timeout=150, env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="raise-on-rank:1:2"))
    assert proc.returncode != 0
    shown = proc.stdout + proc.stderr
    assert "RuntimeError: injected fault on rank 1 at training batch 2" in shown
    # train.py's @record puts the failing rank's exception into the launcher's summary
    assert re.search(r"Root Cause.*?rank\s*:\s*1 .*?injected fault on rank 1", shown, re.S)
    assert time.monotonic() - start < 150  # run_script would have raised TimeoutExpired on a hang


# ------------------------------------------------------------------------------- many processes, faults

@pytest.mark.slow
def test_signal_on_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    out = tmp_path / "ddp-preempted"
    proc = run_script(launch_two_cpu_processes() + [FAULTY, *ARGS, "--output-dir", str(out)], timeout=150,
                      env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="signal-at:0:1:SIGTERM:1"))
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*75", proc.stderr)  # each one's, reported
    ckpt = out / "checkpoints" / "step_00000002"
    assert notice_lines(proc) == [PREEMPTED.format("SIGTERM", 0, 2, ckpt)], proc.stderr[-3000:]
    assert checkpoint_names(out) == ["step_00000002"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_is_passed_to_both_processes(tmp_path):
    out, ready = tmp_path / "ddp-launcher", tmp_path / "ready"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               RESTE_FAULT=f"wait-at:0:1:{ready}")
    launcher = subprocess.Popen([*launch_two_cpu_processes(), FAULTY, *ARGS, "--output-dir", str(out)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_each_ranks_error_line_is_one_write(monkeypatch):
    """Every rank prints its error at once to the stderr they share: each line must reach it in one
    write, or two ranks' lines interleave (print() writes the text and its newline apart; seen in a CI run
    of the test below: rank 1's line ran on into rank 0's)."""
    writes = []

    class Stderr:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    class TwoRanks:
        num_processes, process_index, is_main_process = 2, 1, False

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert reste_timm.train.run.fail(TwoRanks(), "disk full", 1, every_rank=True) == 1
    assert writes == ["reste-timm train: error: [rank 1] disk full\n"]


@pytest.mark.slow
def test_full_disk_on_one_of_two_processes_ends_both_without_a_hang(tmp_path):
    out = tmp_path / "ddp-full"
    start = time.monotonic()
    proc = run_script(launch_two_cpu_processes() + [FAULTY, *ARGS, "--output-dir", str(out)], timeout=150,
                      env=dict(CUDA_VISIBLE_DEVICES="", RESTE_FAULT="enospc:random_states_1.pkl"))
    assert proc.returncode != 0 and time.monotonic() - start < 150
    ckpt, tmp = out / "checkpoints" / "epoch_00001", out / "checkpoints" / ".tmp-epoch_00001"
    assert sorted(error_lines(proc)) == [
        f"reste-timm train: error: [rank 0] {ckpt}: checkpoint not written: the write failed on 1 other "
        "process(es); no checkpoint had been saved yet",
        f"reste-timm train: error: [rank 1] {ckpt}: checkpoint not written ({NO_SPACE}: "
        f"{tmp / 'random_states_1.pkl'}); no checkpoint had been saved yet"], proc.stderr[-3000:]
    assert checkpoint_names(out) == [] and not (out / ".lock").exists()
