"""The run folder on disk: checkpoints written atomically, the newest complete one, the metrics log.

A checkpoint is ``accelerator.save_state`` into ``checkpoints/.tmp-<name>``, fsynced, then renamed to
``checkpoints/<name>`` (``epoch_00003``, ``step_00000120``): a run killed at any point leaves the
last complete checkpoint intact and at most a ``.tmp-*`` folder, which is never loaded. A write that
fails (a full disk) on any process is agreed on by all of them, so none waits for another that gave up;
the ``.tmp-*`` folder is then removed and every process raises :class:`~reste_timm.files.WriteError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..files import WriteError, fsync_dir, fsync_file, write_reason
from .collective import agree

__all__ = ["MetricsLog", "count_failures", "latest_checkpoint", "remove_partial_checkpoints",
           "save_checkpoint"]

_CKPT = re.compile(r"^(epoch|step)_(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)


def count_failures(accelerator, error: Optional[BaseException]) -> int:
    """How many processes failed a step, this one's ``error`` included; a barrier every process must reach.

    With several processes this is one all-reduce, so a process whose write failed tells the others
    instead of leaving them waiting for it in the next collective.
    """
    return int(agree(accelerator, error is not None, "sum"))


def _discard(folder: Path) -> None:
    """Removes a checkpoint folder by renaming it to ``.tmp-*`` first (atomic), then deleting it.

    A run killed while deleting leaves a ``.tmp-*`` folder, never a half-deleted folder under a
    checkpoint name (whose fresh mtime would make it look like the latest one).
    """
    trash = folder.with_name(f".tmp-old-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, checkpoints_dir: Path, name: str, keep: int = 2) -> Path:
    """``accelerator.save_state`` into a temporary folder, fsync, then an atomic rename.

    A run killed while writing leaves only a ``.tmp-*`` folder, which :func:`latest_checkpoint` ignores;
    the last complete checkpoint stays intact. Older complete checkpoints beyond ``keep`` are removed.

    Raises:
        WriteError: Writing failed on some process (a full disk): on every process, after the
            ``.tmp-*`` folder was removed; the previous checkpoints are untouched.
    """
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}"

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints_dir.mkdir(parents=True, exist_ok=True)

    def publish():
        _fsync_tree(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)

    _together(accelerator, final, tmp, prepare if accelerator.is_main_process else None)
    _together(accelerator, final, tmp, lambda: accelerator.save_state(str(tmp)))
    _together(accelerator, final, tmp, publish if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        for old in _complete_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
            with contextlib.suppress(OSError):  # an old checkpoint left over is removed at the next save
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def _together(accelerator, final: Path, tmp: Path, step: Optional[Callable[[], object]]) -> None:
    """Runs one part of a checkpoint write on this process, then agrees with the others on its success.

    Any exception but an interrupt counts as a failed write (safetensors and ``torch.save`` report a
    full disk as their own error types); then every process raises, once ``tmp`` is removed.
    """
    error = None
    try:
        if step is not None:
            step()
    except Exception as e:  # noqa: BLE001  (re-raised below as a WriteError, chained)
        error = e
    failed = count_failures(accelerator, error)
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise WriteError(final, f"checkpoint not written ({write_reason(error)})") from error
    raise WriteError(final, f"checkpoint not written: the write failed on {failed} other process(es)")


def remove_partial_checkpoints(checkpoints_dir: Path) -> list:
    """Deletes the ``.tmp-*`` folders a killed run left behind; returns their names."""
    partial = sorted(p for p in checkpoints_dir.glob(".tmp-*")) if checkpoints_dir.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in partial]


def _complete_checkpoints(checkpoints_dir: Path):
    found = [p for p in checkpoints_dir.glob("*") if p.is_dir() and _CKPT.match(p.name)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The most recently completed checkpoint folder, or None."""
    found = _complete_checkpoints(checkpoints_dir) if checkpoints_dir.is_dir() else []
    return found[-1] if found else None


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch; on resume, lines past the resumed epoch are dropped."""

    def __init__(self, path: Path, resume_epoch: Optional[int] = None):
        self.path = path
        if resume_epoch is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] < resume_epoch]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_epoch is None and path.exists():
            path.unlink()

    def write(self, record: Dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
