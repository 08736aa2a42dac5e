"""VGG-11/13/16/19 with and without BatchNorm (Simonyan and Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", ICLR 2015, arXiv:1409.1556), as torchvision lays them out, and VGG-16
for 32x32 input.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, AdaptiveAvgPool, BatchNorm, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["VGG", "CONFIGS", "D2L_CONV_ARCH", "layer_table"]

# Table 1 of the paper: an int is a 3x3 convolution with that many filters, "M" a 2x2/2 max-pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # A
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # B
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),  # D
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),  # E
}

# The same configuration A in the block form of the Dive into Deep Learning book (section 8.2): one
# (number of convolutions, channels) pair per block, each block ending in a max-pool.
D2L_CONV_ARCH: tuple[tuple[int, int], ...] = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def layer_table(config: Sequence[int | str | Sequence[int]]) -> tuple[int | str, ...]:
    """``config`` as a row of `CONFIGS`: a row is returned as it is, and d2l's ``conv_arch`` blocks,
    ``(num_convs, channels)`` pairs (tuples or the lists JSON gives), become ``num_convs`` widths and an "M"."""
    if all(isinstance(layer, (int, str)) for layer in config):
        return tuple(config)
    if all(isinstance(block, Sequence) and not isinstance(block, str) and len(block) == 2 for block in config):
        return tuple(layer for convs, width in config for layer in (*(int(width),) * int(convs), "M"))
    raise ValueError(f"a VGG config is a row of widths and 'M' (e.g. (64, 'M', 128, 'M')) or d2l's blocks of "
                     f"(num_convs, channels) (e.g. ((1, 64), (1, 128))), got {config!r}.")


# torchvision's initialisation: kaiming_normal_(fan_out, relu) for convolutions, N(0, 0.01) for Linear.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.normal(0.01)


class VGG(nn.Module):
    """Stacks of 3x3 convolutions (padding 1) and 2x2 max-pools, then two hidden dense layers.

    ``config`` is a row of `CONFIGS` or any other such row (3x3 convolution widths, "M" for a max-pool), or
    the blocks of d2l's ``conv_arch``: ``(num_convs, channels)`` pairs, each block ending in a max-pool
    (`D2L_CONV_ARCH` is VGG-11; ``tuple((n, c // 4) for n, c in D2L_CONV_ARCH)`` the narrow one d2l
    trains on Fashion-MNIST). With ``pool_size=(7, 7)`` (torchvision's layout) an adaptive average pool
    maps the last feature maps to 7x7 before the 25088-wide first dense layer, so inputs from 32x32 up
    give the same parameter count; the paper, trained at 224x224, has no such pool. With
    ``pool_size=None`` the features are flattened as they are, so the first dense layer follows the
    input size: 512x1x1 at 32x32 (the CIFAR form), 512x3x3 at 96x96 (d2l's VGG exercise on 96-pixel
    Fashion-MNIST, 44,920,074 parameters with one input channel and 10 classes). ``hidden`` gives the widths
    of the hidden dense layers. ``batch_norm`` inserts BatchNorm after every convolution (not in the paper,
    which predates it; torchvision's ``vgg*_bn``). Dropout 0.5 follows each hidden dense layer, as in
    section 3.1.

    Feature points (`flaxnets.features`): the activations entering each max-pool (``stage1``...), as timm
    places them. ``remat=True`` recomputes each stage's activations (its convolutions between two pools)
    in the backward pass instead of storing them; values, gradients and variable names are unchanged.
    """

    config: Sequence[int | str | Sequence[int]]
    num_classes: int = 1000
    batch_norm: bool = False
    hidden: Sequence[int] = (4096, 4096)
    pool_size: tuple[int, int] | None = (7, 7)
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int | None:
        """Width of the features returned with ``num_classes=0``: the last hidden dense layer's, or the
        flattened maps' without hidden layers (`None` when that depends on the input size)."""
        if self.hidden:
            return self.hidden[-1]
        channels = [layer for layer in layer_table(self.config) if layer != "M"][-1]
        return channels * self.pool_size[0] * self.pool_size[1] if self.pool_size is not None else None

    def stage(self, x: jnp.ndarray, widths: tuple[int, ...], first: int, train: bool) -> jnp.ndarray:
        """The 3x3 convolutions (with BatchNorm and ReLU) between two pools, numbered from ``first``."""
        conv = partial(self.ops.conv, kernel_size=(3, 3), padding=padding(1), kernel_init=conv_init,
                       dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype,
                       axis_name=self.bn_axis_name)
        for index, width in enumerate(widths, start=first):
            x = conv(width, name=f"conv{index}")(x)
            if self.batch_norm:
                x = norm(name=f"bn{index}")(x)
            x = nn.relu(x)
        return x

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dense = partial(self.ops.dense, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
        # remat of the method, not of a submodule: the variables keep the same names either way.
        stage = nn.remat(VGG.stage, static_argnums=(2, 3, 4)) if self.remat else VGG.stage
        widths: list[int] = []
        conv_count, pool_index = 0, 0
        for layer in (*layer_table(self.config), None):  # None closes a last stage without a pool
            if layer not in ("M", None):
                widths.append(layer)
                continue
            if widths:
                x = stage(self, x, tuple(widths), conv_count + 1, train)
                conv_count, widths = conv_count + len(widths), []
            if layer == "M":
                x = tap(self, x, f"stage{pool_index + 1}", reduction=2**pool_index)
                pool_index += 1
                x = self.ops.max_pool(2, 2, name=f"pool{pool_index}")(x)
        if self.pool_size is not None:
            x = AdaptiveAvgPool(self.pool_size, name="avgpool")(x)
        x = x.reshape((x.shape[0], -1))
        for index, width in enumerate(self.hidden):
            x = nn.relu(dense(width, name=f"fc{index + 1}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout{index + 1}")(x)
        if self.num_classes:
            x = dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def _torch_name(model: VGG, path: tuple[str, ...]) -> str:
    """torchvision's ``make_layers``: ``features`` holds Conv, [BatchNorm], ReLU per width and MaxPool per "M";
    ``classifier`` is (Linear, ReLU, Dropout) per hidden layer, then the class layer."""
    table, index, conv = {}, 0, 0
    for layer in layer_table(model.config):
        if layer == "M":
            index += 1
            continue
        conv += 1
        table[f"conv{conv}"] = f"features.{index}"
        if model.batch_norm:
            table[f"bn{conv}"] = f"features.{index + 1}"
        index += 3 if model.batch_norm else 2
    for layer in range(len(model.hidden) + 1):
        table[f"fc{layer + 1}"] = f"classifier.{3 * layer}"
    return table[path[0]]


# torchvision flattens the (C, 7, 7) maps of its avgpool (`pool_size`) into fc1.
TORCH_LAYOUT = TorchLayout(heads=(("fc3",),), module_name=_torch_name,
                           flattened={("fc1",): lambda model: tuple(model.pool_size)})

_PAPER = "Simonyan and Zisserman, Very Deep Convolutional Networks, ICLR 2015 (arXiv:1409.1556)"
# torchvision's published numbers: (params, params with BN, GFLOPS, top-1, top-1 with BN).
_REFERENCE = {
    "vgg11": (132_863_336, 132_868_840, 7.609, 69.020, 70.370),
    "vgg13": (133_047_848, 133_053_736, 11.308, 69.928, 71.586),
    "vgg16": (138_357_544, 138_365_992, 15.47, 71.592, 73.360),
    "vgg19": (143_667_240, 143_678_248, 19.632, 72.376, 74.218),
}

for _name, (_params, _params_bn, _gflops, _top1, _top1_bn) in _REFERENCE.items():
    for _bn in (False, True):
        register(
            ModelSpec(
                name=f"{_name}_bn" if _bn else _name,
                build=partial(VGG, config=CONFIGS[_name], batch_norm=_bn),
                family="vgg",
                torch_layout=TORCH_LAYOUT,
                paper=_PAPER,
                input_size=224,
                torchvision=f"{_name}_bn" if _bn else _name,
                params=_params_bn if _bn else _params,
                gflops=_gflops,
                top1=_top1_bn if _bn else _top1,
                description=f"VGG-{_name[3:]}{' with BatchNorm' if _bn else ''}, torchvision layout",
                min_input_size=32,
                default_params=_params_bn if _bn else _params,
            )
        )

register(
    ModelSpec(
        name="vgg16_cifar",
        build=partial(VGG, config=CONFIGS["vgg16"], batch_norm=True, pool_size=None),
        family="vgg",
        torch_layout=TORCH_LAYOUT,
        paper=_PAPER,
        input_size=32,
        num_classes=10,
        description="VGG-16 with BatchNorm for 32x32 input (512x1x1 features)",
        min_input_size=32,
        default_params=33_646_666,
    )
)
