"""The model zoo, tested from the registry: every registered architecture gets every check.

Parameter counts are exact and come from `jax.eval_shape`, so VGG's 138M parameters are never allocated;
they are compared with counts worked out by hand below from the layer formulas, with torchvision's
published numbers, and (when torchvision is installed) with torchvision's own models.

Forward passes run at each model's smallest practical input (see `forward_side`) with a batch of two.
Compiling a model's initialisers costs tens of seconds on two CPU cores (one random-number program per
parameter tensor), so the forward checks fill variables of the right structure with He-scaled uniform
values instead (`random_variables`). The deeper members of a family (DenseNet-161/169/201, ResNeXt-101,
Wide ResNet-101) skip the forward checks: their smaller sibling covers the same layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from flaxnets.analysis import abstract_variables, count_params
from flaxnets.input_size import VariablesMisfitError, _traces, smallest_input
from flaxnets.models.googlenet import collect_aux_logits
from flaxnets.models.inception import AUX_MIN_INPUT
from flaxnets.models.vgg import CONFIGS, D2L_CONV_ARCH
from flaxnets.registry import register
from reference import torchvision_or_skip
from siblings import DEEPER, DEPTH_AND_WIDTH, without_deeper

MODELS = flaxnets.list_models()
ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
BATCH = 2


@functools.cache
def abstract(name: str, **overrides) -> dict:
    """``model.init``'s variables as shapes, at the architecture's native input and class count."""
    return abstract_variables(name, **overrides)


def param_count(name: str, **overrides) -> int:
    return count_params(abstract(name, **overrides)["params"])


def init_shapes(model: nn.Module, images) -> dict:
    """The variables ``model.init`` makes for ``images`` (an array or a `jax.ShapeDtypeStruct`), as shapes."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(functools.partial(model.init, train=False), rngs, images)


@functools.cache
def zoo_shapes(name: str, side: int) -> dict:
    """`init_shapes` of the registry's ``name`` as these tests build it, for a batch of images of ``side`` pixels.

    Cached: the smallest-input test and the forward tests trace the same model at the same size when the
    smallest input is 32 pixels or more.
    """
    model = flaxnets.create_model(name, num_classes=NUM_CLASSES)
    images = jax.ShapeDtypeStruct((BATCH, side, side, flaxnets.get_spec(name).in_channels), jnp.float32)
    return init_shapes(model, images)


# --------------------------------------------------------------------------------------------------------
# Parameter counts by hand
# --------------------------------------------------------------------------------------------------------


def conv(k: int | tuple[int, int], cin: int, cout: int, bias: bool = True, groups: int = 1) -> int:
    """A k x k (or kh x kw) convolution: one filter over the cin / groups channels of its group per output
    channel, plus a bias per output channel."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return kh * kw * (cin // groups) * cout + (cout if bias else 0)


def dense(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def batch_norm(c: int) -> int:
    """BatchNorm's trainable scale and bias (its running statistics are not parameters)."""
    return 2 * c


def lenet5(bn: bool = False) -> int:
    # 28x28 input padded by 2 -> 5x5 conv (6 maps, 28x28) -> pool 14x14 -> 5x5 conv (16 maps, 10x10) -> pool 5x5.
    total = conv(5, 1, 6) + conv(5, 6, 16) + dense(16 * 5 * 5, 120) + dense(120, 84) + dense(84, 10)
    return total + (batch_norm(6) + batch_norm(16) + batch_norm(120) + batch_norm(84) if bn else 0)


def alexnet_paper() -> int:
    # 227 input: conv1 11x11/4 -> 55, pool -> 27, conv2 -> 27, pool -> 13, conv3-5 -> 13, pool -> 6x6x256.
    convs = conv(11, 3, 96) + conv(5, 96, 256) + conv(3, 256, 384) + conv(3, 384, 384) + conv(3, 384, 256)
    return convs + dense(6 * 6 * 256, 4096) + dense(4096, 4096) + dense(4096, 1000)


def alexnet_small() -> int:
    # 32 input: conv1 7x7/2 -> 16, pool -> 8, conv2 -> 8, pool -> 4, conv3-5 -> 4, pool -> 2x2x192.
    convs = conv(7, 3, 48) + conv(5, 48, 128) + conv(3, 128, 192) + conv(3, 192, 192) + conv(3, 192, 192)
    return convs + dense(2 * 2 * 192, 512) + dense(512, 512) + dense(512, 10)


def nin(mlp: int = 2, channels: int = 3, classes: int = 1000) -> int:
    def mlpconv(k, cin, cout):  # a k x k convolution, then `mlp` 1x1 convolutions of the same width
        return conv(k, cin, cout) + mlp * conv(1, cout, cout)

    return mlpconv(11, channels, 96) + mlpconv(5, 96, 256) + mlpconv(3, 256, 384) + mlpconv(3, 384, classes)


# Table 1 of Simonyan and Zisserman: the widths of the 3x3 convolutions of configurations A, B, D and E.
VGG_CONVS = {
    "vgg11": (64, 128, 256, 256, 512, 512, 512, 512),
    "vgg13": (64, 64, 128, 128, 256, 256, 512, 512, 512, 512),
    "vgg16": (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512),
    "vgg19": (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512),
}


def vgg(config: str, bn: bool, features: int = 512 * 7 * 7, classes: int = 1000, channels: int = 3) -> int:
    total, cin = 0, channels
    for width in VGG_CONVS[config]:
        total += conv(3, cin, width) + (batch_norm(width) if bn else 0)  # torchvision keeps the bias with BN
        cin = width
    return total + dense(features, 4096) + dense(4096, 4096) + dense(4096, classes)


def conv_bn(k, cin: int, cout: int, groups: int = 1) -> int:
    """A convolution followed by BatchNorm, hence without bias."""
    return conv(k, cin, cout, bias=False, groups=groups) + batch_norm(cout)


def resnet(stages: tuple[int, ...], bottleneck: bool, stem_kernel: int = 7, classes: int = 1000, groups: int = 1,
           per_group: int = 64) -> int:
    """ResNet, and with ``groups`` x ``per_group`` channels in the first stage's 3x3 ResNeXt (Xie et al., Table 1:
    ResNeXt-50 32x4d has a 128-wide grouped 3x3 where ResNet-50 has 64) and Wide ResNet (``per_group=128``)."""
    total, cin = conv_bn(stem_kernel, 3, 64), 64
    for stage, blocks in enumerate(stages):
        width = 64 * 2**stage
        inner = width * per_group // 64 * groups
        cout = 4 * width if bottleneck else width
        for index in range(blocks):
            strided = stage > 0 and index == 0
            if bottleneck:  # 1x1 reduce, grouped 3x3, 1x1 expand
                total += conv_bn(1, cin, inner) + conv_bn(3, inner, inner, groups) + conv_bn(1, inner, cout)
            else:
                total += conv_bn(3, cin, width) + conv_bn(3, width, width)
            if strided or cin != cout:  # projection shortcut
                total += conv_bn(1, cin, cout)
            cin = cout
    return total + dense(cin, classes)


# Table 1 of Szegedy et al.: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj of each Inception module.
INCEPTION_TABLE = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def googlenet(bn: bool, wide_kernel: int, aux: bool, classes: int = 1000) -> int:
    """torchvision: BatchNorm and no bias, 3x3 in the "5x5" branch; the paper: biases, a true 5x5."""

    def unit(k, cin, cout):
        return conv(k, cin, cout, bias=not bn) + (batch_norm(cout) if bn else 0)

    total = unit(7, 3, 64) + unit(1, 64, 64) + unit(3, 64, 192)
    cin, widths = 192, {}
    for name, (c1, c3_reduce, c3, c5_reduce, c5, pool_proj) in INCEPTION_TABLE.items():
        total += unit(1, cin, c1) + unit(1, cin, c3_reduce) + unit(3, c3_reduce, c3)
        total += unit(1, cin, c5_reduce) + unit(wide_kernel, c5_reduce, c5) + unit(1, cin, pool_proj)
        cin = widths[name] = c1 + c3 + c5 + pool_proj
    if aux:  # on 4a and 4d: 4x4 average pool, 128@1x1, dense 128*4*4 -> 1024 -> classes
        for name in ("4a", "4d"):
            total += unit(1, widths[name], 128) + dense(128 * 4 * 4, 1024) + dense(1024, classes)
    return total + dense(cin, classes)


# Table 1 of Iandola et al.: s1x1, e1x1, e3x3 of fire2 ... fire9 (the same in SqueezeNet 1.0 and 1.1).
FIRE_TABLE = ((16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128), (48, 192, 192), (48, 192, 192),
              (64, 256, 256), (64, 256, 256))


def squeezenet(stem: int, stem_kernel: int, classes: int = 1000) -> int:
    """A stem convolution, eight Fire modules (1x1 squeeze, then 1x1 and 3x3 expand on the squeezed maps, their
    outputs concatenated), a 1x1 convolution to the classes; every convolution with a bias."""
    total, cin = conv(stem_kernel, 3, stem), stem
    for squeeze, expand1x1, expand3x3 in FIRE_TABLE:
        total += conv(1, cin, squeeze) + conv(1, squeeze, expand1x1) + conv(3, squeeze, expand3x3)
        cin = expand1x1 + expand3x3
    return total + conv(1, cin, classes)


RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


def resnet_cifar(depth: int, classes: int = 10) -> int:
    """He et al., section 4.2: a 3x3 stem of 16 maps, three stages of (depth - 2) / 6 basic blocks at 16, 32
    and 64 maps, option A shortcuts (no parameters), a dense layer on the pooled 64 features."""
    n = (depth - 2) // 6
    total, cin = conv_bn(3, 3, 16), 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(3, cin, width) + conv_bn(3, width, width)
            cin = width
    return total + dense(cin, classes)


def densenet(k: int, blocks: tuple[int, ...], stem: int, imagenet: bool = True, classes: int = 1000) -> int:
    """DenseNet-BC: each layer BN-ReLU-1x1 (4k maps)-BN-ReLU-3x3 (k maps) on all earlier maps of its block;
    transitions BN-ReLU-1x1 halving the maps; BatchNorm after the last block; no convolution has a bias."""
    total = conv(7, 3, stem, bias=False) + batch_norm(stem) if imagenet else conv(3, 3, stem, bias=False)
    channels = stem
    for index, layers in enumerate(blocks):
        for _ in range(layers):
            total += batch_norm(channels) + conv(1, channels, 4 * k, bias=False)
            total += batch_norm(4 * k) + conv(3, 4 * k, k, bias=False)
            channels += k
        if index < len(blocks) - 1:
            total += batch_norm(channels) + conv(1, channels, channels // 2, bias=False)
            channels //= 2
    return total + batch_norm(channels) + dense(channels, classes)


def inception_v3(aux: bool = True, classes: int = 1000) -> int:
    """torchvision's Inception v3, module by module (every convolution followed by BatchNorm)."""

    def module_a(cin, pool):  # 35x35: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | pool, 1x1
        return (conv_bn(1, cin, 64) + conv_bn(1, cin, 48) + conv_bn(5, 48, 64) + conv_bn(1, cin, 64)
                + conv_bn(3, 64, 96) + conv_bn(3, 96, 96) + conv_bn(1, cin, pool)), 64 + 64 + 96 + pool

    def module_c(cin, c7):  # 17x17: 1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | pool, 1x1
        return (conv_bn(1, cin, 192) + conv_bn(1, cin, c7) + conv_bn((1, 7), c7, c7) + conv_bn((7, 1), c7, 192)
                + conv_bn(1, cin, c7) + 3 * conv_bn((7, 1), c7, c7) + conv_bn((1, 7), c7, 192)
                + conv_bn(1, cin, 192)), 4 * 192

    def module_e(cin):  # 8x8: 1x1 | 1x1, (1x3 + 3x1) | 1x1, 3x3, (1x3 + 3x1) | pool, 1x1
        expanded = conv_bn((1, 3), 384, 384) + conv_bn((3, 1), 384, 384)
        return (conv_bn(1, cin, 320) + conv_bn(1, cin, 384) + expanded + conv_bn(1, cin, 448)
                + conv_bn(3, 448, 384) + expanded + conv_bn(1, cin, 192)), 320 + 768 + 768 + 192

    total = conv_bn(3, 3, 32) + conv_bn(3, 32, 32) + conv_bn(3, 32, 64) + conv_bn(1, 64, 80) + conv_bn(3, 80, 192)
    cin = 192
    for pool in (32, 64, 64):
        count, cin = module_a(cin, pool)
        total += count
    total += conv_bn(3, cin, 384) + conv_bn(1, cin, 64) + conv_bn(3, 64, 96) + conv_bn(3, 96, 96)  # reduction
    cin += 384 + 96  # the max-pool branch passes its input through
    for c7 in (128, 160, 160, 192):
        count, cin = module_c(cin, c7)
        total += count
    if aux:  # on the 17x17 maps: 128@1x1, 768@5x5, dense
        total += conv_bn(1, cin, 128) + conv_bn(5, 128, 768) + dense(768, classes)
    total += conv_bn(1, cin, 192) + conv_bn(3, 192, 320) + conv_bn(1, cin, 192) + conv_bn((1, 7), 192, 192)
    total += conv_bn((7, 1), 192, 192) + conv_bn(3, 192, 192)  # reduction
    cin += 320 + 192
    for _ in range(2):
        count, cin = module_e(cin)
        total += count
    return total + dense(cin, classes)


# ResNeXt and Wide ResNet: (stages, groups, channels per group), as torchvision builds them.
RESNET_VARIANTS = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ((3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ((3, 4, 23, 3), 1, 128),
}
# DenseNet: (growth rate, layers per block, stem channels), Table 1 of Huang et al. and torchvision.
DENSENETS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}

# Every registered architecture at its native input and usual class count, with its default fields.
HAND_COUNTS = {
    "alexnet": conv(11, 3, 64) + conv(5, 64, 192) + conv(3, 192, 384) + conv(3, 384, 256) + conv(3, 256, 256)
    + dense(6 * 6 * 256, 4096) + dense(4096, 4096) + dense(4096, 1000),
    "alexnet_paper": alexnet_paper(),
    "alexnet_small": alexnet_small(),
    "googlenet": googlenet(bn=True, wide_kernel=3, aux=True),
    "googlenet_paper": googlenet(bn=False, wide_kernel=5, aux=True),
    "lenet5": lenet5(),
    "lenet5_relu": lenet5(),
    "lenet5_bn": lenet5(bn=True),
    "nin": nin(),
    "squeezenet1_0": squeezenet(96, 7),
    "squeezenet1_1": squeezenet(64, 3),
    **{f"resnet{d}": resnet(stages, bottleneck=d >= 50) for d, stages in RESNET_STAGES.items()},
    **{f"resnet{d}_cifar": resnet(RESNET_STAGES[d], d >= 50, stem_kernel=3, classes=10) for d in (18, 34, 50)},
    **{name: resnet(stages, True, groups=g, per_group=d) for name, (stages, g, d) in RESNET_VARIANTS.items()},
    "resnext29_8x64d": resnet((3, 3, 3), True, stem_kernel=3, classes=10, groups=8),
    **{f"resnet{d}": resnet_cifar(d) for d in CIFAR_RESNET_DEPTHS},
    **{name: densenet(*fields) for name, fields in DENSENETS.items()},
    "densenet_bc100_k12": densenet(12, (16, 16, 16), 24, imagenet=False, classes=10),
    "inception_v3": inception_v3(),
    **{config: vgg(config, bn=False) for config in VGG_CONVS},
    **{f"{config}_bn": vgg(config, bn=True) for config in VGG_CONVS},
    "vgg16_cifar": vgg("vgg16", bn=True, features=512, classes=10),  # 32x32 input: 512x1x1 features
}

# torchvision's published parameter counts at 1000 classes (DESIGN.md; GoogLeNet without its auxiliary heads).
PUBLISHED = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
    "wide_resnet101_2": 126_886_696,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "inception_v3": 27_161_264,  # with its auxiliary head, as torchvision's pretrained weights have it
}
TORCHVISION_MODELS = [name for name in MODELS if flaxnets.get_spec(name).torchvision]


def test_every_model_is_counted_by_hand():
    assert set(HAND_COUNTS) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_by_hand(name):
    assert param_count(name) == HAND_COUNTS[name]


def test_hand_formulas_give_torchvision_published_counts():
    # Checks the formulas above, independently of flaxnets.
    for name, published in PUBLISHED.items():
        if name != "googlenet":
            assert HAND_COUNTS[name] == published, name
    assert googlenet(bn=True, wide_kernel=3, aux=False) == PUBLISHED["googlenet"]


@pytest.mark.parametrize(
    ("name", "overrides", "count"),
    [
        ("vgg13_bn", {}, 133_053_736),
        ("alexnet_paper", {}, 62_378_344),  # the number AlexNetPaper's docstring quotes
        ("googlenet", {}, 13_004_888),  # with its two auxiliary heads
        ("googlenet", {"aux_logits": False}, 6_624_904),  # as torchvision counts its published weights
        ("inception_v3", {"aux_logits": False}, 23_834_568),
        ("resnext29_8x64d", {}, 34_426_698),  # the counts the CIFAR variants' registry comments quote
        ("resnext29_8x64d", {"groups": 16}, 68_155_210),
        ("densenet_bc100_k12", {}, 769_162),
    ],
)
def test_parameter_counts_quoted_in_the_docs(name, overrides, count):
    assert param_count(name, **overrides) == count


# The CIFAR variants against the counts their papers print, in millions to one decimal (CIFAR-10, 10 classes):
# Xie et al. 2017, Table 7 (ResNeXt-29, 8x64d and 16x64d); Huang et al. 2017, Table 2 (DenseNet-BC, L=100
# k=12; the same module with L=250 k=24, another row of the table, checks the layer formula). The papers'
# last digit is not always rounded: 68,155,210 parameters are printed 68.1M.
# He et al. 2016, Table 6: ResNet-20/32/44/56/110 with 0.27M, 0.46M, 0.66M, 0.85M and 1.7M parameters.
PAPER_COUNTS = [
    *[(f"resnet{d}", {}, m) for d, m in zip(CIFAR_RESNET_DEPTHS, (0.27, 0.46, 0.66, 0.85, 1.7))],
    ("resnext29_8x64d", {}, 34.4),
    ("resnext29_8x64d", {"groups": 16}, 68.1),
    ("densenet_bc100_k12", {}, 0.8),
    ("densenet_bc100_k12", {"block_sizes": (41, 41, 41), "growth_rate": 24, "num_init_features": 48}, 15.3),
]


@pytest.mark.parametrize(("name", "overrides", "millions"), PAPER_COUNTS,
                         ids=[f"{name}-{millions}M" for name, _, millions in PAPER_COUNTS])
def test_cifar_variants_have_their_papers_parameter_counts(name, overrides, millions):
    model = flaxnets.create_model(name, num_classes=10, **overrides)
    unit = 10.0 ** -len(repr(millions).partition(".")[2])  # one unit of the last digit printed: 0.27M, 0.01M
    assert abs(count_params(abstract_variables(model, (1, 32, 32, 3))["params"]) / 1e6 - millions) < unit


def _torch_cifar_resnet(torch, depth: int):
    """An independent PyTorch ResNet-(6n+2) for CIFAR with option A shortcuts, written from section 4.2 of the
    paper the way PyTorch reproductions write it (strided identity, channels zero-padded on both sides)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = (cout - cin) // 2

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            if self.pad:
                x = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return torch.relu(y + x)

    n = (depth - 2) // 6
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(n):
            layers.append(Block(cin, width, 2 if stage and not index else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("depth", CIFAR_RESNET_DEPTHS)
def test_cifar_resnets_have_the_parameters_of_a_pytorch_reference(depth):
    from reference import torch_or_skip

    torch = torch_or_skip()
    reference = _torch_cifar_resnet(torch, depth)
    assert reference(torch.zeros(1, 3, 8, 8)).shape == (1, 10)  # the shortcuts' shapes fit
    assert param_count(f"resnet{depth}") == sum(p.numel() for p in reference.parameters())


def test_lenet5_count_at_mnist_size():
    variables = abstract_variables("lenet5", (1, 28, 28, 1), num_classes=10)
    assert count_params(variables["params"]) == 61_706


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_parameter_count_equals_torchvision_published(name):
    spec = flaxnets.get_spec(name)
    assert spec.params == PUBLISHED[name]
    assert param_count(name, **spec.reference_overrides) == spec.params


def test_published_counts_cover_every_torchvision_model():
    assert set(TORCHVISION_MODELS) == set(PUBLISHED)
    assert all(flaxnets.get_spec(name).params is None for name in set(MODELS) - set(PUBLISHED))


@pytest.mark.parametrize("name", sorted(DEEPER))
def test_deeper_members_differ_from_their_smaller_sibling_in_depth_and_width_only(name):
    """What lets the smaller sibling stand for them in the forward checks (tests/siblings.py)."""
    deeper, smaller = (flaxnets.create_model(n, num_classes=NUM_CLASSES) for n in (name, DEEPER[name]))
    assert type(deeper) is type(smaller)
    differ = {f.name for f in dataclasses.fields(deeper) if getattr(deeper, f.name) != getattr(smaller, f.name)}
    assert differ and differ <= DEPTH_AND_WIDTH, differ


# (registry name, flaxnets overrides, torchvision keyword arguments)
TORCHVISION_CASES = [(name, {}, {}) for name in TORCHVISION_MODELS if name != "googlenet"] + [
    ("googlenet", {"aux_logits": False}, {"aux_logits": False}),
    ("googlenet", {"aux_logits": True}, {"aux_logits": True}),
    ("inception_v3", {"aux_logits": False}, {"aux_logits": False}),
]


@pytest.mark.parametrize(("name", "overrides", "torchvision_kwargs"), TORCHVISION_CASES,
                         ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o, _ in TORCHVISION_CASES])
def test_parameter_count_equals_torchvision_model(name, overrides, torchvision_kwargs):
    torch, torchvision = torchvision_or_skip()
    spec = flaxnets.get_spec(name)
    builder = spec.torchvision
    if name in ("googlenet", "inception_v3"):
        # init_weights=False skips their initialisation (and the warning that it will change).
        torchvision_kwargs = {**torchvision_kwargs, "init_weights": False}
    # On the meta device torch records shapes only: VGG's 138M parameters are not allocated.
    with torch.device("meta"):
        reference = torchvision.models.get_model(builder, weights=None, **torchvision_kwargs)
    theirs = sum(p.numel() for p in reference.parameters())
    assert param_count(name, **overrides) == theirs
    if overrides == spec.reference_overrides:  # as torchvision counts its published weights (GoogLeNet: no heads)
        assert torchvision.models.get_model_weights(builder).DEFAULT.meta["num_params"] == theirs


# --------------------------------------------------------------------------------------------------------
# Smallest input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODELS if flaxnets.get_spec(n).aux_loss_weight])
def test_min_train_input_size_is_what_a_training_apply_takes(name):
    """Auxiliary heads run only in training: Inception v3's needs 299x299 where inference takes 75. (Two
    traces of a training apply, at the recorded side and a pixel below; the search has a test below.)"""
    spec = flaxnets.get_spec(name)
    smallest = flaxnets.min_input_size(name, train=True)
    model = flaxnets.create_model(name, num_classes=NUM_CLASSES)
    assert _traces(model, smallest, spec.in_channels, train=True)
    assert not _traces(model, smallest - 1, spec.in_channels, train=True)
    assert spec.min_train_input_size == (smallest if smallest != spec.min_input_size else None)


# The smallest architecture of each model class: the guard's error for a too-small input is checked on it
# (the message names the smallest side, which the guard finds by a search of some ten traces); every
# architecture is checked to trace at its recorded side and not a pixel below (two traces).
GUARD_CHECKED = tuple({type(flaxnets.create_model(n)): n for n in sorted(
    without_deeper(MODELS), key=lambda n: flaxnets.get_spec(n).input_size, reverse=True)}.values())


@pytest.mark.parametrize("name", MODELS)
def test_min_input_size_is_tight(name):
    smallest = flaxnets.min_input_size(name)
    spec = flaxnets.get_spec(name)
    if name in DEEPER:
        # The same stem, pools and transitions as the smaller sibling, which the checks below cover (each
        # trace of DenseNet-201 costs a second or two).
        assert smallest == spec.min_input_size == flaxnets.get_spec(DEEPER[name]).min_input_size
        zoo_shapes(name, smallest)  # fits
        return
    assert smallest == spec.min_input_size and 1 <= smallest <= spec.input_size
    model = flaxnets.create_model(name, num_classes=NUM_CLASSES)
    assert _traces(model, smallest, spec.in_channels) and not _traces(model, smallest - 1, spec.in_channels)
    if name in GUARD_CHECKED:
        zoo_shapes(name, smallest)  # fits
        with pytest.raises(ValueError, match=f"at least {smallest}x{smallest} pixels"):
            zoo_shapes(name, smallest - 1)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_min_input_size_equals_torchvision_published(name):
    _, torchvision = torchvision_or_skip()
    weights = torchvision.models.get_model_weights(flaxnets.get_spec(name).torchvision).DEFAULT
    assert (flaxnets.min_input_size(name),) * 2 == weights.meta["min_size"]


def test_inception_v3_trains_its_auxiliary_head_from_299_pixels():
    """Evaluation works from 75 pixels (torchvision's minimum), with the same variables at every size; the
    auxiliary head, which runs only in training, needs 299: smaller inputs train with ``aux_logits=False``."""
    assert jax.tree.map(jnp.shape, zoo_shapes("inception_v3", 75)) == jax.tree.map(jnp.shape, zoo_shapes(
        "inception_v3", 299))
    variables = zoo_shapes("inception_v3", 299)

    def train(side, **overrides):
        model = flaxnets.create_model("inception_v3", num_classes=NUM_CLASSES, **overrides)
        apply = functools.partial(model.apply, train=True, mutable=["batch_stats", "aux_logits"],
                                  rngs={"dropout": jax.random.key(0)})
        return jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((BATCH, side, side, 3), jnp.float32))

    assert [a.shape for a in collect_aux_logits(train(299)[1])] == [(BATCH, NUM_CLASSES)]
    with pytest.raises(ValueError, match="at least 299x299 .* aux_logits=False"):
        train(298)
    logits, mutated = train(75, aux_logits=False)
    assert logits.shape == (BATCH, NUM_CLASSES) and collect_aux_logits(mutated) == []


def test_search_in_training_mode_traces_a_training_apply():
    """The training-mode search (which the tests above replace with two traces) on GoogLeNet, whose
    auxiliary heads run only in training, and on LeNet-5 with BatchNorm, whose batch statistics do."""
    assert smallest_input(flaxnets.create_model("googlenet", num_classes=NUM_CLASSES), 3, train=True) == 15
    assert smallest_input(flaxnets.create_model("lenet5_bn", num_classes=NUM_CLASSES), 1, train=True) == \
        flaxnets.min_input_size("lenet5_bn")


def test_smallest_input_of_a_module_without_the_guard():
    """A module of the user's own has no `checks_input_size`; the search still refuses an input its pooling
    leaves empty, at the dense layer that receives nothing (whose initialiser would divide by its fan-in)."""

    class Pooled(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.max_pool(nn.Conv(4, (3, 3))(x), (2, 2), strides=(2, 2))
            return nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))

    assert smallest_input(Pooled(), 1) == 2


def test_variables_applied_to_other_images_name_the_cause():
    """Images of other channels than the variables were made for meet Flax's parameter-shape error in the
    first convolution; the guard says so, and says "NCHW" where the images look like PyTorch's layout (a
    warning where such images make a model at all)."""
    model = flaxnets.create_model("resnet18", num_classes=NUM_CLASSES)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    apply = functools.partial(model.apply, train=False)
    with pytest.raises(VariablesMisfitError, match=r"^ResNet's variables were made for other images than these, of "
                                                   r"shape \(2, 32, 32, 1\) \(For parameter \"kernel\" in \"/conv1\""):
        jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
    with pytest.raises(VariablesMisfitError, match=r"of shape \(2, 3, 32, 32\); they look like PyTorch's NCHW "
                                                   r"layout, and the models take NHWC: x.transpose\(0, 2, 3, 1\) \("):
        jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((2, 3, 32, 32), jnp.float32))
    with pytest.raises(ValueError, match=r"at least 32x32 pixels; got 3x224; they look like PyTorch's NCHW"):
        jax.eval_shape(functools.partial(flaxnets.create_model("vgg11").init, train=False), jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 3, 224, 224), jnp.float32))
    # A ResNet takes 3x32 images of 32 channels, so that initialisation is no error; it is very likely a mistake.
    with pytest.warns(UserWarning, match=r"^ResNet was initialised for 3x32 images of 32 channels; they look like "):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))


def test_the_train_flag_is_a_concrete_bool():
    """It chooses Python branches: a string would count as True, a traced one fail inside with JAX's error."""
    model = flaxnets.create_model("lenet5_bn", num_classes=NUM_CLASSES)
    images = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    with pytest.raises(TypeError, match=r"^LeNet5's train flag is True or False, got 'no'\."):
        model.apply(variables, images, "no")
    with pytest.raises(TypeError, match=r"train flag was traced .* static_argnames='train'\)\."):
        jax.eval_shape(model.apply, variables, images, False)
    static = jax.eval_shape(functools.partial(model.apply, train=np.bool_(False)), variables, images)
    assert static.shape == (2, NUM_CLASSES)


def test_wrong_rank_input_is_a_clear_error():
    model = flaxnets.create_model("lenet5", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                       jax.ShapeDtypeStruct((28, 28), jnp.float32))


# --------------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------------


@functools.cache
def he_uniform(shape: tuple[int, ...]) -> jax.Array:
    """Uniform weights with He's variance 2 / fan_in, so activations keep their scale through ReLU stacks.

    Cached by shape: the VGG family shares its 25088x4096 classifier, which then is drawn once.
    """
    limit = math.sqrt(6.0 / math.prod(shape[:-1]))
    values = np.random.default_rng(list(shape)).random(shape, dtype=np.float32)
    values *= 2 * limit  # in place: the largest of these arrays holds 100M numbers
    values -= limit
    return jnp.asarray(values)


def random_variables(shapes: dict) -> dict:
    """Parameters and BatchNorm statistics shaped as ``model.init`` made ``shapes``, filled without compiling it.

    ``init`` also returns what the model sows while initialising (GoogLeNet's auxiliary logits): that is
    output, not state, and is left out.
    """

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return he_uniform(leaf.shape)
        # NumPy constants: jnp.ones would compile one small program per shape.
        if name in ("scale", "var"):  # BatchNorm starts as the identity
            return jnp.asarray(np.ones(leaf.shape, leaf.dtype))
        if name in ("bias", "mean"):
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        raise AssertionError(f"no fill for variable {jax.tree_util.keystr(path)}: teach random_variables")

    state = {collection: shapes[collection] for collection in ("params", "batch_stats") if collection in shapes}
    return jax.tree_util.tree_map_with_path(fill, state)


@pytest.fixture(scope="module", autouse=True)
def _free_weight_cache():
    yield
    he_uniform.cache_clear()


def forward_side(name: str) -> int:
    """The input side of the forward tests: the model's smallest input, and at least 32 pixels.

    The models with a small-image stem (the CIFAR ResNets, ResNeXt-29, DenseNet-BC) take 8: the CIFAR
    ResNets' blocks then see the 8x8 maps the ImageNet ResNets' blocks see at 32 (whose stem divides by
    four), so the layers compiled for one family serve the other. Inception v3 takes 299, the smallest
    input its auxiliary head trains at (it evaluates from 75).
    """
    if name == "inception_v3":
        return AUX_MIN_INPUT
    if getattr(flaxnets.create_model(name, num_classes=NUM_CLASSES), "stem", None) == "cifar":
        return max(flaxnets.min_input_size(name), 8)
    return max(flaxnets.min_input_size(name), 32)


def random_images(name: str) -> jax.Array:
    side, channels = forward_side(name), flaxnets.get_spec(name).in_channels
    return jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, side, side, channels), np.float32))


def expects_batch_norm(name: str) -> bool:
    family = flaxnets.get_spec(name).family
    return family in ("resnet", "densenet", "inception") or name.endswith("_bn") or name in ("googlenet", "vgg16_cifar")


def expects_dropout(name: str) -> bool:
    return flaxnets.get_spec(name).family in ("alexnet", "vgg", "nin", "squeezenet", "googlenet", "inception")


# Auxiliary classifiers, whose logits a training apply sows into "aux_logits".
AUX_HEADS = {"googlenet": 2, "inception": 1}


def aux_heads(name: str) -> int:
    return AUX_HEADS.get(flaxnets.get_spec(name).family, 0)


# Families run as one program per kind of apply (see `Forward`).
WHOLE_PROGRAM = ("googlenet", "inception", "densenet")


@dataclasses.dataclass
class Forward:
    """One model with variables and a batch of images; applies that several tests need are computed once.

    Models run eagerly: each distinct layer compiles once, and is reused by every later call and model (a
    ResNet's repeated blocks, the VGG family's convolutions). GoogLeNet's and Inception v3's modules all
    differ, and so do DenseNet's layers (each sees more channels than the last): eagerly they compile hundreds of
    small programs each; as one program per kind of apply they take half the time or less on two cores.
    """

    name: str
    model: nn.Module
    variables: dict
    images: jax.Array
    init_collections: frozenset[str]  # what ``init`` returned: variables, and anything sown while initialising
    _train: dict = dataclasses.field(default_factory=dict)
    _programs: dict = dataclasses.field(default_factory=dict)

    @property
    def writes(self) -> list[str]:
        """The collections a training step makes writable: BatchNorm statistics, auxiliary logits."""
        return ["batch_stats", "aux_logits"] if aux_heads(self.name) else ["batch_stats"]

    def apply(self, *, train: bool, mutable=False, rngs=None):
        if flaxnets.get_spec(self.name).family not in WHOLE_PROGRAM:
            return self.model.apply(self.variables, self.images, train=train, mutable=mutable, rngs=rngs)
        kind = (train, tuple(mutable or ()), rngs is not None)
        if kind not in self._programs:
            self._programs[kind] = jax.jit(functools.partial(self.model.apply, train=train, mutable=mutable))
        return self._programs[kind](self.variables, self.images, rngs=rngs)

    @functools.cached_property
    def eval_logits(self) -> jax.Array:
        return self.apply(train=False)

    def train(self, seed: int) -> tuple[jax.Array, dict]:
        """Logits and updated collections of a training apply with dropout rng ``seed`` (without an rng for
        models without dropout: they must train without one, see `test_dropout_needs_and_follows_its_rng`)."""
        if seed not in self._train:
            rngs = {"dropout": jax.random.key(seed)} if expects_dropout(self.name) else None
            self._train[seed] = self.apply(train=True, mutable=self.writes, rngs=rngs)
        return self._train[seed]


# Module scope, so that pytest runs every test of one model before building the next, and drops each
# model's variables when done with it (their weight arrays live on in `he_uniform`'s cache, shared by shape).
# The deeper members of the newer families run through their smaller siblings (tests/siblings.py).
@pytest.fixture(scope="module", params=without_deeper(MODELS))
def forward(request) -> Forward:
    name = request.param
    model = flaxnets.create_model(name, num_classes=NUM_CLASSES)
    shapes = zoo_shapes(name, forward_side(name))
    return Forward(name, model, random_variables(shapes), random_images(name), frozenset(shapes))


def assert_logits(logits):
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_eval_logits(forward):
    assert_logits(forward.eval_logits)


def test_eval_is_deterministic_and_writes_nothing(forward):
    # Evaluation reads the running statistics and leaves them as they were, even when allowed to write.
    logits, state = forward.apply(train=False, mutable=forward.writes)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(forward.eval_logits))
    if "batch_stats" in forward.variables:
        jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"], forward.variables["batch_stats"])
    else:
        assert "batch_stats" not in state
    assert collect_aux_logits(state) == []  # auxiliary heads only run in training


def test_train_logits(forward):
    logits, updates = forward.train(seed=1)
    assert_logits(logits)
    expected = {"batch_stats"} if "batch_stats" in forward.variables else set()
    assert set(updates) == expected | ({"aux_logits"} if aux_heads(forward.name) else set())


def test_batch_stats_change_only_when_training(forward):
    assert ("batch_stats" in forward.variables) == expects_batch_norm(forward.name)
    logits, updates = forward.train(seed=1)
    if "batch_stats" not in forward.variables:
        # Nothing to update: train=True needs no mutable collection, and is a function of the rng alone.
        again = forward.apply(train=True, rngs={"dropout": jax.random.key(1)})
        np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
        return
    # Training moves every layer's running mean and variance...
    old, new = forward.variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(old), jax.tree_util.tree_leaves(new)):
        assert not np.array_equal(np.asarray(before), np.asarray(after)), jax.tree_util.keystr(path)
    # ...and normalises with the batch's statistics, so its logits differ from evaluation's.
    assert not np.allclose(np.asarray(logits), np.asarray(forward.eval_logits))
    # Training without a writable batch_stats collection is an error, not a silently frozen BatchNorm.
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
        forward.apply(train=True, rngs={"dropout": jax.random.key(1)})


def test_dropout_needs_and_follows_its_rng(forward):
    first, _ = forward.train(seed=1)
    if expects_dropout(forward.name):
        assert not np.allclose(np.asarray(forward.train(seed=2)[0]), np.asarray(first))
        with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
            forward.apply(train=True, mutable=forward.writes)
    else:
        # No dropout: training takes no rng (`Forward.train` gave it none) and is a function of its inputs.
        logits, _ = forward.apply(train=True, mutable=forward.writes)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(first))


def test_auxiliary_logits_only_when_training(forward):
    # Initialisation returns parameters and statistics only, GoogLeNet's auxiliary heads included.
    assert forward.init_collections <= {"params", "batch_stats"}
    # The trainer weights the heads' losses by the registry's figure: nonzero exactly where there are heads.
    assert (flaxnets.get_spec(forward.name).aux_loss_weight > 0) == (aux_heads(forward.name) > 0)
    if not aux_heads(forward.name):
        return
    heads = collect_aux_logits(forward.train(seed=1)[1])
    assert len(heads) == aux_heads(forward.name)
    for logits in heads:
        assert_logits(logits)
    # Evaluation runs no head: see test_eval_is_deterministic_and_writes_nothing.


@pytest.mark.parametrize("name", ["googlenet", "googlenet_paper"])
def test_googlenet_without_auxiliary_heads(name):
    model = flaxnets.create_model(name, num_classes=NUM_CLASSES, aux_logits=False)
    images = random_images(name)
    shapes = init_shapes(model, images)
    assert set(shapes) <= {"params", "batch_stats"}
    assert not any(key.startswith("aux") for key in shapes["params"])
    assert {"aux1", "aux2"} <= set(abstract(name)["params"])  # while the default has both heads
    # Traced, not run: nothing is sown into aux_logits even in training.
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats", "aux_logits"])
    logits, mutated = jax.eval_shape(apply, shapes, images, rngs={"dropout": jax.random.key(1)})
    assert (logits.shape, logits.dtype) == ((BATCH, NUM_CLASSES), jnp.float32)
    assert collect_aux_logits(mutated) == []


@pytest.mark.parametrize("name", ["lenet5_bn", "alexnet_small"])
def test_bfloat16_computes_in_bfloat16_with_float32_parameters(name):
    images = random_images(name)
    full = flaxnets.create_model(name, num_classes=NUM_CLASSES)
    half = flaxnets.create_model(name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    shapes = init_shapes(half, images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = random_variables(shapes)  # the same variables serve both models
    for train in (False, True):
        kwargs = {"train": train, "mutable": ["batch_stats"], "rngs": {"dropout": jax.random.key(1)}}
        # Compiled whole: for a small model, one program compiles faster than its bfloat16 layers one by one.
        low, low_state = jax.jit(functools.partial(half.apply, **kwargs))(variables, images)
        high, _ = jax.jit(functools.partial(full.apply, **kwargs))(variables, images)
        assert_logits(low)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(low_state)} <= {jnp.dtype(jnp.float32)}
        # bfloat16 keeps 8 bits of mantissa: close to float32, but not equal (it really computed in bfloat16).
        scale = float(np.abs(np.asarray(high)).max())
        np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.05 * scale, rtol=0)
        assert not np.array_equal(np.asarray(low), np.asarray(high))


# --------------------------------------------------------------------------------------------------------
# Architecture options for the d2l exercises
# --------------------------------------------------------------------------------------------------------


def test_lenet5_activation_pooling_and_dropout_are_independent():
    """d2l's AlexNet exercise, "apply dropout and ReLU to LeNet-5", keeps average pooling: each of the
    three options changes the network alone, and dropout adds no parameters."""
    images = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, 28, 28, 1), np.float32))
    base = flaxnets.create_model("lenet5", num_classes=NUM_CLASSES)
    variables = random_variables(init_shapes(base, images))
    logits = {}
    for activation in ("sigmoid", "relu"):
        for pool in ("avg", "max"):
            model = flaxnets.create_model("lenet5", num_classes=NUM_CLASSES, activation=activation, pool=pool)
            logits[activation, pool] = np.asarray(model.apply(variables, images, train=False))
    assert len({values.tobytes() for values in logits.values()}) == 4
    model = flaxnets.create_model("lenet5", num_classes=NUM_CLASSES, activation="relu", dropout=0.5)
    assert jax.tree.map(jnp.shape, init_shapes(model, images)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_array_equal(model.apply(variables, images, train=False), logits["relu", "avg"])
    first, second = (model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)})
                     for seed in (1, 2))
    assert not np.allclose(first, second)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        model.apply(variables, images, train=True)
    base.apply(variables, images, train=True)  # without dropout, training needs no rng


@pytest.mark.parametrize("mlp", [1, 2, 3])
def test_nin_with_one_two_or_three_1x1_layers_per_block(mlp):
    """d2l's NiN exercise 2; d2l's NiN on 224x224 Fashion-MNIST (1 channel, 10 classes) has 1,992,166
    parameters with two."""
    model = flaxnets.create_model("nin", num_classes=NUM_CLASSES, mlp_layers=mlp)
    params = abstract_variables(model, (1, 224, 224, 1))["params"]
    assert count_params(params) == nin(mlp, channels=1, classes=NUM_CLASSES)
    assert set(params["block1"]) == {"conv", *(f"mlp{index + 1}" for index in range(mlp))}
    assert nin(2, channels=1, classes=10) == 1_992_166


def test_vgg_from_d2l_conv_arch():
    """d2l's ``conv_arch`` blocks build the same network as the matching row of VGG's table; without the
    adaptive pool the first dense layer follows the input: d2l's VGG exercise, Fashion-MNIST at 96x96
    (1 channel, 10 classes), flattens 512x3x3 = 4,608 features and has 44,920,074 parameters (44.9M), where
    torchvision's 7x7 pool would keep 25,088 and 128,806,154. d2l trains the narrow form (channels / 4)
    at 224x224: 6,272 features, 43,093,322 parameters."""
    def count(side, **fields):
        model = flaxnets.create_model("vgg11", num_classes=NUM_CLASSES, **fields)
        rows = flaxnets.summary(model, (1, side, side, 1), print_fn=None)
        fc1 = next(row for row in rows if row.path == "fc1")
        return count_params(abstract_variables(model, (1, side, side, 1))["params"]), fc1.input_shape[-1]

    assert count(96, config=D2L_CONV_ARCH, pool_size=None) == (44_920_074, 4608)
    assert vgg("vgg11", bn=False, features=4608, classes=NUM_CLASSES, channels=1) == 44_920_074
    as_json = [[convs, width] for convs, width in D2L_CONV_ARCH]  # what a JSON option gives
    assert count(96, config=as_json, pool_size=None) == count(96, config=CONFIGS["vgg11"], pool_size=None)
    assert count(96) == (128_806_154, 25_088)
    narrow = tuple((convs, width // 4) for convs, width in D2L_CONV_ARCH)
    assert count(224, config=narrow, pool_size=None) == (43_093_322, 6272)
    with pytest.raises(ValueError, match="num_convs, channels"):
        count(96, config=((1, 64, 3),))


def test_squeezenet_config_rows_build_their_layers_and_bad_rows_are_refused():
    """A row of its own (as a JSON option gives it) builds those Fire modules and pools; the class layer keeps
    the paper's name ``conv10`` (torchvision's ``classifier.1``) whatever the depth, and the headless model
    returns the last Fire module's maps averaged."""
    layers = [[32, 3], "M", [8, 32, 32], "M", [16, 64, 64]]
    model = flaxnets.create_model("squeezenet1_1", num_classes=NUM_CLASSES, config=layers)
    params = abstract_variables(model, (1, 33, 33, 3))["params"]
    assert count_params(params) == (conv(3, 3, 32) + conv(1, 32, 8) + conv(1, 8, 32) + conv(3, 8, 32)
                                    + conv(1, 64, 16) + conv(1, 16, 64) + conv(3, 16, 64) + conv(1, 128, NUM_CLASSES))
    assert list(params) == ["conv1", "conv10", "fire2", "fire3"]
    assert [row.path for row in flaxnets.summary(model, (1, 33, 33, 3), print_fn=None)
            if row.kind == "MaxPool"] == ["maxpool1", "maxpool2"]
    assert flaxnets.create_model("squeezenet1_1", num_classes=0, config=layers).num_features == 128
    for bad, message in [("2_0", "not one of '1_0', '1_1'"), (((16, 64, 64),), "first convolution's"),
                         (((64, 3), "M", (16, 64)), "squeeze, expand1x1, expand3x3"),
                         (((64, 3), "M", "M", (16, 64, 64)), "between two max-pools")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            abstract_variables(flaxnets.create_model("squeezenet1_1", config=bad), (1, 33, 33, 3))


@pytest.mark.parametrize(("name", "batch_norm", "lrn"), [("googlenet", True, True), ("googlenet_paper", True, True),
                                                         ("googlenet", False, False)])
def test_googlenet_batch_norm_and_lrn_are_chosen_independently(name, batch_norm, lrn):
    """BatchNorm in every convolution unit (and no biases then) and LRN after the stem's first pool and
    third convolution, in any combination; LRN has no parameters."""
    wide = 3 if name == "googlenet" else 5
    rows = flaxnets.summary(name, print_fn=None, batch_norm=batch_norm, lrn=lrn)
    assert sum(row.params for row in rows) == googlenet(bn=batch_norm, wide_kernel=wide, aux=True)
    kinds = [row.kind for row in rows]
    assert (kinds.count("LocalResponseNorm"), "BatchNorm" in kinds) == (2 if lrn else 0, batch_norm)


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


def test_register_refuses_a_duplicate_name():
    spec = flaxnets.get_spec("resnet18")
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(spec, description="an impostor"))
    assert flaxnets.get_spec("resnet18") is spec


@pytest.mark.parametrize("typo", ["resnet81", "resnt18", "ResNet18"])
def test_unknown_name_suggests_the_close_one(typo):
    with pytest.raises(flaxnets.UnknownModelError, match="Did you mean 'resnet18'") as caught:
        flaxnets.create_model(typo, num_classes=NUM_CLASSES)
    assert "Known models:" in str(caught.value) and "vgg16_bn" in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers may catch a plain ValueError
    with pytest.raises(flaxnets.UnknownModelError):
        flaxnets.get_spec(typo)


def test_list_models_filters_with_a_glob():
    assert flaxnets.list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert flaxnets.list_models("resnet*_cifar") == ["resnet18_cifar", "resnet34_cifar", "resnet50_cifar"]
    assert flaxnets.list_models("no_such_net*") == []
    assert MODELS == sorted(MODELS)


def test_create_model_names_the_valid_options_for_an_unknown_override():
    with pytest.raises(ValueError, match="'zero_init_residul'") as caught:
        flaxnets.create_model("resnet18", num_classes=NUM_CLASSES, zero_init_residul=True)
    assert "zero_init_residual" in str(caught.value).split("options are")[1]
    model = flaxnets.create_model("resnet18", num_classes=NUM_CLASSES, zero_init_residual=True)
    assert model.zero_init_residual and model.num_classes == NUM_CLASSES


@pytest.mark.parametrize("num_classes", [-3, True, 2.5, "10"])
def test_create_model_rejects_a_bad_class_count(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        flaxnets.create_model("lenet5", num_classes=num_classes)


@pytest.mark.parametrize("name, option, bad, good, words", [
    ("squeezenet1_1", "dropout", 1, 0.0, "dropout is a probability of dropping"),
    ("alexnet", "dropout", -0.1, 0, "dropout is a probability"),
    ("resnet18", "drop_path_rate", "0.1", 0.1, "drop_path_rate is a probability"),
    ("densenet121", "drop_rate", True, 0.2, "drop_rate is a probability"),
    ("googlenet", "aux_logits", "no", False, "aux_logits is true or false"),
    ("vgg11", "remat", 1, True, "remat is true or false"),
    ("resnet18", "bn_momentum", 1.5, 0.99, "bn_momentum is between 0 and 1"),
])
def test_create_model_refuses_option_values_that_would_build_a_wrong_model(name, option, bad, good, words):
    with pytest.raises(ValueError, match=f"{name}'s option {words}"):
        flaxnets.create_model(name, **{option: bad})
    assert getattr(flaxnets.create_model(name, **{option: good}), option) == good


def test_misused_library_calls_say_what_they_take():
    with pytest.raises(ValueError, match=r"ops is a kernel set .* got 'cpu'"):
        flaxnets.create_model("resnet18", ops="cpu")
    with pytest.raises(TypeError, match=r"model_info\(name\)\['default_params'\]"):
        flaxnets.count_params("lenet5_bn")
    with pytest.raises(ValueError, match=r"out_indices is a sequence of feature points, e.g. \(1, 2, 3\) or \(1,\)"):
        flaxnets.create_model("resnet18", features_only=True, out_indices=1)


def test_create_model_defaults_to_the_architectures_own_class_count():
    assert flaxnets.create_model("resnet50").num_classes == 1000
    assert type(flaxnets.create_model("lenet5", num_classes=np.int64(5)).num_classes) is int  # labels.max() + 1
    assert flaxnets.create_model("lenet5", num_classes=None).num_classes == flaxnets.get_spec("lenet5").num_classes


@pytest.mark.parametrize("name", MODELS)
def test_model_info(name):
    info = flaxnets.model_info(name)
    spec = flaxnets.get_spec(name)
    assert info["name"] == name and "build" not in info
    assert info["paper"] and info["description"]
    assert (info["input_size"], info["in_channels"], info["num_classes"]) == (
        spec.input_size, spec.in_channels, spec.num_classes)
    assert info["input_size"] >= flaxnets.min_input_size(name)
    assert info["params"] == PUBLISHED.get(name)
    json.dumps(info)  # plain data, ready for JSON


# --------------------------------------------------------------------------------------------------------
# summary and the command line
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_summary(name):
    printed = []
    rows = flaxnets.summary(name, print_fn=printed.append)
    variables = abstract(name)
    total = count_params(variables["params"])
    assert sum(row.params for row in rows) == total
    assert sum(row.state for row in rows) == count_params(variables.get("batch_stats", {}))
    assert rows[-1].output_shape == (1, flaxnets.get_spec(name).num_classes)
    text = "\n".join(printed)
    assert f"total parameters: {total:,}" in text
    assert all(row.path in text for row in rows)


def test_summary_prints_to_stdout_by_default(capsys):
    rows = flaxnets.summary("lenet5")
    out = capsys.readouterr().out
    assert out.startswith("lenet5: input (1, 28, 28, 1)")
    assert "total parameters: 61,706" in out
    assert [row.path for row in rows] == ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3"]  # in call order


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flaxnets", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("name", MODELS)
def test_recorded_parameter_count_is_the_traced_one(name):
    spec = flaxnets.get_spec(name)
    assert spec.default_params == param_count(name)


def test_cli_table():
    result = run_cli("vgg1*")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in flaxnets.list_models("vgg1*"):
        row = next(line for line in lines if line.split()[:1] == [name])
        spec = flaxnets.get_spec(name)
        assert f"{spec.default_params:,}" in row and row.split()[1] == f"{spec.default_params:,}"
        assert (spec.params is not None) == (name in PUBLISHED)
        assert spec.params is None or f"{spec.params:,}" in row, row


def test_the_table_traces_nothing(monkeypatch):
    """It prints from the registry's data: in the time of importing JAX, not of tracing every network."""
    from flaxnets.__main__ import model_table

    def refuse(*args, **kwargs):
        raise AssertionError("the table traced a model")

    monkeypatch.setattr(jax, "eval_shape", refuse)
    monkeypatch.setattr(jax, "make_jaxpr", refuse)
    assert len(model_table().splitlines()) == len(MODELS) + 2


@pytest.mark.parametrize("args", [("no_such_net*",), ("summary", "resnt18")], ids=["pattern", "summary"])
def test_cli_unknown_name_is_one_sentence(args):
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    if args[0] == "summary":
        assert "resnet18" in result.stderr


def test_googlenet_initialisation_is_torchvisions_normal():
    # torchvision draws trunc_normal_(std=0.01, a=-2, b=2): bounds 200 standard deviations out, so a
    # plain N(0, 0.01^2). Cutting at two standard deviations instead would give std 0.0088 and no
    # value beyond 0.02.
    from flaxnets.models.googlenet import _init

    draws = np.asarray(_init(jax.random.key(0), (200_000,), jnp.float32))
    assert abs(draws.std() - 0.01) < 2e-4
    assert np.abs(draws).max() > 0.03
