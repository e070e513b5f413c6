"""Binary networks of the ReSTE paper, registered with timm on import."""

from .reste_cifar_resnet import CifarResNet
from .reste_resnet import BinaryResNet
from .reste_vgg import VGGSmall

__all__ = ["BinaryResNet", "CifarResNet", "VGGSmall"]
