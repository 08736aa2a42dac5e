"""ResNet-18/34/50/101/152 (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385), laid out as torchvision's ``resnet*`` so that parameter counts and weights carry over,
plus the small-input variants used on CIFAR-10 and Fashion-MNIST.

The same module with grouped or wider bottlenecks gives ResNeXt (Xie, Girshick, Dollar, Tu, He, "Aggregated
Residual Transformations for Deep Neural Networks", CVPR 2017, arXiv:1611.05431) and torchvision's Wide
ResNets (Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146): the bottleneck's
``groups`` and ``width_per_group``, as torchvision parameterises them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, BatchNorm, GlobalAvgPool, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout, dotted

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "drop_path_rates"]

ModuleDef = Callable[..., nn.Module]

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# ...and its Linear layers with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18 and -34.

    ``groups`` and ``width_per_group`` exist so that every block takes the same fields; only the plain
    values (1 and 64) are defined for this block, as in torchvision.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = False
    groups: int = 1
    width_per_group: int = 64
    shortcut: Literal["projection", "pad"] = "projection"
    drop_path: ModuleDef | None = None
    expansion = 1

    @nn.compact
    def __call__(self, x):
        if (self.groups, self.width_per_group) != (1, 64):
            raise ValueError(f"BasicBlock has no grouped or widened form (groups={self.groups}, "
                             f"width_per_group={self.width_per_group}); use Bottleneck blocks for ResNeXt and "
                             f"Wide ResNets.")
        y = self.conv(self.filters, (3, 3), self.strides, padding=padding(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=padding(1), name="conv2")(y)
        y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_last else nn.initializers.ones, name="bn2")(y)
        return nn.relu(_dropped(self, y) + _shortcut(self, x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (to 4x ``filters``); ResNet-50/101/152, ResNeXt, Wide ResNet.

    The stride sits on the 3x3 convolution ("ResNet v1.5", as torchvision and NVIDIA's reference place it);
    the paper puts it on the first 1x1, which costs about 0.5% top-1 on ImageNet. ResNeXt's official code
    puts it on the 3x3 too.

    The inner width is ``int(filters * width_per_group / 64) * groups`` (torchvision's rule) and the 3x3
    convolution is split into ``groups`` groups: ``groups=32, width_per_group=4`` is ResNeXt's "32x4d"
    (cardinality 32, 4 channels per group, figure 3c of Xie et al.), ``width_per_group=128`` doubles the
    inner width of every block (torchvision's ``wide_resnet*_2``); the output width stays ``4 * filters``.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = False
    groups: int = 1
    width_per_group: int = 64
    shortcut: Literal["projection", "pad"] = "projection"
    drop_path: ModuleDef | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x):
        width = int(self.filters * (self.width_per_group / 64.0)) * self.groups
        y = nn.relu(self.norm(name="bn1")(self.conv(width, (1, 1), name="conv1")(x)))
        y = self.conv(width, (3, 3), self.strides, padding=padding(1), feature_group_count=self.groups,
                      name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_last else nn.initializers.ones, name="bn3")(y)
        return nn.relu(_dropped(self, y) + _shortcut(self, x))


def _shortcut(block, x):
    """Identity, or when the shape changes: a strided 1x1 projection with BatchNorm (``"projection"``, the
    paper's option B, torchvision's), or the identity subsampled with the stride and zero-padded to the new
    width (``"pad"``, the paper's option A, with no parameters; its CIFAR networks of section 4.2)."""
    out_features = block.filters * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    if block.shortcut == "pad":
        x = x[:, ::block.strides, ::block.strides, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_features - x.shape[-1])))
    if block.shortcut != "projection":
        raise ValueError(f"ResNet shortcut must be 'projection' or 'pad', got {block.shortcut!r}.")
    x = block.conv(out_features, (1, 1), block.strides, name="downsample_conv")(x)
    return block.norm(name="downsample_bn")(x)


def _dropped(block, y):
    """The residual branch ``y`` through the block's stochastic depth, where it has one."""
    return y if block.drop_path is None else block.drop_path(name="drop_path")(y)


class ResNet(nn.Module):
    """A residual network: a stem, stages of residual blocks (64, 128, 256, 512 filters for the four
    ``stage_sizes`` of the ImageNet networks, each stage doubling the last), a linear head.

    ``stem="imagenet"`` is the paper's 7x7/2 convolution and 3x3/2 max-pool (224x224 input, 7x7 final
    maps). ``stem="cifar"`` is the 3x3/1 convolution without max-pool used for 32x32 input (section 4.2 of
    the paper uses it with narrower 16-32-64 stages; here the stages stay torchvision's, the common
    "ResNet-18 on CIFAR" of the literature). ``zero_init_residual`` starts each residual branch's last
    BatchNorm scale at zero, so every block begins as the identity: Goyal et al. 2017 (arXiv:1706.02677)
    report it helps large-batch training, and torchvision notes +0.2-0.3% top-1.

    ``groups`` and ``width_per_group`` go to every `Bottleneck`: ResNeXt (``resnext50_32x4d``: 32 groups of
    4 channels in the first stage) and Wide ResNet (``wide_resnet50_2``: ``width_per_group=128``). The Wide
    ResNet paper widens the 3x3 convolutions of pre-activation basic blocks (WRN-28-10 and kin, mostly on
    CIFAR); torchvision's ``wide_resnet*_2``, kept here, are instead ResNet-50/101 with bottlenecks twice as
    wide inside, the paper's "WRN-50-2-bottleneck" of its ImageNet experiments.
    ``resnext29_8x64d`` is the CIFAR ResNeXt of section 5.3 of Xie et al.: the 3x3 stem, three stages of
    three bottlenecks (29 layers), cardinality 8 at 64 channels per group (``groups=16`` is their 16x64d).

    ``resnet20`` ... ``resnet110`` are the CIFAR networks of the paper's section 4.2: the 3x3 stem, three
    stages of n basic blocks (depth 6n + 2) at 16, 32 and 64 filters (``width=16``), and ``shortcut="pad"``
    (option A: identity shortcuts, subsampled and zero-padded where the width doubles, no parameters).

    ``drop_path_rate`` is stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with
    Stochastic Depth", ECCV 2016, arXiv:1603.09382): in training, each example skips each block's residual
    branch with a probability that grows linearly with the block's index, from 0 for the first block to
    ``drop_path_rate`` for the last (timm's rule for its ResNets; the paper's "linear decay" ends at 0.5).
    Kept branches are scaled by 1 / (1 - p) in training, as timm and torchvision do, so evaluation uses
    the network unchanged; the paper scales in evaluation instead. It draws from the ``dropout`` rng.

    Feature points (`flaxnets.features`): the stem's activation (``act1``) and each stage's output
    (``layer1``...). ``remat=True`` recomputes each block's activations in the backward pass instead of
    storing them (`flax.linen.remat`); values and gradients are unchanged.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    num_classes: int = 1000
    stem: Literal["imagenet", "cifar"] = "imagenet"
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    shortcut: Literal["projection", "pad"] = "projection"
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last stage's output channels."""
        return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(self.ops.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        norm = partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), 2, padding=padding(3), name="conv1")(x)
            x = tap(self, nn.relu(norm(name="bn1")(x)), "act1", reduction=2)
            x = self.ops.max_pool(3, 2, padding=1, name="maxpool")(x)
        elif self.stem == "cifar":
            x = conv(self.width, (3, 3), padding=padding(1), name="conv1")(x)
            x = tap(self, nn.relu(norm(name="bn1")(x)), "act1", reduction=1)
        else:
            raise ValueError(f"ResNet stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ResNet drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.stage_sizes)))
        block = nn.remat(self.block) if self.remat else self.block
        reduction = 4 if self.stem == "imagenet" else 1
        for stage, blocks in enumerate(self.stage_sizes):
            for index in range(blocks):
                rate = next(rates)
                # One example's whole branch is kept or dropped: flax's Dropout with a mask broadcast over
                # the pixels and channels is exactly that (the kept scaled by 1 / (1 - rate)).
                drop = partial(nn.Dropout, rate, broadcast_dims=(1, 2, 3), deterministic=not train) if rate else None
                x = block(
                    filters=self.width * 2**stage,
                    conv=conv,
                    norm=norm,
                    strides=2 if stage > 0 and index == 0 else 1,
                    zero_init_last=self.zero_init_residual,
                    groups=self.groups,
                    width_per_group=self.width_per_group,
                    shortcut=self.shortcut,
                    drop_path=drop,
                    name=f"layer{stage + 1}_{index}",
                )(x)
            x = tap(self, x, f"layer{stage + 1}", reduction=reduction * 2**stage)
        x = GlobalAvgPool(name="avgpool")(x)
        if self.num_classes:
            x = self.ops.dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Each block's stochastic-depth probability: linear from 0 (first block) to ``rate`` (last), as timm
    sets it for its ResNets (``rate * index / (blocks - 1)``)."""
    return [rate * index / max(blocks - 1, 1) for index in range(blocks)]


# torchvision's projection shortcut is `downsample = Sequential(conv1x1, BatchNorm2d)`.
TORCH_LAYOUT = TorchLayout(
    heads=(("fc",),),
    module_name=partial(dotted, renamed={"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}),
)

_PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 (arXiv:1512.03385)"
_DEPTHS = {
    18: ((2, 2, 2, 2), BasicBlock, 11_689_512, 1.814, 69.758),
    34: ((3, 4, 6, 3), BasicBlock, 21_797_672, 3.664, 73.314),
    50: ((3, 4, 6, 3), Bottleneck, 25_557_032, 4.089, 76.130),
    101: ((3, 4, 23, 3), Bottleneck, 44_549_160, 7.801, 77.374),
    152: ((3, 8, 36, 3), Bottleneck, 60_192_808, 11.514, 78.312),
}

for _depth, (_stages, _block, _params, _gflops, _top1) in _DEPTHS.items():
    register(
        ModelSpec(
            name=f"resnet{_depth}",
            build=partial(ResNet, stage_sizes=_stages, block=_block),
            family="resnet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER,
            input_size=224,
            torchvision=f"resnet{_depth}",
            params=_params,
            gflops=_gflops,
            top1=_top1,
            description=f"ResNet-{_depth}, torchvision layout (v1.5 bottlenecks)",
            min_input_size=1,
            default_params=_params,
        )
    )

# parameters at 10 classes
for _depth, _count in ((18, 11_173_962), (34, 21_282_122), (50, 23_520_842)):
    _stages, _block = _DEPTHS[_depth][:2]
    register(
        ModelSpec(
            name=f"resnet{_depth}_cifar",
            build=partial(ResNet, stage_sizes=_stages, block=_block, stem="cifar"),
            family="resnet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER,
            input_size=32,
            num_classes=10,
            description=f"ResNet-{_depth} with a 3x3 stem and no max-pool, for 32x32 input",
            min_input_size=1,
            default_params=_count,
        )
    )

# torchvision's ResNeXt and Wide ResNet: (stage sizes, groups, width per group, params, GFLOPS, top-1 of V1 weights).
_VARIANTS = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4, 25_028_904, 4.23, 77.618),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8, 88_791_336, 16.414, 79.312),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4, 83_455_272, 15.46, 83.246),
    "wide_resnet50_2": ((3, 4, 6, 3), 1, 128, 68_883_240, 11.398, 78.468),
    "wide_resnet101_2": ((3, 4, 23, 3), 1, 128, 126_886_696, 22.753, 78.848),
}
_RESNEXT = "Xie et al., Aggregated Residual Transformations for Deep Neural Networks, CVPR 2017 (arXiv:1611.05431)"
_WIDE = "Zagoruyko and Komodakis, Wide Residual Networks, BMVC 2016 (arXiv:1605.07146)"

for _name, (_stages, _groups, _per_group, _params, _gflops, _top1) in _VARIANTS.items():
    _depth = sum(_stages) * 3 + 2
    register(
        ModelSpec(
            name=_name,
            build=partial(ResNet, stage_sizes=_stages, block=Bottleneck, groups=_groups, width_per_group=_per_group),
            family="resnet",
            torch_layout=TORCH_LAYOUT,
            paper=_RESNEXT if _groups > 1 else _WIDE,
            input_size=224,
            torchvision=_name,
            params=_params,
            gflops=_gflops,
            top1=_top1,
            description=(f"ResNeXt-{_depth} ({_groups}x{_per_group}d: grouped 3x3 in the bottleneck)" if _groups > 1
                         else f"Wide ResNet-{_depth}-2: ResNet-{_depth} with bottlenecks twice as wide"),
            min_input_size=1,
            default_params=_params,
        )
    )

# Section 5.3 and Table 7 of Xie et al.: 34.4M parameters for 8x64d (34,426,698 with a CIFAR-10 head);
# ``groups=16`` gives their 16x64d, 68.1M (68,155,210).
register(
    ModelSpec(
        name="resnext29_8x64d",
        build=partial(ResNet, stage_sizes=(3, 3, 3), block=Bottleneck, stem="cifar", groups=8, width_per_group=64),
        family="resnet",
        torch_layout=TORCH_LAYOUT,
        paper=_RESNEXT,
        input_size=32,
        num_classes=10,
        description="ResNeXt-29 (8x64d) for 32x32 input: 3x3 stem, three stages of three bottlenecks",
        min_input_size=1,
        default_params=34_426_698,
    )
)

# Section 4.2 and Table 6 of He et al.: ResNet-6n+2 for CIFAR-10 with option A shortcuts; parameters at 10
# classes (the paper prints 0.27M, 0.46M, 0.66M, 0.85M and 1.7M).
_CIFAR_DEPTHS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}

for _depth, _count in _CIFAR_DEPTHS.items():
    _n = (_depth - 2) // 6
    register(
        ModelSpec(
            name=f"resnet{_depth}",
            build=partial(ResNet, stage_sizes=(_n, _n, _n), block=BasicBlock, stem="cifar", width=16, shortcut="pad"),
            family="resnet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER,
            input_size=32,
            num_classes=10,
            description=f"ResNet-{_depth} of the paper's CIFAR-10 experiments: 16-32-64 filters, option A shortcuts",
            min_input_size=1,
            default_params=_count,
        )
    )
