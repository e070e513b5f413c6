"""VGG-small of the ReSTE paper (CIFAR), 1W/1A and full precision.

Layout of the reference implementation (docs/method.md, section 3): ``conv0`` FP, then binary
``conv1``..``conv5``; each conv is followed by relu then its BatchNorm; 2x2 max-pool after bn1, bn3
and bn5; flatten 512x4x4 and ``fc``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._common import build_checked, make_conv_factory, reste_cfg

__all__ = ["VGGSmall"]

_WIDTHS = (128, 128, 256, 256, 512, 512)
_POOL_AFTER = (1, 3, 5)


class VGGSmall(nn.Module):
    """VGG-small.

    The head flattens the final 512x4x4 map, so ``num_features`` is 512 (channels) and
    ``head_hidden_size`` 8192. ``global_pool="flatten"`` (default) adapts the map to 4x4 first,
    an identity at 32x32 inputs, so larger inputs also work; ``''`` keeps the map.

    Args:
        num_classes: Classifier outputs; 0 removes the classifier.
        in_chans: Input channels.
        global_pool: ``"flatten"`` or ``''``.
        binary: False gives the full-precision baseline.
        estimator: Sign estimator of the binary convs.
        binarize_input: False gives 1W/32A.
        drop_rate: Dropout before the classifier (timm's ``drop_rate``; 0, the paper's, is a no-op).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, global_pool: str = "flatten",
                 binary: bool = True, estimator: str = "reste", binarize_input: bool = True,
                 drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = float(drop_rate)
        conv_layer = make_conv_factory(binary, estimator, binarize_input)
        self.feature_info = []
        self.in_chans = in_chans  # read by timm (data config, save_config_for_hf)
        in_ch, reduction = in_chans, 1
        for i, width in enumerate(_WIDTHS):
            conv = nn.Conv2d(in_ch, width, 3, padding=1, bias=False) if i == 0 else \
                conv_layer(in_ch, width, 3, padding=1)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"act{i}", nn.ReLU())
            self.add_module(f"bn{i}", nn.BatchNorm2d(width))
            tap = f"bn{i}"
            if i in _POOL_AFTER:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
                tap, reduction = f"pool{i}", reduction * 2
            if i == 0 or i in _POOL_AFTER:
                self.feature_info.append(dict(num_chs=width, reduction=reduction, module=tap))
            in_ch = width
        self.num_features = in_ch
        self.reset_classifier(num_classes, global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv0|bn0", blocks=r"^(?:conv|bn|pool)(\d+)")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier; ``global_pool`` is ``"flatten"`` or ``''``."""
        anchor = getattr(self, "bn5", None)  # the new classifier follows its device and dtype
        if global_pool is None:
            global_pool = self.global_pool_type
        if global_pool not in ("flatten", ""):
            raise ValueError(f"VGG-small global_pool must be 'flatten' or '', got {global_pool!r}")
        self.num_classes, self.global_pool_type = num_classes, global_pool
        self.global_pool = (nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1)) if global_pool
                            else nn.Identity())
        self.head_hidden_size = self.num_features * 16 if global_pool else self.num_features
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if anchor is not None:
            self.fc.to(anchor.weight.device, anchor.weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(_WIDTHS)):
            x = getattr(self, f"bn{i}")(getattr(self, f"act{i}")(getattr(self, f"conv{i}")(x)))
            if i in _POOL_AFTER:
                x = getattr(self, f"pool{i}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vgg_small(variant: str, pretrained: bool = False, **kwargs) -> VGGSmall:
    return build_checked(VGGSmall, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(variant: str, **kwargs) -> Dict[str, Any]:
    return reste_cfg(variant, num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                     first_conv="conv0", classifier="fc", **kwargs)


default_cfgs = generate_default_cfgs({
    "vgg_small_1w1a_reste.cifar10": _cfg("vgg_small_1w1a_reste.cifar10"),
    "vgg_small_fp.cifar10": _cfg("vgg_small_fp.cifar10"),
})


@register_model
def vgg_small_1w1a_reste(pretrained: bool = False, **kwargs) -> VGGSmall:
    """VGG-small (CIFAR), 1W/1A, ReSTE."""
    return _create_vgg_small("vgg_small_1w1a_reste", pretrained, **kwargs)


@register_model
def vgg_small_fp(pretrained: bool = False, **kwargs) -> VGGSmall:
    """Full-precision VGG-small (CIFAR): the paper's baseline."""
    return _create_vgg_small("vgg_small_fp", pretrained, binary=False, **kwargs)
