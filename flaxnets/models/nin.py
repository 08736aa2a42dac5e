"""Network in Network (Lin, Chen, Yan, "Network In Network", ICLR 2014, arXiv:1312.4400), in the ImageNet
form the Dive into Deep Learning book builds (section 8.3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.input_size import checks_input_size
from flaxnets.layers import Conv, GlobalAvgPool, MaxPool, padding
from flaxnets.registry import ModelSpec, register

__all__ = ["NiN", "NiNBlock"]


class NiNBlock(nn.Module):
    """One "mlpconv" layer: a spatial convolution followed by two 1x1 convolutions, each with ReLU.

    The 1x1 convolutions are the paper's per-pixel multilayer perceptron (section 3.1).
    """

    features: int
    kernel: int
    strides: int = 1
    pad: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(self.features, (self.kernel, self.kernel), self.strides, padding=padding(self.pad),
                         dtype=self.dtype, name="conv")(x))
        x = nn.relu(Conv(self.features, (1, 1), dtype=self.dtype, name="mlp1")(x))
        return nn.relu(Conv(self.features, (1, 1), dtype=self.dtype, name="mlp2")(x))


class NiN(nn.Module):
    """Four mlpconv blocks (96@11x11/4, 256@5x5, 384@3x3, classes@3x3) with 3x3/2 max-pools between
    them, dropout before the last block, and global average pooling in place of dense layers (section
    3.2): the network has no dense layer at all; the last block emits one map per class.

    Departures, following d2l: AlexNet-sized first layers for 224x224 ImageNet input (the paper's ImageNet
    model is not fully specified), and, as in d2l and the paper's own code, a ReLU on the class maps
    before the average, so logits are non-negative.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = NiNBlock(96, 11, 4, 0, dtype=self.dtype, name="block1")(x)
        x = MaxPool(3, 2, name="pool1")(x)
        x = NiNBlock(256, 5, 1, 2, dtype=self.dtype, name="block2")(x)
        x = MaxPool(3, 2, name="pool2")(x)
        x = NiNBlock(384, 3, 1, 1, dtype=self.dtype, name="block3")(x)
        x = MaxPool(3, 2, name="pool3")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        x = NiNBlock(self.num_classes, 3, 1, 1, dtype=self.dtype, name="block4")(x)
        return GlobalAvgPool(name="avgpool")(x).astype(jnp.float32)


register(
    ModelSpec(
        name="nin",
        build=NiN,
        family="nin",
        paper="Lin, Chen, Yan, Network In Network, ICLR 2014 (arXiv:1312.4400)",
        input_size=224,
        description="Network in Network as in d2l: four mlpconv blocks, no dense layer",
    )
)
