"""CIFAR ResNets of the ReSTE paper: ResNet-20 (plain and Bi-Real) and ResNet-18, 1W/1A, 1W/32A, FP.

Architectures and state-dict keys follow the reference implementation exactly (docs/method.md,
section 3), so its checkpoints load strictly once a DataParallel ``module.`` prefix is stripped.
The reference applies ``relu`` before ``bn`` everywhere and has no activation after the residual sum.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ._common import BnHeadMixin, build_checked, make_conv_factory, reste_cfg

__all__ = ["CifarResNet"]


class ShortcutA(nn.Module):
    """"Option A" shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


def _shortcut(in_planes: int, planes: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Sequential()  # an empty Sequential, as the reference: no state-dict keys
    if kind == "A":
        return ShortcutA(planes)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """``bn1(relu(conv1(x)))``, ``bn2(relu(conv2(.)))``, plus the shortcut; no relu after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, conv_layer, shortcut: str = "A"):
        super().__init__()
        self.conv1 = conv_layer(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.bn2(F.relu(self.conv2(out)))
        return out + self.shortcut(x)


class BiRealBlock(BasicBlock):
    """Bi-Real variant: a shortcut around each binary conv, not around the pair."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(F.relu(self.conv1(x))) + self.shortcut(x)
        return self.bn2(F.relu(self.conv2(out))) + out


class CifarResNet(BnHeadMixin, nn.Module):
    """CIFAR ResNet with a 3x3 FP stem and ``pool -> bn2 -> linear`` head.

    Args:
        layers: Blocks per stage.
        widths: Channels per stage.
        block: ``"basic"`` or ``"bireal"``.
        shortcut: ``"A"`` (parameter-free, ResNet-20) or ``"B"`` (1x1 conv + BN, ResNet-18).
        init: ``"kaiming"`` (ResNet-20: kaiming_normal_ on convs and the linear) or ``"default"``.
        num_classes: Classifier outputs; 0 removes the classifier.
        in_chans: Input channels.
        global_pool: timm pooling type; ``''`` keeps the map unpooled.
        binary: False gives the full-precision baseline.
        estimator: Sign estimator of the binary convs.
        binarize_input: False gives 1W/32A.
        head_bn_first: Registers ``bn2`` before ``linear`` (the reference's order of state-dict keys
            and parameters for ResNet-20; its ResNet-18 has ``linear`` first). No effect on the output.
        drop_rate: Dropout before the classifier (timm's ``drop_rate``; 0, the paper's, is a no-op).
    """

    _classifier_name = "linear"

    def __init__(self, layers: Sequence[int] = (3, 3, 3), widths: Sequence[int] = (16, 32, 64),
                 block: str = "basic", shortcut: str = "A", init: str = "kaiming",
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 binary: bool = True, estimator: str = "reste", binarize_input: bool = True,
                 head_bn_first: bool = True, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = float(drop_rate)
        conv_layer = make_conv_factory(binary, estimator, binarize_input)
        block_cls = {"basic": BasicBlock, "bireal": BiRealBlock}[block]
        self.in_chans = in_chans  # read by timm (data config, save_config_for_hf)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.act1 = nn.ReLU()  # a module (not F.relu) so timm's feature extractor runs it in order
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="bn1")]
        in_planes, reduction = widths[0], 1
        for i, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(block_cls(in_planes, planes, stride if j == 0 else 1, conv_layer,
                                        shortcut))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction,
                                          module=f"layer{i + 1}"))
        self.num_stages = len(layers)
        self.num_features = in_planes
        self._build_head(num_classes, global_pool, bn_first=head_bn_first)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.act1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


_ARCHS = {
    "resnet20": dict(layers=(3, 3, 3), widths=(16, 32, 64), shortcut="A", init="kaiming"),
    "resnet20_bireal": dict(layers=(3, 3, 3), widths=(16, 32, 64), shortcut="A", init="kaiming",
                            block="bireal"),
    "resnet18": dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), shortcut="B",
                     init="default", head_bn_first=False),
}


def _create_cifar_resnet(variant: str, arch: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    model_args = dict(_ARCHS[arch], **kwargs)
    out_indices = tuple(range(len(model_args["layers"]) + 1))
    return build_checked(CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=out_indices),
                         **model_args)


def _cfg(variant: str, pool_size=(8, 8), **kwargs) -> Dict[str, Any]:
    return reste_cfg(variant, num_classes=10, input_size=(3, 32, 32), pool_size=pool_size, crop_pct=1.0,
                     classifier="linear", **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet20_1w1a_reste.cifar10": _cfg("resnet20_1w1a_reste.cifar10"),
    "resnet20_1w32a_reste.cifar10": _cfg("resnet20_1w32a_reste.cifar10"),
    "resnet20_bireal_1w1a_reste.cifar10": _cfg("resnet20_bireal_1w1a_reste.cifar10"),
    "resnet18_cifar_1w1a_reste.cifar10": _cfg("resnet18_cifar_1w1a_reste.cifar10",
                                              pool_size=(4, 4)),
    "resnet20_cifar_fp.cifar10": _cfg("resnet20_cifar_fp.cifar10"),
    "resnet18_cifar_fp.cifar10": _cfg("resnet18_cifar_fp.cifar10", pool_size=(4, 4)),
})


@register_model
def resnet20_1w1a_reste(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 (CIFAR), 1-bit weights and activations, ReSTE."""
    return _create_cifar_resnet("resnet20_1w1a_reste", "resnet20", pretrained, **kwargs)


@register_model
def resnet20_1w32a_reste(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 (CIFAR), 1-bit weights, float activations, ReSTE."""
    kwargs.setdefault("binarize_input", False)
    return _create_cifar_resnet("resnet20_1w32a_reste", "resnet20", pretrained, **kwargs)


@register_model
def resnet20_bireal_1w1a_reste(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 with Bi-Real shortcuts (CIFAR), 1W/1A, ReSTE."""
    return _create_cifar_resnet("resnet20_bireal_1w1a_reste", "resnet20_bireal", pretrained,
                                **kwargs)


@register_model
def resnet18_cifar_1w1a_reste(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (CIFAR), 1W/1A, ReSTE."""
    return _create_cifar_resnet("resnet18_cifar_1w1a_reste", "resnet18", pretrained, **kwargs)


@register_model
def resnet20_cifar_fp(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Full-precision ResNet-20 (CIFAR): the paper's baseline, same layout with ordinary convs."""
    return _create_cifar_resnet("resnet20_cifar_fp", "resnet20", pretrained, binary=False,
                                **kwargs)


@register_model
def resnet18_cifar_fp(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Full-precision ResNet-18 (CIFAR): the paper's baseline."""
    return _create_cifar_resnet("resnet18_cifar_fp", "resnet18", pretrained, binary=False,
                                **kwargs)
