"""Binary networks of the ReSTE paper, registered with timm on import."""

from ._common import HUB_ORG, hub_id, strict_pretrained_filter
from .reste_cifar_resnet import CifarResNet
from .reste_resnet import BinaryResNet
from .reste_vgg import VGGSmall

__all__ = ["HUB_ORG", "BinaryResNet", "CifarResNet", "VGGSmall", "hub_id", "strict_pretrained_filter"]
