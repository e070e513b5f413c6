"""Shared fixtures: small real datasets that the tests make on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, n_train=(6, 6), n_val=(4, 3), size=16, seed=0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` with class-dependent colours."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", n_train), ("val", n_val)):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.full((size, size, 3), 60 + 120 * c, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "imgs")


def run_script(args, timeout=300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Runs a command of the project with the test interpreter; returns the completed process."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, *args] if str(args[0]).endswith(".py") else list(args)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole session: on a 2-core machine shared with subprocess runs,
    two OpenMP workers mostly wait on each other, and a fixed count avoids torch.compile recompiles."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
