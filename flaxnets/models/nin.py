"""Network in Network (Lin, Chen, Yan, "Network In Network", ICLR 2014, arXiv:1312.4400), in the ImageNet
form the Dive into Deep Learning book builds (section 8.3).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, GlobalAvgPool, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["NiN", "NiNBlock"]


class NiNBlock(nn.Module):
    """One "mlpconv" layer: a spatial convolution followed by ``mlp_layers`` 1x1 convolutions (``mlp1``,
    ``mlp2``, ...), each with ReLU.

    The 1x1 convolutions are the paper's per-pixel multilayer perceptron (section 3.1).
    """

    features: int
    kernel: int
    conv: Callable[..., nn.Module]
    strides: int = 1
    pad: int = 0
    mlp_layers: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(self.features, (self.kernel, self.kernel), self.strides, padding=padding(self.pad),
                              name="conv")(x))
        for index in range(self.mlp_layers):
            x = nn.relu(self.conv(self.features, (1, 1), name=f"mlp{index + 1}")(x))
        return x


class NiN(nn.Module):
    """Four mlpconv blocks (96@11x11/4, 256@5x5, 384@3x3, classes@3x3) with 3x3/2 max-pools between
    them, dropout before the last block, and global average pooling in place of dense layers (section
    3.2): the network has no dense layer at all; the last block emits one map per class.

    Departures, following d2l: AlexNet-sized first layers for 224x224 ImageNet input (the paper's ImageNet
    model is not fully specified), and, as in d2l and the paper's own code, a ReLU on the class maps
    before the average, so logits are non-negative. With ``num_classes=0`` the class block is left out:
    the model returns the global average of the third block's 384 maps (after the dropout).

    ``mlp_layers`` sets the 1x1 convolutions per block: two in the paper and d2l; d2l's NiN exercise 2 asks
    what one or three change (``mlp_layers=1`` or ``3``; 0 leaves plain convolutions).

    Feature points (`flaxnets.features`): the outputs of the first three blocks, before their pools.
    ``remat=True`` recomputes each block's activations in the backward pass instead of storing them.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    mlp_layers: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the third block's channels."""
        return 384

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        block = partial(nn.remat(NiNBlock) if self.remat else NiNBlock,
                        conv=partial(self.ops.conv, dtype=self.dtype, param_dtype=self.param_dtype),
                        mlp_layers=self.mlp_layers)
        pool = self.ops.max_pool
        x = tap(self, block(96, 11, strides=4, pad=0, name="block1")(x), "block1", reduction=4)
        x = pool(3, 2, name="pool1")(x)
        x = tap(self, block(256, 5, pad=2, name="block2")(x), "block2", reduction=8)
        x = pool(3, 2, name="pool2")(x)
        x = tap(self, block(384, 3, pad=1, name="block3")(x), "block3", reduction=16)
        x = pool(3, 2, name="pool3")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        if self.num_classes:
            x = block(self.num_classes, 3, pad=1, name="block4")(x)
        return GlobalAvgPool(name="avgpool")(x).astype(jnp.promote_types(self.dtype, jnp.float32))

# torchvision has no NiN; every layer of its last mlpconv block has num_classes channels.
TORCH_LAYOUT = TorchLayout(heads=(("block4",),))

register(
    ModelSpec(
        name="nin",
        build=NiN,
        family="nin",
        torch_layout=TORCH_LAYOUT,
        paper="Lin, Chen, Yan, Network In Network, ICLR 2014 (arXiv:1312.4400)",
        input_size=224,
        description="Network in Network as in d2l: four mlpconv blocks, no dense layer",
        min_input_size=67,
        default_params=7_439_608,
    )
)
