"""reste-timm: binary neural networks trained with ReSTE, as timm models.

``import reste_timm`` registers the models with timm. The package is layered by role, each layer
importing only the ones below it: :mod:`reste_timm.nn` (the method), :mod:`reste_timm.models`,
:mod:`reste_timm.hub` (checkpoints), :mod:`reste_timm.train`, :mod:`reste_timm.analysis`, and the
command line (:mod:`reste_timm.cli`) on top. docs/architecture.md draws the flow.
"""

from . import models  # noqa: F401  (registers the models with timm)
from .analysis.summary import summary
from .deployment import deploy, export_onnx, export_pt2, load_packed
from .files import CheckpointError
from .hub import (
    check_folder,
    check_pretrained,
    convert_official_checkpoint,
    export_packed,
    load_model,
    push_folder,
    push_to_hub,
    save_pretrained,
)
from .nn import (
    BinaryConv2d,
    Estimator,
    ExponentAnnealing,
    annealed_exponent,
    binary_layers,
    estimating_error,
    get_estimator,
    gradient_stability,
    list_estimators,
    native_kernels,
    register_estimator,
    set_exponent,
    set_progress,
    set_weight_cache,
    sign_approx,
    sign_ede,
    sign_reste,
    sign_ste,
)
from .nn.packing import unpack_state_dict
from .version import __version__

__all__ = [
    "__version__", "CheckpointError", "check_folder", "check_pretrained", "convert_official_checkpoint",
    "load_model", "push_folder", "push_to_hub", "save_pretrained", "export_packed", "load_packed", "summary",
    "deploy", "export_onnx", "export_pt2",
    "unpack_state_dict", "Estimator", "native_kernels", "set_weight_cache",
    "BinaryConv2d", "ExponentAnnealing", "annealed_exponent", "binary_layers", "estimating_error",
    "get_estimator", "gradient_stability", "list_estimators", "register_estimator", "set_exponent",
    "set_progress", "sign_approx", "sign_ede", "sign_reste", "sign_ste",
]
