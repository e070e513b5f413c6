"""reste-timm: binary neural networks trained with ReSTE, as timm models.

``import reste_timm`` registers the models with timm.
"""

from . import models  # noqa: F401  (registers the models with timm)
from .annealing import ExponentAnnealing, annealed_exponent
from .estimators import (
    fused_backward_mode,
    get_estimator,
    list_estimators,
    register_estimator,
    set_fused_backward,
    sign_approx,
    sign_ede,
    sign_reste,
    sign_ste,
)
from .hub import (
    CheckpointError,
    check_folder,
    check_pretrained,
    convert_official_checkpoint,
    load_model,
    push_to_hub,
    save_pretrained,
)
from .indicators import estimating_error, gradient_stability
from .layers import BinaryConv2d, binary_layers, set_exponent, set_progress, set_weight_cache
from .packing import export_packed, load_packed, summary, unpack_state_dict

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "check_folder", "check_pretrained", "convert_official_checkpoint", "load_model",
    "push_to_hub", "save_pretrained", "export_packed", "load_packed", "summary", "unpack_state_dict",
    "set_fused_backward", "fused_backward_mode", "set_weight_cache",
    "BinaryConv2d", "ExponentAnnealing", "annealed_exponent", "binary_layers", "estimating_error",
    "get_estimator", "gradient_stability", "list_estimators", "register_estimator", "set_exponent",
    "set_progress", "sign_approx", "sign_ede", "sign_reste", "sign_ste",
]
