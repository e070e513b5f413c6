"""The method: sign estimators and their ops, the binary conv, exponent annealing and the indicators."""

from .annealing import ExponentAnnealing, annealed_exponent
from .estimators import (
    Estimator,
    get_estimator,
    list_estimators,
    native_kernels,
    register_estimator,
    sign_approx,
    sign_ede,
    sign_reste,
    sign_ste,
)
from .indicators import estimating_error, gradient_stability
from .layers import BinaryConv2d, binary_layers, set_exponent, set_progress, set_weight_cache

__all__ = [
    "BinaryConv2d", "Estimator", "ExponentAnnealing", "annealed_exponent", "binary_layers",
    "estimating_error", "get_estimator", "gradient_stability", "list_estimators", "native_kernels",
    "register_estimator", "set_exponent", "set_progress", "set_weight_cache", "sign_approx", "sign_ede",
    "sign_reste", "sign_ste",
]
