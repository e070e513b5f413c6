"""Binary networks of the ReSTE paper, registered with timm on import."""

from ._common import strict_pretrained_filter
from ._pretrained import HUB_ORG, WeightsUnavailableError, check_published, hub_id
from .reste_cifar_resnet import CifarResNet
from .reste_resnet import BinaryResNet
from .reste_vgg import VGGSmall

__all__ = ["HUB_ORG", "BinaryResNet", "CifarResNet", "VGGSmall", "WeightsUnavailableError", "check_published",
           "hub_id", "strict_pretrained_filter"]
