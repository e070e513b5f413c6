"""Files on disk: the saved-folder file names, atomic writes, and the error every loader raises.

The lowest layer of the package (it imports nothing from it): the models' checkpoint filter, the
Hub code and the training loop all name a bad file the same way, through :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

__all__ = ["CARD_NAME", "CONFIG_NAME", "CheckpointError", "PICKLE_REFUSED", "PICKLE_SUFFIXES", "PathLike",
           "WEIGHTS_NAME", "atomic_write", "compare_shapes", "first_line", "fsync_dir"]

WEIGHTS_NAME = "model.safetensors"  # timm's preferred name: local-dir: and hf-hub: loading find it
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PathLike = Union[str, os.PathLike]
# Weight files that timm would read with torch.load (a pickle) when no safetensors file is there.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".tar", ".ckpt", ".pkl")
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temp file in the same folder, fsync and ``os.replace``.

    A crash, a full disk or any error leaves either the old file or the new one, never a truncated
    one under the real name; the temp file is removed on failure.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared model folder should be readable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
