#!/usr/bin/env python
"""Test-only: runs ``reste-timm train``'s ``main`` with one fault injected, chosen by ``RESTE_FAULT``.

    RESTE_FAULT=kill-during:step_00000002  SIGKILL while that checkpoint is being written: its files
                                           are in .tmp-step_00000002, model.safetensors torn in half
    RESTE_FAULT=kill-after:step_00000005   SIGKILL right after that checkpoint is complete
    RESTE_FAULT=nan-at:1:1                 the training batch of epoch 1, step 1 becomes all NaN,
                                           once per process (the loss is then NaN)
    RESTE_FAULT=raise-on-rank:1:2          process 1 raises RuntimeError at its 2nd training batch
    RESTE_FAULT=signal-at:1:1[:SIG[:RANK]] the process sends itself SIGTERM (or SIGUSR1...) as the
                                           training batch of epoch 1, step 1 starts (only on RANK)
    RESTE_FAULT=signal-twice-at:1:1        as signal-at, then SIGTERM again from inside the write of
                                           the checkpoint that the first one caused
    RESTE_FAULT=wait-at:1:0:FILE           at that batch, writes FILE, then waits until FILE.go exists
                                           (the test sends a real signal meanwhile)
    RESTE_FAULT=enospc:PATTERN[:N]         the Nth (default 1st) file write whose path contains PATTERN
                                           writes 100 bytes, then fails with ENOSPC (no space left);
                                           writes are safetensors' save_file (accelerate's and
                                           save_pretrained's) and torch.save (accelerate's other files)

The command line is the train command's. tests/test_reliability.py launches this file as it launches
scripts/train.py (also under ``accelerate launch``); the package never imports it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import accelerate.utils.other
import safetensors.torch
import torch

import reste_timm.train.checkpoints as checkpoints
import reste_timm.train.loop as loop
import reste_timm.train.run as run


def die() -> None:
    """SIGKILL: no handler, no cleanup, no ``finally`` runs, as when the machine loses the job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during(train, name: str) -> None:
    real = checkpoints._fsync_tree

    def fsync_or_die(folder: Path) -> None:
        if folder.name == f".tmp-{name}":
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
            die()
        real(folder)

    checkpoints._fsync_tree = fsync_or_die


def kill_after(train, name: str) -> None:
    real = train.save_checkpoint

    def save_then_die(accelerator, checkpoints_dir, ckpt_name, keep=2):
        path = real(accelerator, checkpoints_dir, ckpt_name, keep)
        if ckpt_name == name:
            die()
        return path

    train.save_checkpoint = save_then_die


def _on_training_batch(fault):
    """Wraps ``loop._step_batch`` (shared with evaluation, which runs without grad)."""
    real = loop._step_batch

    def step_batch(batch, accelerator, channels_last):
        x, y = real(batch, accelerator, channels_last)
        return fault(x, y, accelerator) if torch.is_grad_enabled() else (x, y)

    loop._step_batch = step_batch


def nan_at(train, epoch: str, step: str) -> None:
    def poison(x, y, accelerator):
        return torch.full_like(x, float("nan")), y

    _at_training_batch(train, epoch, step, poison)


def raise_on_rank(train, rank: str, nth: str) -> None:
    count = [0]

    def fault(x, y, accelerator):
        count[0] += 1
        if accelerator.process_index == int(rank) and count[0] == int(nth):
            raise RuntimeError(f"injected fault on rank {rank} at training batch {nth}")
        return x, y

    _on_training_batch(fault)


def _at_training_batch(train, epoch: str, step: str, action) -> None:
    """Runs ``x, y = action(x, y, accelerator)`` once, as the training batch of (epoch, step) starts."""
    states, fired = [], []

    class TrackedState(train.TrainState):
        def __init__(self):
            super().__init__()
            states.append(self)

    def fault(x, y, accelerator):
        if not fired and (states[0].epoch, states[0].step_in_epoch) == (int(epoch), int(step)):
            fired.append(True)
            x, y = action(x, y, accelerator)
        return x, y

    train.TrainState = TrackedState
    _on_training_batch(fault)


def signal_at(train, epoch: str, step: str, name: str = "SIGTERM", rank: str = "") -> None:
    def send(x, y, accelerator):
        if rank == "" or accelerator.process_index == int(rank):
            os.kill(os.getpid(), getattr(signal, name))
        return x, y

    _at_training_batch(train, epoch, step, send)


def signal_twice_at(train, epoch: str, step: str) -> None:
    sent = []

    def first(x, y, accelerator):
        os.kill(os.getpid(), signal.SIGTERM)
        sent.append(True)
        return x, y

    _at_training_batch(train, epoch, step, first)
    real = accelerate.utils.other.safe_save_file

    def save_with_a_second_signal(tensors, filename, metadata=None):
        if sent and "/.tmp-step_" in str(filename):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in the middle of the write
            sent.clear()
        return real(tensors, filename, metadata=metadata)

    accelerate.utils.other.safe_save_file = save_with_a_second_signal


def wait_at(train, epoch: str, step: str, *file: str) -> None:
    ready = Path(":".join(file))

    def wait(x, y, accelerator):
        ready.write_text(str(os.getpid()))
        go = ready.with_name(ready.name + ".go")
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return x, y

    _at_training_batch(train, epoch, step, wait)


def enospc(train, pattern: str, nth: str = "1") -> None:
    seen = [0]

    def failing(real):
        def write(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and pattern in str(f):
                seen[0] += 1
                if seen[0] == int(nth):
                    Path(f).write_bytes(b"\0" * 100)  # the disk filled up part way through the file
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real(obj, f, *args, **kwargs)

        return write

    accelerate.utils.other.safe_save_file = failing(accelerate.utils.other.safe_save_file)
    safetensors.torch.save_file = failing(safetensors.torch.save_file)
    torch.save = failing(torch.save)


FAULTS = {"kill-during": kill_during, "kill-after": kill_after, "nan-at": nan_at,
          "raise-on-rank": raise_on_rank, "signal-at": signal_at, "signal-twice-at": signal_twice_at,
          "wait-at": wait_at, "enospc": enospc}


def main() -> int:
    kind, *params = os.environ["RESTE_FAULT"].split(":")
    FAULTS[kind](run, *params)
    return run.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
