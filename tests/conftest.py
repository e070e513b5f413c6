"""Shared fixtures: small real datasets the tests make on disk, and the fake Hub at the network boundary.

The fake Hub (tests/fakehub.py) is a real HTTP server on 127.0.0.1 that the unmodified huggingface_hub
client reaches through ``HF_ENDPOINT``. Every huggingface_hub version reads ``HF_ENDPOINT``,
``HF_HOME`` and its other settings once, at import, so the server's port is bound and exported here,
before anything imports huggingface_hub (timm, datasets and accelerate all do); the ``hub`` fixture
then starts serving. Nothing in the suite can reach huggingface.co: a dead local proxy catches any
request still aimed at a real host.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakehub import FakeHub  # noqa: E402

if "huggingface_hub" in sys.modules:  # too late: it already captured the real endpoint
    raise RuntimeError("huggingface_hub was imported before conftest.py could set HF_ENDPOINT")

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["train_helpers"]  # the fault tests' fixtures (uninterrupted, saved)
_HUB = FakeHub()  # binds 127.0.0.1:<free port> now; serves once the `hub` fixture starts it
HF_HOME = tempfile.mkdtemp(prefix="reste-timm-tests-hf-home-")
HUB_ENV = {
    "HF_ENDPOINT": _HUB.endpoint,
    "HF_HOME": HF_HOME,  # no token file, no shared cache
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_XET": "1",  # the fake has no Xet storage
    # HF_HUB_ETAG_TIMEOUT is left unset on purpose: when set (to anything but 10) it overrides the
    # etag_timeout= argument of hf_hub_download in every version, and it only takes whole seconds.
    "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    # Anything that still aims at a real host goes to a dead local proxy instead of out.
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}
os.environ.update(HUB_ENV)
# torch.compile's caches in a fresh folder per session: a cached graph keeps the backward of the ops as
# they were when it was compiled, so a stale cache would test old code.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reste-timm-tests-inductor-")
for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(var, None)

if os.environ.get("PYTHONSAFEPATH"):
    # make test-min tests the installed wheel: nothing (pytest-xdist's workers included) may put the
    # checkout on the path
    import reste_timm

    if Path(reste_timm.__file__).resolve().parent == ROOT / "reste_timm":
        raise RuntimeError(f"PYTHONSAFEPATH is set but reste_timm was imported from the checkout: "
                           f"{reste_timm.__file__}")


@pytest.fixture(scope="session")
def hub():
    """The fake Hub (a test double of huggingface.co's HTTP API), serving on HF_ENDPOINT."""
    _HUB.start()
    yield _HUB
    _HUB.stop()


@pytest.fixture(autouse=True)
def _reset_hub():
    """After each test: forget calls, faults and switches (repos persist: use unique repo ids), and
    fail the test if the fake itself crashed on a request (it answered 500 "fakehub internal error")."""
    yield
    errors, _HUB.errors[:] = list(_HUB.errors), []
    _HUB.reset()
    assert not errors, "fakehub crashed on a request:\n" + errors[0]


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


def launch_two_cpu_processes() -> list[str]:
    """``accelerate launch`` of two CPU processes (DDP over gloo) on a free port: the suite's workers run
    such launches side by side, which would share accelerate's default port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def run_script(args, timeout=300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Runs a command of the project with the test interpreter; returns the completed process."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                    **(env or {}))
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


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same random state (torch, numpy, random), whichever tests ran before it:
    pytest-xdist's workers take the files in any order, and a test must not pass or fail by that."""
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
