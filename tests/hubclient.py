"""Pointing a huggingface_hub client that is already imported at the fake Hub (tests/fakehub.py)."""

from __future__ import annotations

import sys


def point_loaded_client_at(endpoint: str) -> None:
    """Repoint an *already imported* huggingface_hub at ``endpoint`` (prefer exporting HF_ENDPOINT
    before the first import). Every version copies the endpoint at import time: 0.2x into module
    globals (``from .constants import ENDPOINT`` in hf_api, lfs, _commit_api, ...; the resolve URL
    template in file_download), all versions into the module-level ``hf_api.api`` HfApi instance used
    by the top-level functions (huggingface_hub.model_info, upload_folder, ...). Offline mode and
    timeouts are likewise read once at import (``constants.HF_HUB_OFFLINE`` etc.)."""
    from huggingface_hub import constants, hf_api

    old, endpoint = constants.ENDPOINT, endpoint.rstrip("/")
    old_tpl = constants.HUGGINGFACE_CO_URL_TEMPLATE
    new_tpl = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "huggingface_hub" or name.startswith("huggingface_hub.")):
            for attr, was, now in [("ENDPOINT", old, endpoint),
                                   ("HUGGINGFACE_CO_URL_TEMPLATE", old_tpl, new_tpl)]:
                if getattr(module, attr, None) == was and attr in vars(module):
                    setattr(module, attr, now)
    if getattr(hf_api, "api", None) is not None and hf_api.api.endpoint == old:
        hf_api.api.endpoint = endpoint
