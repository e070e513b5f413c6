"""Files on disk: the saved-folder file names, atomic writes, and the errors every loader and saver raises.

The lowest layer of the package (it imports nothing from it): the models' checkpoint filter, the
Hub code and the training loop all name a bad file the same way, through :class:`CheckpointError`,
and a file they could not write (a full disk) through :class:`WriteError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

__all__ = ["CARD_NAME", "CONFIG_NAME", "CheckpointError", "PICKLE_REFUSED", "PICKLE_SUFFIXES", "PathLike",
           "STAGING_PREFIX", "WEIGHTS_NAME", "WriteError", "atomic_write", "compare_shapes", "first_line",
           "fsync_dir", "fsync_file", "save_files", "write_reason"]

WEIGHTS_NAME = "model.safetensors"  # timm's preferred name: local-dir: and hf-hub: loading find it
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PathLike = Union[str, os.PathLike]
# Weight files that timm would read with torch.load (a pickle) when no safetensors file is there.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".tar", ".ckpt", ".pkl")
STAGING_PREFIX = ".tmp-save-"  # save_files' staging folder inside the target folder
PICKLE_REFUSED = ("not a .safetensors file: refusing to unpickle weights (a pickle can run code when "
                  "loaded); convert them to safetensors, or pass allow_pickle=True to read them with "
                  "torch.load(weights_only=True)")


class CheckpointError(ValueError):
    """A saved model (folder, Hub file or checkpoint) that cannot be loaded as it is.

    Attributes:
        file: The offending file (or folder).
        key: The config or state-dict key at fault, when there is one.
        problem: What is wrong with it.
    """

    def __init__(self, file: PathLike, key: Optional[str], problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{file} [{key}]" if key else str(file)
        super().__init__(f"{where}: {problem}")


class WriteError(OSError):
    """A file or folder that could not be written (a full disk, a quota, a permission).

    Raised by the savers once they have removed their temporary files, so whatever was at ``path``
    before the write is still there, unchanged. An ``OSError``, so code that catches those catches it.

    Attributes:
        path: The file or folder that was being written.
        problem: What went wrong.
    """

    def __init__(self, path: PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.filename = str(path), problem, str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def fsync_dir(folder: Path) -> None:
    """Makes renames inside ``folder`` durable; a platform that cannot open a directory skips it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_reason(err: BaseException) -> str:
    """Why a write failed, for a :class:`WriteError`: ``No space left on device: FILE`` for an OSError.

    safetensors and ``torch.save`` report a full disk as their own error types; their first line is used.
    """
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return first_line(err)


def fsync_file(path: Path) -> None:
    """Flushes a written file to the disk (a crash after the rename must not find it empty)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temp file in the same folder, fsync and ``os.replace``.

    A crash, a full disk or any error leaves either the old file or the new one, never a truncated
    one under the real name; the temp file is removed on failure. The temp file keeps ``path``'s
    suffix (``torch.export.save`` insists on ``.pt2``).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared model folder should be readable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_files(folder: PathLike, writers: Mapping[str, Callable[[Path], None]],
               check: Optional[Callable[[Path], object]] = None) -> Path:
    """Writes several files into ``folder`` so that a failure leaves the folder exactly as it was.

    Every file is first written (``writers[name](path)``) and fsynced in a staging folder inside
    ``folder`` (same file system, so renames are atomic), then ``check`` runs on the staging folder,
    and only then are the files renamed into place, in the order of ``writers``: put the file that
    marks a folder complete (a saved model's ``config.json``) last. A full disk, an exception or an
    interrupt while staging removes the staging folder and leaves the previous files untouched, so a
    folder that loaded before still loads. Staging folders of killed saves are removed first.

    Args:
        folder: Target folder, created if needed.
        writers: File name -> function writing that file at the path it is given.
        check: Called with the staging folder once every file is in it; what it raises propagates.

    Returns:
        The folder.

    Raises:
        WriteError: A file could not be written or moved into place, naming it (the message of an
            interrupt or of ``check`` is passed through unchanged).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as e:
        raise WriteError(folder, f"not written ({write_reason(e)})") from e
    try:
        for name, write in writers.items():
            _stage_one(stage, folder, name, write)
        if check is not None:
            check(stage)
        for name in writers:
            try:
                os.replace(stage / name, folder / name)
            except OSError as e:
                raise WriteError(folder / name, f"not moved into place ({write_reason(e)})") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    fsync_dir(folder)
    return folder


def _stage_one(stage: Path, folder: Path, name: str, write: Callable[[Path], None]) -> None:
    try:
        write(stage / name)
        fsync_file(stage / name)
    except Exception as e:  # noqa: BLE001  (safetensors, torch and the OS each report a full disk their way)
        raise WriteError(folder / name, f"not written ({write_reason(e)}); the folder's previous files "
                         "are kept") from e


def compare_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], file: PathLike, name: str,
                   exempt: frozenset = frozenset()) -> None:
    """Checks that ``found`` has exactly the keys and shapes of ``expected`` (but the ``exempt`` keys).

    Raises:
        CheckpointError: Naming ``file`` and the first missing, unexpected or mis-shaped key.
    """
    expected = {k: v for k, v in expected.items() if k not in exempt}
    found = {k: v for k, v in found.items() if k not in exempt}
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(file, missing[0], f"missing key ({name} expects it; {len(missing)} missing)")
    extra = [k for k in found if k not in expected]
    if extra:
        raise CheckpointError(file, extra[0],
                              f"unexpected key ({name} has no such tensor; {len(extra)} extra)")
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise CheckpointError(file, key, f"shape {tuple(found[key])} but {name} expects {shape}")
