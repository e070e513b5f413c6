#!/usr/bin/env python3
"""The lower bounds declared in pyproject.toml, as exact pins for the version-floor run.

    python3 .ci/floors.py            # prints "timm==1.0.25 huggingface_hub==0.23 ..." (torch excluded)
    python .ci/floors.py --check     # exits 1 unless this interpreter has exactly those versions

Every ``name>=version`` of ``[project] dependencies`` becomes ``name==version``, so ``make test-min``
installs what the project declares it supports, and ``--check`` proves it did. torch and torchvision
are left out: the Makefile pins each architecture's build (their declared floors are the aarch64
pins, which ``make test`` installs there).
"""

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib  # Python >= 3.11: the CI's interpreter (the package itself supports 3.10)

PINNED_BY_MAKEFILE = {"torch", "torchvision"}


def floors(pyproject: Path) -> dict:
    """``{distribution name: version}`` of every ``>=`` bound in the dependencies."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)\s*", dep)
        if match and match[1].lower() not in PINNED_BY_MAKEFILE:
            found[match[1]] = match[2]
    return found


def _release(version: str) -> tuple:
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check(pins: dict) -> int:
    """Compares the installed versions with the pins; prints one line per package."""
    bad = 0
    for name, version in pins.items():
        installed = metadata.version(name)
        same = _release(installed) == _release(version)
        bad += not same
        verdict = "ok" if same else "NOT THE FLOOR"
        print(f"{name:<16} declared >= {version:<8} installed {installed:<10} {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    pins = floors(Path(__file__).resolve().parents[1] / "pyproject.toml")
    if "--check" in sys.argv[1:]:
        sys.exit(check(pins))
    print(" ".join(f"{name}=={version}" for name, version in pins.items()))
