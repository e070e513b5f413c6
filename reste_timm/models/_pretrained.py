"""Where the registered models' weights come from: their reserved Hub ids, checked before a download.

Each registered model's pretrained cfg names a Hub repo under ``reste-timm/``. Until weights are
uploaded there, timm would retry the network for half a minute and end in a generic error; instead,
``pretrained=True`` first looks in the local Hub cache, then asks the Hub once (one HEAD request, no
retries) whether the weights file exists, and fails at once with :class:`WeightsUnavailableError`
naming the model and the ways to get weights. Once weights are published, loading proceeds through
timm unchanged.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Optional

from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers, get_session
from timm.models import resolve_pretrained_cfg

from ..files import WEIGHTS_NAME, CheckpointError, PathLike, first_line

__all__ = ["HUB_ORG", "WeightsUnavailableError", "check_published", "hub_id"]

HUB_ORG = "reste-timm"
_HEAD_TIMEOUT_S = 10.0


class WeightsUnavailableError(CheckpointError):
    """``pretrained=True`` on a registered model whose Hub repo holds no weights (yet)."""


def hub_id(variant: str) -> str:
    """The hub repository reserved for a registered model name with its tag."""
    return f"{HUB_ORG}/{variant}"


def _config_hint(arch: str) -> str:
    """How to train ``arch``: its packaged config when there is one."""
    root = importlib.resources.files("reste_timm.configs")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.joinpath(f"{arch}.yaml").is_file():
            return f"train its config (`reste-timm train --config {folder.name}/{arch}`)"
    return f"train it (`reste-timm train --model {arch} --dataset ...`)"


def _hub_answer(repo: str, filename: str, revision: Optional[str]) -> str:
    """``"found"``, ``"missing"`` or why the Hub could not be asked, from one HEAD request."""
    if constants.HF_HUB_OFFLINE:
        return "not in the local Hub cache, and HF_HUB_OFFLINE is set"
    url = hf_hub_url(repo, filename, revision=revision)
    try:
        response = get_session().head(url, headers=build_hf_headers(), timeout=_HEAD_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001  (requests' or httpx's connection errors, by version)
        return f"not in the local Hub cache, and the Hub could not be reached ({first_line(err)})"
    if response.status_code < 400:
        return "found"
    if response.status_code in (401, 403, 404):
        return "missing"
    return f"the Hub answered HTTP {response.status_code}"


def check_published(arch: str, pretrained_cfg: Any = None, overlay: Optional[dict] = None,
                    cache_dir: Optional[PathLike] = None) -> None:
    """Fails fast when ``pretrained=True`` would download the reserved repo of ``arch`` and it is empty.

    Weights given another way (``file``, ``state_dict``, ``url``, another repo through ``hf-hub:`` or
    ``local-dir:``) are not checked here: timm loads those. Weights already in the Hub cache
    (``cache_dir``, as given to ``timm.create_model``, or the default one) are not asked for again.

    Raises:
        WeightsUnavailableError: Naming the model, the repo, and the ways to get weights.
    """
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    repo_spec = cfg.hf_hub_id
    if cfg.file or cfg.state_dict is not None or cfg.url or not repo_spec \
            or not repo_spec.startswith(f"{HUB_ORG}/"):
        return
    repo, _, revision = repo_spec.partition("@")
    revision = revision or None
    if isinstance(try_to_load_from_cache(repo, WEIGHTS_NAME, cache_dir=cache_dir, revision=revision), str):
        return
    answer = _hub_answer(repo, WEIGHTS_NAME, revision)
    if answer == "found":
        return
    why = "no weights are published for it yet" if answer == "missing" else answer
    name = f"{arch}.{cfg.tag}" if cfg.tag else arch
    raise WeightsUnavailableError(
        f"hf-hub:{repo}", None,
        f"{name}: pretrained=True, but {why}. To get weights: {_config_hint(arch)}; or load your own "
        "with timm.create_model('hf-hub:<your repo>', pretrained=True) or "
        "timm.create_model('local-dir:<folder>', pretrained=True)")
