"""DenseNet-121/161/169/201 (Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks",
CVPR 2017, arXiv:1608.06993), laid out as torchvision's ``densenet*`` so that parameter counts and weights carry
over, and the paper's DenseNet-BC for 32x32 input.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, AvgPool, BatchNorm, GlobalAvgPool, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["DenseNet", "DenseBlock", "DenseLayer", "Transition"]

ModuleDef = Callable[..., nn.Module]

# torchvision initialises convolutions with kaiming_normal_ (fan_in, gain sqrt(2)) and Linear biases with 0.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Its Linear weights keep PyTorch's default, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class DenseLayer(nn.Module):
    """The bottleneck layer of DenseNet-B (section 3, "Bottleneck layers"): BN-ReLU-1x1 convolution to
    ``bn_size * growth_rate`` maps, then BN-ReLU-3x3 convolution to ``growth_rate`` new maps.

    It takes the maps of every earlier layer of its block as a tuple and concatenates them itself, so that
    with ``memory_efficient`` the concatenation, the first BatchNorm and ReLU and the 1x1 convolution run
    under `flax.linen.remat`: their outputs, which grow with the block's depth, are recomputed in the
    backward pass instead of being stored (Pleiss et al., "Memory-Efficient Implementation of DenseNets",
    arXiv:1707.06990, as torchvision's ``memory_efficient``). Values and gradients are unchanged. XLA's
    CPU backend drops the optimisation barriers that keep a recomputation apart and merges it with the
    forward pass, so there the option changes nothing (benchmarks/RESULTS.md); the saving is a GPU's or TPU's.
    """

    growth_rate: int
    bn_size: int
    conv: ModuleDef
    norm: ModuleDef
    drop_rate: float = 0.0
    memory_efficient: bool = False

    def bottleneck(self, features: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
        x = nn.relu(self.norm(name="norm1")(jnp.concatenate(features, axis=-1)))
        return self.conv(self.bn_size * self.growth_rate, (1, 1), name="conv1")(x)

    @nn.compact
    def __call__(self, features: tuple[jnp.ndarray, ...], train: bool) -> jnp.ndarray:
        # remat of the method, not of a submodule: the variables keep the same names either way.
        bottleneck = nn.remat(DenseLayer.bottleneck) if self.memory_efficient else DenseLayer.bottleneck
        x = nn.relu(self.norm(name="norm2")(bottleneck(self, tuple(features))))
        x = self.conv(self.growth_rate, (3, 3), padding=padding(1), name="conv2")(x)
        if self.drop_rate > 0:
            x = nn.Dropout(self.drop_rate, deterministic=not train, name="dropout")(x)
        return x


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each fed the concatenation of the block's input and every earlier
    layer's output (equation 2 of the paper); returns that concatenation with the last layer's output."""

    num_layers: int
    layer: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        features = [x]
        for index in range(self.num_layers):
            features.append(self.layer(name=f"denselayer{index + 1}")(tuple(features), train))
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """Between two blocks: BN-ReLU, a 1x1 convolution to ``features`` maps, and a 2x2 average pool."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.conv(self.features, (1, 1), name="conv")(nn.relu(self.norm(name="norm")(x)))
        return AvgPool(2, 2, name="pool")(x)


class DenseNet(nn.Module):
    """A stem, dense blocks of ``block_sizes`` layers joined by compressing transitions, BN-ReLU, global
    average pooling and a dense layer: DenseNet-BC (bottleneck layers, compression 0.5) of the paper.

    ``growth_rate`` is the paper's k; ``num_init_features`` the stem's channels; ``bn_size`` the bottleneck
    width in multiples of k (4 in the paper); ``compression`` the paper's theta (a transition keeps
    ``int(theta * m)`` of its m maps); ``drop_rate`` dropout on each dense layer's new maps (torchvision's
    ``drop_rate``, 0 by default; the paper puts 0.2 after every convolution but the first, on CIFAR and
    SVHN without augmentation); ``memory_efficient`` recomputes each layer's concatenation in the backward
    pass (see `DenseLayer`).

    ``stem="imagenet"`` is the paper's ImageNet stem (Table 1): 7x7/2 convolution with BN-ReLU, 3x3/2 max
    pool; four blocks as in ``densenet121`` (6, 12, 24, 16 layers, k=32) ... ``densenet201``.
    ``stem="cifar"`` is the CIFAR one: a single 3x3 convolution with 2k maps (section 3, "Implementation
    Details"), three blocks on 32x32, 16x16 and 8x8 maps. Convolutions have no bias, as in torchvision.

    Feature points (`flaxnets.features`), timm's: the stem (``norm0``'s activation, or ``conv0`` for the
    CIFAR stem), every block but the last (``denseblock1``...), and the final ``norm5`` activation.
    ``remat=True`` recomputes each dense layer's activations in the backward pass instead of storing them
    (all of them, where ``memory_efficient`` recomputes the concatenation and bottleneck only).
    """

    block_sizes: Sequence[int]
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    memory_efficient: bool = False
    stem: Literal["imagenet", "cifar"] = "imagenet"
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    remat: bool = False
    ops: Ops = PLAIN

    def _widths(self) -> list[int]:
        """Channels entering each block, then after the last block."""
        widths = [self.num_init_features]
        for index, layers in enumerate(self.block_sizes):
            grown = widths[-1] + layers * self.growth_rate
            last = index == len(self.block_sizes) - 1
            widths.append(grown if last else int(grown * self.compression))
        return widths

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last block's output channels."""
        return self._widths()[-1]

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(self.ops.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        norm = partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.bn_axis_name)
        # `train` (argument 2, counting the layer itself) decides the program: static under remat.
        layer = partial(nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer, self.growth_rate,
                        self.bn_size, conv, norm, self.drop_rate, self.memory_efficient)
        if self.stem == "imagenet":
            x = conv(self.num_init_features, (7, 7), 2, padding=padding(3), name="conv0")(x)
            x = tap(self, nn.relu(norm(name="norm0")(x)), "norm0", reduction=2)
            x = self.ops.max_pool(3, 2, padding=1, name="pool0")(x)
            reduction = 4
        elif self.stem == "cifar":
            x = tap(self, conv(self.num_init_features, (3, 3), padding=padding(1), name="conv0")(x), "conv0",
                    reduction=1)
            reduction = 1
        else:
            raise ValueError(f"DenseNet stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
        widths = self._widths()
        for index, layers in enumerate(self.block_sizes):
            x = DenseBlock(layers, layer, name=f"denseblock{index + 1}")(x, train)
            if index < len(self.block_sizes) - 1:
                x = tap(self, x, f"denseblock{index + 1}", reduction=reduction)
                x = Transition(widths[index + 1], conv, norm, name=f"transition{index + 1}")(x)
                reduction *= 2
        x = tap(self, nn.relu(norm(name="norm5")(x)), "norm5", reduction=reduction)
        x = GlobalAvgPool(name="avgpool")(x)
        if self.num_classes:
            x = self.ops.dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="classifier")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


# torchvision's DenseNet keeps all but its class layer in one `features` Sequential. Its published files were
# saved when a dense layer's `norm1` was called `norm.1` (PyTorch has since forbidden dots in module names);
# torchvision renames these keys on loading, and so does flaxnets.convert.
TORCH_LAYOUT = TorchLayout(
    heads=(("classifier",),),
    module_name=lambda model, path: ".".join(path if path[0] == "classifier" else ("features", *path)),
    renamed_keys=((r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$",
                   r"\1\2"),),
)

_PAPER = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017 (arXiv:1608.06993)"
# torchvision's: (growth rate, block sizes, stem channels, params, GFLOPS, top-1 of the V1 weights).
_DEPTHS = {
    121: (32, (6, 12, 24, 16), 64, 7_978_856, 2.834, 74.434),
    161: (48, (6, 12, 36, 24), 96, 28_681_000, 7.728, 77.138),
    169: (32, (6, 12, 32, 32), 64, 14_149_480, 3.36, 75.600),
    201: (32, (6, 12, 48, 32), 64, 20_013_928, 4.291, 76.896),
}

for _depth, (_k, _blocks, _stem, _params, _gflops, _top1) in _DEPTHS.items():
    register(
        ModelSpec(
            name=f"densenet{_depth}",
            build=partial(DenseNet, block_sizes=_blocks, growth_rate=_k, num_init_features=_stem),
            family="densenet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER,
            input_size=224,
            torchvision=f"densenet{_depth}",
            params=_params,
            gflops=_gflops,
            top1=_top1,
            description=f"DenseNet-{_depth} (k={_k}, blocks {'-'.join(map(str, _blocks))}), torchvision layout",
            min_input_size=29,
            default_params=_params,
        )
    )

# Table 2 of the paper: DenseNet-BC with L=100 and k=12 has 0.8M parameters (CIFAR-10 head; 769,162 exactly).
# L counts the 3x3 and 1x1 convolutions of the three blocks, the stem, the two transitions and the dense
# layer: (100 - 4) / 6 = 16 bottleneck layers per block.
register(
    ModelSpec(
        name="densenet_bc100_k12",
        build=partial(DenseNet, block_sizes=(16, 16, 16), growth_rate=12, num_init_features=24, stem="cifar"),
        family="densenet",
        torch_layout=TORCH_LAYOUT,
        paper=_PAPER,
        input_size=32,
        num_classes=10,
        description="DenseNet-BC (L=100, k=12) for 32x32 input: 3x3 stem, three blocks of 16 bottleneck layers",
        min_input_size=4,
        default_params=769_162,
    )
)
