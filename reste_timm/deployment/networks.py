"""``deploy(model)``: the paper's networks with their 1W/1A convs on packed bits, blocks fused.

Each binary conv of a ResNet block is followed by relu, its BatchNorm and (Bi-Real, ImageNet) a
residual sum; the deployed block runs all of that in the conv's epilogue and hands the next binary
conv its input as packed bits, so between two binary convs nothing leaves the kernel but bits and the
float values a later residual needs. The float parts (stem, downsample convs, shortcuts, head) run as
before, in channels_last. The result equals the source model's up to float rounding: the kernel's
``dot * scale`` is exact where the float-simulated model's conv sums ``±scale`` terms (on CPU the source
model's own forward runs the same kernel, but not the fused epilogue), and a sign can flip where a value
lies within that rounding of 0.

Models of other architectures still deploy: each 1W/1A ``BinaryConv2d`` becomes a
:class:`~reste_timm.deployment.bitwise.BitwiseConv2d` without fusion. Layers the kernel cannot take (a weight
that is exactly 0, dilation, groups) and, without a C compiler, every layer, keep their float path.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..files import PathLike
from ..hub.packed import load_packed as load_packed_float
from ..models import BinaryResNet, CifarResNet, VGGSmall
from ..nn.bitconv import native_ops
from ..nn.layers import BinaryConv2d, replace_binary_layers
from .bitwise import BitwiseConv2d, bitwise_available, bn_affine, pack_signs

__all__ = ["deploy", "load_packed"]


def _bitwise(layer: nn.Module) -> Optional[BitwiseConv2d]:
    if not isinstance(layer, BinaryConv2d):
        return None
    try:
        return BitwiseConv2d(layer)
    except ValueError:
        return None


class _Packed:
    """A tensor's packed signs (``bits``, ``mask`` or None) and, when someone needs it, its float value."""

    __slots__ = ("value", "bits", "mask")

    def __init__(self, value: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor]):
        self.value, self.bits, self.mask = value, bits, mask

    @classmethod
    def of(cls, x: torch.Tensor) -> _Packed:
        bits, mask, zeros = pack_signs(x)
        return cls(x, bits, mask if int(zeros) else None)


class _Step(nn.Module):
    """One binary conv with its relu and BatchNorm (and a residual at call time) fused, or, when the
    kernel cannot take the conv, the same ops in float."""

    def __init__(self, conv: BinaryConv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.bitwise = _bitwise(conv)
        self.conv, self.bn = (None, None) if self.bitwise else (conv, bn)
        if self.bitwise is not None:
            alpha, beta = bn_affine(bn)
            self.register_buffer("alpha", alpha)
            self.register_buffer("beta", beta)

    def forward(self, x: _Packed, residual: Optional[torch.Tensor] = None, need_value: bool = True,
                need_bits: bool = True) -> _Packed:
        if self.bitwise is None:
            out = self.bn(torch.relu(self.conv(x.value)))
            out = (out if residual is None else out + residual).contiguous(memory_format=torch.channels_last)
            return _Packed.of(out) if need_bits else _Packed(out, None, None)
        y, bits, mask = self.bitwise.packed(x.bits, x.mask, relu=True, bn=(self.alpha, self.beta),
                                            residual=residual, out_float=need_value, out_bits=need_bits)
        return _Packed(y if need_value else None, bits if need_bits else None, mask)


class _DeployedResNet(nn.Module):
    """The CIFAR ResNets (plain and Bi-Real blocks) and the ImageNet Bi-Real ResNets, fused."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.source = model  # the float stem, shortcuts and head are used from it as they are
        self.imagenet = isinstance(model, BinaryResNet)
        # ImageNet stem, conv -> relu -> BatchNorm -> max-pool: relu and a BatchNorm whose every scale is
        # positive are non-decreasing in their input, roundings included, so they commute with the max-pool
        # exactly and can run on its output, a quarter of the values
        self.pool_first = self.imagenet and bool((bn_affine(model.bn1)[0] > 0).all())
        self.stages = nn.ModuleList()
        for i in range(1, 5):
            stage = getattr(model, f"layer{i}", None)
            if stage is not None:
                self.stages.append(nn.ModuleList(self._block(b) for b in stage))

    def _block(self, block: nn.Module) -> nn.Module:
        fused = nn.Module()
        fused.step1, fused.step2 = _Step(block.conv1, block.bn1), _Step(block.conv2, block.bn2)
        for name, step in (("conv1", fused.step1), ("conv2", fused.step2)):
            if step.bitwise is not None:  # packed now: the float weight is not kept twice
                setattr(block, name, nn.Identity())
        fused.shortcut = getattr(block, "downsample", None) if self.imagenet else block.shortcut
        fused.bireal = self.imagenet or type(block).__name__ == "BiRealBlock"
        return fused

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        x = m.conv1(x.contiguous(memory_format=torch.channels_last))
        if self.pool_first:
            return m.bn1(m.act1(m.maxpool(x)))
        x = m.bn1(m.act1(x))
        return m.maxpool(x) if self.imagenet else x

    def _run_block(self, fused: nn.Module, x: _Packed) -> _Packed:
        shortcut = x.value if fused.shortcut is None else fused.shortcut(x.value)
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        if fused.bireal:  # a shortcut around each binary conv
            out = fused.step1(x, residual=shortcut)
            return fused.step2(out, residual=out.value)
        return fused.step2(fused.step1(x, need_value=False), residual=shortcut)

    @torch.inference_mode()  # inference only: no autograd bookkeeping around its many small ops
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _Packed.of(self._stem(x))
        for stage in self.stages:
            for fused in stage:
                h = self._run_block(fused, h)
        return self.source.forward_head(h.value)


class _DeployedVGGSmall(nn.Module):
    """VGG-small: each binary conv fuses its relu and BatchNorm; the max-pools run in float."""

    def __init__(self, model: VGGSmall):
        super().__init__()
        self.source = model
        self.steps = nn.ModuleList(_Step(getattr(model, f"conv{i}"), getattr(model, f"bn{i}"))
                                   for i in range(1, 6))
        for i, step in enumerate(self.steps, start=1):
            if step.bitwise is not None:  # packed now: the float weight is not kept twice
                setattr(model, f"conv{i}", nn.Identity())

    @torch.inference_mode()  # inference only: no autograd bookkeeping around its many small ops
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        x = m.bn0(m.act0(m.conv0(x.contiguous(memory_format=torch.channels_last))))
        h = _Packed.of(x)
        for i, step in enumerate(self.steps, start=1):
            pool = getattr(m, f"pool{i}", None)
            h = step(h, need_value=pool is not None, need_bits=pool is None)  # a pool packs after itself
            if pool is not None:
                value = pool(h.value).contiguous(memory_format=torch.channels_last)
                h = _Packed.of(value) if i < 5 else _Packed(value, None, None)
        return m.forward_head(h.value)


def deploy(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` whose 1W/1A binary convs run on bit-packed signs (CPU, float32).

    The paper's networks (timm's ``resnet20*``, ``resnet18_cifar*``, ``vgg_small*``, ``resnet18/34*``)
    get whole blocks fused; any other model gets each 1W/1A ``BinaryConv2d`` replaced. The source model
    is not changed. Without a C compiler this warns once and returns the eval copy unchanged.

    The fused networks run under ``torch.inference_mode()``: their outputs are inference tensors (read
    them freely; ``clone()`` one to change it in place outside inference mode).
    """
    return _deployed(copy.deepcopy(model))


def _deployed(model: nn.Module) -> nn.Module:
    """:func:`deploy` on a model of its own (changed in place where it is not wrapped)."""
    model = model.float().cpu().eval()
    if not bitwise_available():
        warnings.warn("reste_timm.deploy: the bitwise kernel could not be built (no C compiler): the model "
                      "keeps its float weights", RuntimeWarning, stacklevel=3)
        return model
    native_ops()  # the ops' C++ kernels: built (once per machine) and loaded now, not in the first forward
    features_only = getattr(model, "forward_head", None) is None
    if isinstance(model, (CifarResNet, BinaryResNet)) and not features_only:
        return _DeployedResNet(model).eval()
    if isinstance(model, VGGSmall) and not features_only:
        return _DeployedVGGSmall(model).eval()
    replace_binary_layers(model, lambda layer: _bitwise(layer) or layer)
    return model


def load_packed(folder: PathLike, deploy: bool = False, **kwargs) -> nn.Module:
    """A packed folder (:func:`reste_timm.hub.export_packed`) as a model; with ``deploy=True`` the model
    :func:`deploy` makes of it, its binary convs on packed signs.

    Args:
        folder: The packed folder.
        deploy: Return the bitwise inference model instead of the float-simulated one.
        **kwargs: As :func:`reste_timm.hub.load_packed` (``device``, ``cache_weights``, timm overrides).
    """
    model = load_packed_float(folder, **kwargs)
    return _deployed(model) if deploy else model  # a fresh model: no copy needed
