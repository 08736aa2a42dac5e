"""One module per family; importing this package registers every architecture."""

from flaxnets.models import (alexnet, densenet, googlenet, inception, lenet, nin, resnet,  # noqa: F401  (registration)
                             squeezenet, vgg)
from flaxnets.models.alexnet import AlexNet, AlexNetPaper, AlexNetSmall
from flaxnets.models.densenet import DenseNet
from flaxnets.models.googlenet import GoogLeNet, Inception
from flaxnets.models.inception import InceptionV3
from flaxnets.models.lenet import LeNet5
from flaxnets.models.nin import NiN
from flaxnets.models.resnet import BasicBlock, Bottleneck, ResNet
from flaxnets.models.squeezenet import Fire, SqueezeNet
from flaxnets.models.vgg import VGG

__all__ = [
    "AlexNet",
    "AlexNetPaper",
    "AlexNetSmall",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "Fire",
    "GoogLeNet",
    "Inception",
    "InceptionV3",
    "LeNet5",
    "NiN",
    "ResNet",
    "SqueezeNet",
    "VGG",
]
