"""SqueezeNet 1.0 (Iandola, Han, Moskewicz, Ashraf, Dally, Keutzer, "SqueezeNet: AlexNet-level accuracy with
50x fewer parameters and <0.5MB model size", arXiv:1602.07360, 2016) and SqueezeNet 1.1 (the authors'
revision, released with their code), as torchvision lays them out.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, GlobalAvgPool, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["SqueezeNet", "Fire", "FireConfig", "CONFIGS"]


class FireConfig(NamedTuple):
    """Filters of one Fire module (the s1x1, e1x1 and e3x3 columns of Table 1 of the paper)."""

    squeeze: int
    expand1x1: int
    expand3x3: int


# An int pair (filters, kernel) is the stride-2 first convolution, "M" a 3x3/2 max-pool (ceil mode, as the
# Caffe original pools), a FireConfig a Fire module. Fire modules are numbered from 2, as in the paper;
# fire2 ... fire9 are the same in both versions.
_FIRES = (FireConfig(16, 64, 64), FireConfig(16, 64, 64), FireConfig(32, 128, 128), FireConfig(32, 128, 128),
          FireConfig(48, 192, 192), FireConfig(48, 192, 192), FireConfig(64, 256, 256), FireConfig(64, 256, 256))
CONFIGS: dict[str, tuple[Any, ...]] = {
    # Table 1: conv1 96@7x7/2, maxpool1, fire2-4, maxpool4, fire5-8, maxpool8, fire9.
    "1_0": ((96, 7), "M", *_FIRES[:3], "M", *_FIRES[3:7], "M", _FIRES[7]),
    # 1.1: conv1 64@3x3/2, and the pools moved earlier (after conv1, fire3, fire5), 2.4x fewer operations.
    "1_1": ((64, 3), "M", *_FIRES[:2], "M", *_FIRES[2:4], "M", *_FIRES[4:]),
}

# torchvision's initialisation: kaiming_uniform_ (gain sqrt(2), fan in) for every convolution but the class
# layer, which is drawn from N(0, 0.01^2); biases zero.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
class_init = nn.initializers.normal(0.01)


class Fire(nn.Module):
    """A 1x1 "squeeze" convolution, then 1x1 and 3x3 "expand" convolutions side by side, each with ReLU, their
    maps concatenated (1x1 first) on channels (section 3.2 of the paper)."""

    config: FireConfig
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(self.config.squeeze, (1, 1), name="squeeze")(x))
        narrow = nn.relu(self.conv(self.config.expand1x1, (1, 1), name="expand1x1")(x))
        wide = nn.relu(self.conv(self.config.expand3x3, (3, 3), padding=padding(1), name="expand3x3")(x))
        return jnp.concatenate([narrow, wide], axis=-1)


class SqueezeNet(nn.Module):
    """A stride-2 convolution, eight Fire modules with three max-pools among them, and a 1x1 convolution to
    one map per class averaged over the image: no dense layer, 1.2M parameters for AlexNet's accuracy.

    ``config`` is a row of `CONFIGS` (``"1_0"`` or ``"1_1"``, by name or as the row itself). Dropout 0.5
    after the last Fire module precedes the class convolution (section 3.3.1), which has a ReLU before the
    average, as the authors' Caffe model and torchvision have it: the logits are never negative, and a class
    whose map dies early in training from scratch stays at zero (on small data this depends on the seed, in
    torchvision's model as here: benchmarks/RESULTS.md). Departures from the paper: none in the layers; its
    variants with bypass connections are not built. With ``num_classes=0`` the model returns the global
    average of the last Fire module's maps, without the dropout and the class convolution.

    Feature points (`flaxnets.features`): the maps entering each max-pool (the first convolution's after its
    ReLU, then the last Fire module before each pool) and the last Fire module's. ``remat=True``
    recomputes each Fire module's activations in the backward pass instead of storing them.
    """

    config: str | Sequence[Any] = "1_0"
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def layers(self) -> tuple[Any, ...]:
        """The configuration as a row of `CONFIGS`, its Fire modules as `FireConfig`s."""
        if isinstance(self.config, str) and self.config not in CONFIGS:
            raise ValueError(f"SqueezeNet config {self.config!r} is not one of {', '.join(map(repr, CONFIGS))}.")
        row = CONFIGS[self.config] if isinstance(self.config, str) else tuple(self.config)

        def ints(layer, count):
            return not isinstance(layer, str) and len(layer) == count and all(isinstance(v, int) for v in layer)

        if not row or not ints(row[0], 2) or not all(layer == "M" or ints(layer, 3) for layer in row[1:]):
            raise ValueError("a SqueezeNet config is the first convolution's (filters, kernel), then \"M\" for a "
                             "max-pool or (squeeze, expand1x1, expand3x3) for a Fire module, e.g. ((64, 3), \"M\", "
                             f"(16, 64, 64)); got {self.config!r}.")
        if any(a == b == "M" for a, b in zip(row[1:], row[2:])):
            raise ValueError(f"a SqueezeNet config needs a Fire module between two max-pools; got {self.config!r}.")
        return (tuple(row[0]), *(layer if layer == "M" else FireConfig(*layer) for layer in row[1:]))

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last Fire module's output."""
        (filters, _), *rest = self.layers
        fires = [layer for layer in rest if layer != "M"]
        return fires[-1].expand1x1 + fires[-1].expand3x3 if fires else filters

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(self.ops.conv, kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype)
        fire = partial(nn.remat(Fire) if self.remat else Fire, conv=conv)
        (filters, kernel), *rest = self.layers
        x = nn.relu(conv(filters, (kernel, kernel), strides=2, padding=padding(0), name="conv1")(x))
        last, reduction, index = "conv1", 2, 1
        for layer in rest:
            if layer == "M":
                x = tap(self, x, last, reduction=reduction)
                x = self.ops.max_pool(3, 2, ceil_mode=True, name=f"maxpool{index}")(x)
                reduction *= 2
                continue
            index += 1
            last = f"fire{index}"
            x = fire(layer, name=last)(x)
        if not rest or rest[-1] != "M":  # after a last pool, its input was the last feature point
            x = tap(self, x, last, reduction=reduction)
        if self.num_classes:
            x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
            # The paper's name for the class convolution, whatever the number of Fire modules before it.
            x = nn.relu(conv(self.num_classes, (1, 1), kernel_init=class_init, name="conv10")(x))
        return GlobalAvgPool(name="avgpool")(x).astype(jnp.promote_types(self.dtype, jnp.float32))


def _torch_name(model: SqueezeNet, path: tuple[str, ...]) -> str:
    """torchvision's ``features`` Sequential holds the convolution, its ReLU, then one entry per pool and Fire
    module; its ``classifier`` is (Dropout, class convolution, ReLU, pool)."""
    table, position, index = {"conv1": "features.0"}, 2, 1
    for layer in model.layers[1:]:
        if layer != "M":
            index += 1
            table[f"fire{index}"] = f"features.{position}"
        position += 1
    table["conv10"] = "classifier.1"
    return ".".join((table[path[0]], *path[1:]))


TORCH_LAYOUT = TorchLayout(heads=(("conv10",),), module_name=_torch_name)

_PAPER = "Iandola et al., SqueezeNet: AlexNet-level accuracy with 50x fewer parameters, 2016 (arXiv:1602.07360)"

# torchvision's published numbers: parameters, GFLOPS, top-1, and the smallest input side it states.
for _version, (_params, _gflops, _top1, _min_side, _description) in {
    "1_0": (1_248_424, 0.819, 58.092, 21, "SqueezeNet 1.0: 96@7x7 stem, eight Fire modules, no dense layer"),
    "1_1": (1_235_496, 0.349, 58.178, 17, "SqueezeNet 1.1: 64@3x3 stem and earlier pools, 2.4x fewer operations"),
}.items():
    register(
        ModelSpec(
            name=f"squeezenet{_version}",
            build=partial(SqueezeNet, config=_version),
            family="squeezenet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER if _version == "1_0" else f"{_PAPER}; version 1.1 from the authors' repository",
            input_size=224,
            torchvision=f"squeezenet{_version}",
            params=_params,
            gflops=_gflops,
            top1=_top1,
            description=_description,
            min_input_size=_min_side,
            default_params=_params,
        )
    )
