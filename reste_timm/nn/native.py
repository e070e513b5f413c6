"""Building and loading the package's C kernels (``csrc/*.c`` package data) with the system compiler.

The kernels are plain C (no PyTorch headers), so a build takes about a second; each ``.c`` file is one
translation unit, compiled where it lies (its ``#include "..."`` parts are the ``.h`` files beside it).
Each library is cached under ``$RESTE_TIMM_CACHE`` (default ``~/.cache/reste_timm``), keyed by a hash
of the source and its headers, the flags, the compiler and the CPU, and written atomically (several
processes may build at once). The registered ops call them through ``ctypes`` on CPU tensors' memory.

Without a C compiler, on a platform other than Linux, with ``RESTE_TIMM_NATIVE=0``, or when a build
fails, :func:`load_library` returns None once with a warning, and the ops run their torch
implementation instead (the same numbers up to float rounding, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

__all__ = ["BASE_FLAGS", "cpu_features", "cpuinfo_line", "load_library", "load_op_library", "native_enabled"]

# No -ffast-math: NaN, comparisons and rounding keep IEEE semantics. The two -fno flags only let the
# compiler assume no errno and no FP traps (unused here), which it needs to if-convert and vectorize;
# -ffp-contract=fast lets it fuse multiply-adds where the CPU has FMA (ISO -std=c99 turns that off).
BASE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
              "-fopenmp", "-shared", "-fPIC", "-std=c99")

_lock = threading.Lock()
_libraries: Dict[tuple, Optional[ctypes.CDLL]] = {}  # a cache of built libraries, not a switch
_op_libraries: Dict[tuple, bool] = {}  # the op libraries tried in this process: loaded or not


def native_enabled() -> bool:
    """False when ``RESTE_TIMM_NATIVE=0`` asks for the torch implementations only."""
    return os.environ.get("RESTE_TIMM_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("RESTE_TIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reste_timm")
    return Path(root) / "kernels"


def cpuinfo_line(*keys: str) -> Optional[str]:
    """The first line of ``/proc/cpuinfo`` whose field name is one of ``keys`` (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in keys:
                return line
    except OSError:
        pass
    return None


def cpu_features() -> str:
    """The CPU's feature flags: -march=native code built on one CPU may not run on another that shares
    the cache folder (a home directory on a cluster), so they are part of the library's name."""
    return cpuinfo_line("flags", "Features") or platform.processor()


def _sources(path: Path) -> str:
    """The text a build of ``path`` reads: the file and the headers beside it (its ``#include "..."``
    parts), so that the cache key changes with any of them."""
    headers = sorted(path.parent.glob("*.h"))
    return "\0".join(p.read_text() for p in (path, *headers))


def _build(compiler: str, path: Path, flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        # compiled where it lies, so that its #include "..." parts resolve beside it
        proc = subprocess.run([compiler, *flags, str(path), "-o", str(out)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise OSError(f"{compiler} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: a concurrent process sees no half-written library


def _open(path: Path, flags: Sequence[str]) -> Optional[ctypes.CDLL]:
    name = path.name
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        warnings.warn(f"reste_timm: no C compiler (cc/gcc, or $CC) on this {platform.system()} machine: "
                      f"{name} runs its torch implementation (slower)", RuntimeWarning, stacklevel=4)
        return None
    key = hashlib.sha256("\0".join([_sources(path), *flags, compiler, platform.machine(),
                                    cpu_features()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{Path(name).stem}_{key}.so"
    try:
        if not target.exists():
            _build(compiler, path, flags, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"reste_timm: building {name} failed, its torch implementation runs instead (slower): "
                      f"{err}", RuntimeWarning, stacklevel=4)
        return None


def load_library(name: str, extra_flags: Sequence[str] = ()) -> Optional[ctypes.CDLL]:
    """The compiled ``csrc/<name>`` of this package, built on first use; None where unavailable.

    Tried once per process and source (a failure warns once); later calls return the same object.

    Args:
        name: The C file's name in ``reste_timm/nn/csrc`` or a path to another ``.c`` file.
        extra_flags: Compiler flags beyond :data:`BASE_FLAGS` (``-D`` choices, ``-mno-avx2``...).
    """
    if not native_enabled():
        return None
    path = Path(name) if os.sep in name else Path(__file__).parent / "csrc" / name
    flags = (*BASE_FLAGS, *extra_flags)
    cache_key = (str(path), flags)
    if cache_key in _libraries:
        return _libraries[cache_key]
    with _lock:
        if cache_key not in _libraries:
            _libraries[cache_key] = _open(path, flags)
        return _libraries[cache_key]


# ------------------------------------------------------------------------------ C++ op libraries
# A C++ file that registers CPU kernels of ops defined in Python (TORCH_LIBRARY_IMPL), linked with the C
# file whose functions it calls. It includes torch's headers, so it is built against the torch that runs
# (its version is part of the cache key) with the C++ ABI that torch was built with; about 10 s once.

def _torch_build_flags() -> list:
    """Include and link flags of the running torch, as torch.utils.cpp_extension gives them for CPU
    (not imported: its import logs a CUDA search on machines without CUDA)."""
    import torch

    root = Path(torch.__file__).parent
    lib = root / "lib"
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-I", str(root / "include"), "-I", str(root / "include" / "torch" / "csrc" / "api" / "include"),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _build_op(cc: str, cxx: str, c_path: Path, cpp_path: Path, flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, out = Path(tmp) / "kernel.o", Path(tmp) / target.name
        c_flags = [f for f in flags if f != "-shared"]
        steps = ([cc, *c_flags, "-c", str(c_path), "-o", str(obj)],
                 [cxx, "-O2", "-std=c++20", "-fPIC", "-shared", "-fopenmp", str(cpp_path), str(obj), "-o",
                  str(out), *_torch_build_flags()])
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise OSError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        os.replace(out, target)


def _open_op(c_path: Path, cpp_path: Path, flags: Sequence[str]) -> bool:
    import torch

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cc is None or cxx is None or platform.system() != "Linux":
        warnings.warn(f"reste_timm: no C and C++ compiler (cc and c++, or $CC and $CXX): {cpp_path.name} is "
                      f"not built, its ops run their Python implementation (slower calls)", RuntimeWarning,
                      stacklevel=4)
        return False
    parts = [_sources(c_path), cpp_path.read_text(), *flags, cc, cxx, torch.__version__,
             str(Path(torch.__file__).parent), platform.machine(), cpu_features()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{cpp_path.stem}_{key}.so"
    try:
        if not target.exists():
            _build_op(cc, cxx, c_path, cpp_path, flags, target)
        torch.ops.load_library(str(target))
        return True
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"reste_timm: building {cpp_path.name} failed, its ops run their Python implementation "
                      f"(slower calls): {err}", RuntimeWarning, stacklevel=4)
        return False


def load_op_library(cpp_name: str, c_name: str) -> bool:
    """Builds ``csrc/<cpp_name>`` (linked with ``csrc/<c_name>``) on first use and loads it into torch's
    dispatcher, registering the CPU kernels it defines; whether that succeeded.

    Tried once per process (a failure warns once); False where :func:`native_enabled` is off.
    """
    if not native_enabled():
        return False
    csrc = Path(__file__).parent / "csrc"
    key = (cpp_name, c_name)
    with _lock:
        if key not in _op_libraries:
            _op_libraries[key] = _open_op(csrc / c_name, csrc / cpp_name, BASE_FLAGS)
        return _op_libraries[key]
