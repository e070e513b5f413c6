"""Pieces shared by the binary model files: the conv factory, the BN-before-classifier head, the
pretrained cfg and the checkpoint filter every model is built with."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg

from ..files import compare_shapes
from ..nn.layers import BinaryConv2d
from ..nn.packing import unpack_state_dict
from ._pretrained import check_published, hub_id

ConvFactory = Callable[..., nn.Module]

# Normalisation of the reference code (docs/method.md, section 6): timm's ImageNet defaults.
RESTE_MEAN = (0.485, 0.456, 0.406)
RESTE_STD = (0.229, 0.224, 0.225)


def build_checked(cls, variant: str, pretrained: bool, **kwargs):
    """``build_model_with_cfg`` with the checkpoint filter, after :func:`check_published` when
    ``pretrained``: a registered model without published weights fails at once, naming itself."""
    if pretrained:
        check_published(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"),
                        kwargs.get("cache_dir"))
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=strict_pretrained_filter,
                                **kwargs)


def make_conv_factory(binary: bool = True, estimator: str = "reste",
                      binarize_input: bool = True) -> ConvFactory:
    """Returns ``conv(in, out, kernel, stride=1, padding=0)`` for the layers that the paper binarizes.

    Args:
        binary: False builds ordinary ``nn.Conv2d`` (the full-precision baselines).
        estimator: Registered estimator name for the binary convs.
        binarize_input: False gives 1W/32A.
    """
    if not binary:
        return partial(nn.Conv2d, bias=False)
    return partial(BinaryConv2d, estimator=estimator, binarize_input=binarize_input, bias=False)


class HeadBatchNorm(nn.BatchNorm1d):
    """The reference's ``bn2 = BatchNorm1d(C)`` before the classifier, also usable on unpooled maps.

    timm's API lets a user remove pooling (``reset_classifier(0, '')``); the per-channel affine
    normalisation is the same on (N, C) and (N, C, H, W), so only the input check is relaxed.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2D, 3D or 4D input, got {x.dim()}D")


class BnHeadMixin:
    """timm head API for models whose head is ``pool -> bn2 -> classifier`` (the reference ResNets).

    The model sets ``self.num_features`` and calls :meth:`_build_head`, which creates
    ``self.global_pool``, ``self.bn2`` and the classifier attribute named by ``self._classifier_name``.
    """

    _classifier_name = "fc"

    def _build_head(self, num_classes: int, global_pool: str, bn_first: bool = True) -> None:
        """Builds (or rebuilds) pooling, ``bn2`` and the classifier.

        ``bn2`` has ``head_hidden_size`` features, so a pooling that concatenates (``catavgmax``)
        gets a matching one; an existing ``bn2`` of the right size is kept (with its statistics).
        ``bn_first`` only orders the modules (hence the state-dict keys and the parameters) as the
        reference does: ``bn2`` before the classifier, except in the CIFAR ResNet-18.
        """
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        old_bn = getattr(self, "bn2", None)
        if bn_first:
            self._build_head_bn(old_bn)
        classifier = (nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0
                      else nn.Identity())
        setattr(self, self._classifier_name, classifier)
        if not bn_first:
            self._build_head_bn(old_bn)

    def _build_head_bn(self, old_bn: Optional[nn.Module]) -> None:
        if old_bn is None or old_bn.num_features != self.head_hidden_size:
            self.bn2 = HeadBatchNorm(self.head_hidden_size)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        """The classifier module (or its attribute name)."""
        name = self._classifier_name
        return name if name_only else getattr(self, name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier (and optionally the pooling); ``num_classes=0`` removes it."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        anchor = self.bn2.weight  # always there: the new layers follow its device and dtype
        self._build_head(num_classes, global_pool)
        getattr(self, self._classifier_name).to(anchor.device, anchor.dtype)
        self.bn2.to(anchor.device, anchor.dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, ``bn2``, dropout (``drop_rate``, 0 in the paper), then the classifier unless
        ``pre_logits``."""
        x = self.bn2(self.global_pool(x))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else getattr(self, self._classifier_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def reste_cfg(variant: str, **kwargs) -> Dict[str, Any]:
    """A pretrained cfg with the fields all models here share; each family's ``_cfg`` adds its own."""
    return {"hf_hub_id": hub_id(variant), "interpolation": "bilinear", "mean": RESTE_MEAN, "std": RESTE_STD,
            "first_conv": "conv1", "license": "apache-2.0", **kwargs}


def _names(value: Any) -> Tuple[str, ...]:
    """A pretrained_cfg module entry (``classifier``, ``first_conv``): None, a name or names."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def strict_pretrained_filter(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn`` that refuses partial loads inside ``timm.create_model`` itself.

    When ``num_classes`` differs from the checkpoint, timm loads non-strictly and only logs missing
    keys; this checks every key and shape first, except the classifier and the stem conv weight,
    which timm replaces or adapts afterwards.

    Raises:
        CheckpointError: Naming the weight source (folder, file or Hub id) and the key.
    """
    state_dict = unpack_state_dict(state_dict)  # a packed folder (export_packed) loads like a float one
    cfg = getattr(model, "pretrained_cfg", {})
    exempt = {f"{c}.{p}" for c in _names(cfg.get("classifier")) for p in ("weight", "bias")}
    exempt |= {f"{c}.weight" for c in _names(cfg.get("first_conv"))}
    source = cfg.get("file") or cfg.get("hf_hub_id") or "pretrained weights"
    compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
             {k: tuple(v.shape) for k, v in state_dict.items()}, source,
             cfg.get("architecture") or type(model).__name__, frozenset(exempt))
    return state_dict
