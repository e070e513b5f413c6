"""One run per output folder: ``OUTPUT/.lock``, taken before anything is written, released on exit.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS) and holds the owner's pid,
host, pid namespace, start time and command line. While the run lives, a daemon thread touches it
every ``heartbeat_s`` seconds. A lock is stale, and taken over, when its owner is on this machine
(same host name and pid namespace) and its pid is dead, or, for an owner elsewhere, when its
heartbeat is older than ``stale_after_s``: a run killed with SIGKILL, or whose machine died, does not
keep its folder locked. A folder that the lock created is removed again on release if nothing else
was written into it, so a run that stops on bad input leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..files import PathLike, WriteError, write_reason

__all__ = ["FolderInUse", "HEARTBEAT_S", "LOCK_NAME", "RunLock", "STALE_AFTER_S"]

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats


class FolderInUse(RuntimeError):
    """Another live run holds the folder's lock; the message names the folder, its pid, host and start."""


def _pid_namespace() -> Optional[int]:
    """The pid namespace's inode (Linux), so that two containers sharing a host name are told apart."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """The lock of one output folder; :meth:`acquire` it before writing there, :meth:`release` after.

    Args:
        folder: The run's output folder (created by :meth:`acquire` if missing).
        argv: The command line, recorded for whoever finds the folder locked.
        heartbeat_s: Seconds between two touches of the lock file.
        stale_after_s: A lock from another machine untouched for this long is stale.
    """

    def __init__(self, folder: PathLike, argv: Sequence[str] = (), heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.argv, self.heartbeat_s, self.stale_after_s = list(argv), heartbeat_s, stale_after_s
        self._created: List[Path] = []  # folders acquire() made, deepest first
        self._stop: Optional[threading.Event] = None
        self.took_over: Optional[str] = None  # who held the stale lock that acquire() replaced

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one.

        Raises:
            FolderInUse: A live run holds it; the message names it.
            WriteError: The folder or the lock file cannot be created.
        """
        self._make_folder()
        for _ in range(3):  # a stale lock removed here may be re-taken by another run at once
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                self._remove_created()
                raise WriteError(self.path, f"cannot create the run's lock ({write_reason(e)})") from e
            self._write(fd)
            self._start_heartbeat()
            return
        raise FolderInUse(f"{self.folder} is being locked by another run (lock file {self.path}): "
                          "try again, or choose another --output-dir")

    def release(self) -> None:
        """Stops the heartbeat, removes the lock file, then the folders it created if they are empty."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._remove_created()

    def _make_folder(self) -> None:
        missing, parent = [], self.folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(self.folder, f"cannot create the output folder ({write_reason(e)})") from e
        self._created = missing

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: a run that wrote anything keeps its folder
            except OSError:
                break
        self._created = []

    def _write(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
                "started": time.time(), "argv": self.argv}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())

    def _start_heartbeat(self) -> None:
        stop = self._stop = threading.Event()
        path, every = self.path, self.heartbeat_s

        def beat():
            while not stop.wait(every):
                with contextlib.suppress(OSError):
                    os.utime(path)

        threading.Thread(target=beat, name="reste-timm-lock-heartbeat", daemon=True).start()

    def read(self) -> tuple:
        """The lock file's content (None if unreadable or being written) and its age in seconds.

        Raises:
            FileNotFoundError: No lock file.
        """
        age = time.time() - self.path.stat().st_mtime
        try:
            info = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return None, age
        return (info if isinstance(info, dict) else None), age

    def is_stale(self, info: Optional[Dict[str, Any]], age: float) -> bool:
        """Whether a lock with this content and age belongs to no live run."""
        if info is None:  # unreadable: a lock being written now, or garbage left long ago
            return age > self.stale_after_s
        local = info.get("host") == socket.gethostname() and info.get("pid_namespace") == _pid_namespace()
        if local and isinstance(info.get("pid"), int):
            return not _pid_alive(info["pid"])
        return age > self.stale_after_s

    def _take_over_if_stale(self) -> None:
        try:
            info, age = self.read()
        except FileNotFoundError:
            return  # released meanwhile: try again
        if not self.is_stale(info, age):
            self._remove_created()
            raise FolderInUse(self._in_use_message(info, age))
        with contextlib.suppress(FileNotFoundError):
            again, _ = self.read()
            if again == info:  # still the stale one, not a lock another run took meanwhile
                self.path.unlink()
                self.took_over = self._owner(info)

    @staticmethod
    def _owner(info: Optional[Dict[str, Any]]) -> str:
        if info is None:
            return "an unreadable lock"
        started = info.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) \
            if isinstance(started, (int, float)) else "?"
        return f"the run of pid {info.get('pid')} on {info.get('host')} since {since}"

    def _in_use_message(self, info: Optional[Dict[str, Any]], age: float) -> str:
        who = "a run starting now" if info is None else self._owner(info)
        return (f"{self.folder} is in use by {who} (lock file {self.path}, touched {age:.0f} s ago); "
                "wait for it to end or choose another --output-dir")
