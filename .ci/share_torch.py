#!/usr/bin/env python3
"""Hard-links the pinned torch build (and its CUDA wheels) from one venv into another.

    .venv/bin/python .ci/share_torch.py .venv-min

On x86_64 the pinned torch is a CUDA build: torch, triton and the ``nvidia-*`` wheels take about
5.4 GB per venv, and a CI machine with little free disk ran out of space installing it a second
time for the version-floor venv. Both venvs hold the very same files, so the floor venv gets hard
links (no second copy); pip then finds torch installed, at the pinned version, and installs only what
is missing. Run with the source venv's interpreter. Best effort: where linking fails (another file
system), it says so and pip installs a copy as before.
"""

import os
import sys
from importlib import metadata
from pathlib import Path

SHARED = ("torch", "torchvision", "triton")
SHARED_PREFIXES = ("nvidia-", "cuda-")


def _shared(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in SHARED or name.startswith(SHARED_PREFIXES)


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"{venv}: no lib/python3*/site-packages (not a venv)")
    return found[0]


def link_distributions(target: Path) -> int:
    """Links every file of the shared distributions into ``target``; returns how many."""
    count = 0
    for dist in metadata.distributions():
        if not _shared(dist.metadata["Name"]) or not dist.files:
            continue
        for rel in dist.files:
            if rel.parts[0] == "..":  # console scripts live in bin/: not needed by the tests
                continue
            src, dst = Path(dist.locate_file(rel)), target / rel
            if dst.exists() or not src.is_file():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
            count += 1
    return count


if __name__ == "__main__":
    site = _site_packages(Path(sys.argv[1]))
    try:
        print(f"share_torch: {link_distributions(site)} files hard-linked into {site}")
    except OSError as err:
        print(f"share_torch: not linked ({err}); pip installs a copy")
