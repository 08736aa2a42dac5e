"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, "Gradient-Based Learning Applied to Document Recognition",
Proc. IEEE 1998), in the form the Dive into Deep Learning book teaches (section 7.6).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, AvgPool, BatchNorm, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """Two 5x5 convolutions (6 and 16 maps) with 2x2 pooling, then dense layers of 120, 84 and the classes.

    Departures from the 1998 paper, as in d2l: the first convolution pads by 2 so a 28x28 MNIST image
    plays the role of the paper's 32x32 input; C3 connects to all six S2 maps (the paper's sparse table
    is dropped); pooling has no trainable coefficients; the output is a dense layer, not Euclidean RBF
    units. With the defaults (sigmoid, average pooling) it has 61,706 parameters at 28x28 and 10 classes.

    ``activation`` (sigmoid or ReLU) and ``pool`` (average or max) are chosen independently:
    ``activation="relu", pool="max"`` is the modern variant that trains to about 91% on Fashion-MNIST;
    ``activation="relu"`` alone keeps the average pooling. ``batch_norm=True`` adds BatchNorm after every
    convolution and hidden dense layer (d2l section 8.5). ``dropout`` above 0 adds dropout after both hidden
    dense layers, as AlexNet has it (d2l's AlexNet exercise: "apply dropout and ReLU to LeNet-5";
    ``activation="relu", dropout=0.5``). ``num_classes=0`` drops the output layer: the model returns the
    84 features before it.

    Feature points (`flaxnets.features`): the activations entering each pool (``conv1``, ``conv2``; the
    second is 10x10 at 28x28 input, its unpadded 5x5 convolution trimming the border). No ``remat``: two
    convolutions hold nothing worth recomputing.
    """

    num_classes: int = 10
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    pool: Literal["avg", "max"] = "avg"
    batch_norm: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    ops: Ops = PLAIN

    def __post_init__(self):
        # Refused when built, in one sentence, rather than as a KeyError while it is traced.
        for field, choices in (("activation", ("sigmoid", "relu")), ("pool", ("avg", "max"))):
            if getattr(self, field) not in choices:
                raise ValueError(f"LeNet-5's {field} is {' or '.join(map(repr, choices))}, "
                                 f"got {getattr(self, field)!r}.")
        super().__post_init__()

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the second hidden dense layer's."""
        return 84

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        act = {"sigmoid": nn.sigmoid, "relu": nn.relu}[self.activation]
        pool = {"avg": AvgPool, "max": self.ops.max_pool}[self.pool]
        conv = partial(self.ops.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = partial(self.ops.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype,
                       axis_name=self.bn_axis_name)

        def block(layer, y, index):
            y = layer(y)
            if self.batch_norm:
                y = norm(name=f"bn{index}")(y)
            return act(y)

        def hidden(width, y, index):
            y = block(dense(width, name=f"fc{index}"), y, index + 2)
            if self.dropout > 0:
                y = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout{index}")(y)
            return y

        x = block(conv(6, (5, 5), padding=padding(2), name="conv1"), x, 1)
        x = pool(2, 2, name="pool1")(tap(self, x, "conv1", reduction=1))
        x = block(conv(16, (5, 5), padding="VALID", name="conv2"), x, 2)
        x = pool(2, 2, name="pool2")(tap(self, x, "conv2", reduction=2))
        x = x.reshape((x.shape[0], -1))
        x = hidden(120, x, 1)
        x = hidden(84, x, 2)
        if self.num_classes:
            x = dense(self.num_classes, name="fc3")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))

TORCH_LAYOUT = TorchLayout(heads=(("fc3",),))  # torchvision has no LeNet: only the class layer is declared

_PAPER = "LeCun et al., Gradient-Based Learning Applied to Document Recognition, Proc. IEEE 1998"
# name, fields, description, parameters at 10 classes
for _name, _fields, _what, _count in (
    ("lenet5", {}, "LeNet-5 as in d2l: sigmoid, average pooling", 61_706),
    ("lenet5_relu", {"activation": "relu", "pool": "max"}, "LeNet-5 with ReLU and max-pooling", 61_706),
    ("lenet5_bn", {"activation": "relu", "pool": "max", "batch_norm": True},
     "LeNet-5 with ReLU, max-pooling and BatchNorm", 62_158),
):
    register(
        ModelSpec(
            name=_name,
            build=partial(LeNet5, **_fields),
            family="lenet",
            torch_layout=TORCH_LAYOUT,
            paper=_PAPER,
            input_size=28,
            num_classes=10,
            in_channels=1,
            description=_what,
            min_input_size=12,
            default_params=_count,
        )
    )
