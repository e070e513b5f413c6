"""ImageNet ResNet-18/34 of the ReSTE paper (Bi-Real style blocks), 1W/1A and 1W/32A.

Stem and head follow the reference implementation (docs/method.md, section 3): a 7x7 FP conv, relu,
``bn1`` and max-pool; blocks with a shortcut around every binary conv; global average pooling (the
reference's 7x7 pool at 224 px), ``bn2`` (BatchNorm1d) and ``fc``. The 1x1 downsample convs stay FP.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._common import BnHeadMixin, build_checked, make_conv_factory, reste_cfg

__all__ = ["BinaryResNet"]


class BiRealBasicBlock(nn.Module):
    """``out = bn1(relu(conv1(x))) + downsample(x)``; ``out = bn2(relu(conv2(out))) + out``."""

    def __init__(self, inplanes: int, planes: int, stride: int, conv_layer):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn1(F.relu(self.conv1(x))) + residual
        return self.bn2(F.relu(self.conv2(out))) + out


class BinaryResNet(BnHeadMixin, nn.Module):
    """ImageNet binary ResNet.

    Args:
        layers: Blocks per stage ([2, 2, 2, 2] for 18, [3, 4, 6, 3] for 34).
        num_classes: Classifier outputs; 0 removes the classifier.
        in_chans: Input channels.
        global_pool: timm pooling type; ``''`` keeps the map unpooled.
        binary: False builds ordinary convs.
        estimator: Sign estimator of the binary convs.
        binarize_input: False gives 1W/32A.
        drop_rate: Dropout before the classifier (timm's ``drop_rate``; 0, the paper's, is a no-op).
    """

    _classifier_name = "fc"

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", binary: bool = True,
                 estimator: str = "reste", binarize_input: bool = True, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = float(drop_rate)
        conv_layer = make_conv_factory(binary, estimator, binarize_input)
        self.in_chans = in_chans  # read by timm (data config, save_config_for_hf)
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.act1 = nn.ReLU()  # a module so timm's feature extractor runs it between conv1 and bn1
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module="bn1")]
        inplanes, reduction = 64, 4
        for i, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(BiRealBasicBlock(inplanes, planes, stride if j == 0 else 1, conv_layer))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction,
                                          module=f"layer{i + 1}"))
        self.num_features = inplanes
        self._build_head(num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|bn1|maxpool",
                    blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.act1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _create_binary_resnet(variant: str, pretrained: bool = False, **kwargs) -> BinaryResNet:
    return build_checked(BinaryResNet, variant, pretrained, **kwargs)


def _cfg(variant: str, **kwargs) -> Dict[str, Any]:
    return reste_cfg(variant, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                     classifier="fc", **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_1w1a_reste.in1k": _cfg("resnet18_1w1a_reste.in1k"),
    "resnet34_1w1a_reste.in1k": _cfg("resnet34_1w1a_reste.in1k"),
    "resnet18_1w32a_reste.in1k": _cfg("resnet18_1w32a_reste.in1k"),
    "resnet34_1w32a_reste.in1k": _cfg("resnet34_1w32a_reste.in1k"),
})


@register_model
def resnet18_1w1a_reste(pretrained: bool = False, **kwargs) -> BinaryResNet:
    """ResNet-18 (ImageNet), 1-bit weights and activations, ReSTE."""
    return _create_binary_resnet("resnet18_1w1a_reste", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet34_1w1a_reste(pretrained: bool = False, **kwargs) -> BinaryResNet:
    """ResNet-34 (ImageNet), 1-bit weights and activations, ReSTE."""
    return _create_binary_resnet("resnet34_1w1a_reste", pretrained, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet18_1w32a_reste(pretrained: bool = False, **kwargs) -> BinaryResNet:
    """ResNet-18 (ImageNet), 1-bit weights, float activations, ReSTE."""
    kwargs.setdefault("binarize_input", False)
    return _create_binary_resnet("resnet18_1w32a_reste", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet34_1w32a_reste(pretrained: bool = False, **kwargs) -> BinaryResNet:
    """ResNet-34 (ImageNet), 1-bit weights, float activations, ReSTE."""
    kwargs.setdefault("binarize_input", False)
    return _create_binary_resnet("resnet34_1w32a_reste", pretrained, layers=(3, 4, 6, 3), **kwargs)
