"""The deeper members of a family, and the smaller member whose checks stand for theirs.

VGG-13/16/19 (+BN), ResNet-34/101/152, ResNet-34 for CIFAR, ResNeXt-101, Wide ResNet-101,
DenseNet-161/169/201 and the CIFAR ResNet-32/44/56/110 are VGG-11 (+BN), ResNet-18/50, ResNet-18 for CIFAR,
ResNeXt-50, Wide ResNet-50, DenseNet-121 and ResNet-20 with more layers or blocks and other widths: the
same modules on the same code paths (tests/test_models.py checks that only depth and width fields differ).
The checks that compile or trace a whole network per architecture (forward passes, transformations) run
the smaller member only, which keeps the suite within its 15 minutes on two cores; parameter counts,
minimum input sizes, conversion keys and FLOPs are still checked for every architecture.
"""

from __future__ import annotations

DEEPER = {
    "resnet34": "resnet18",
    "resnet101": "resnet50",
    "resnet152": "resnet50",
    "resnet34_cifar": "resnet18_cifar",
    **{f"vgg{depth}{bn}": f"vgg11{bn}" for depth in (13, 16, 19) for bn in ("", "_bn")},
    "densenet161": "densenet121",
    "densenet169": "densenet121",
    "densenet201": "densenet121",
    "resnext101_32x8d": "resnext50_32x4d",
    "resnext101_64x4d": "resnext50_32x4d",
    "wide_resnet101_2": "wide_resnet50_2",
    "resnet32": "resnet20",
    "resnet44": "resnet20",
    "resnet56": "resnet20",
    "resnet110": "resnet20",
}
# The fields in which a deeper member may differ from its smaller sibling.
DEPTH_AND_WIDTH = frozenset({"stage_sizes", "block_sizes", "growth_rate", "num_init_features", "width_per_group",
                             "groups",  # ResNeXt's cardinality: the number of parallel paths, a width
                             "config"})  # VGG's: the convolutions of each stage


def without_deeper(names: list[str]) -> list[str]:
    """``names`` less the deeper members, whose smaller siblings stand for them."""
    return [name for name in names if name not in DEEPER]
