"""AlexNet (Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NeurIPS 2012) in three forms: torchvision's, the paper's, and a small one for 32x32 input.

Feature points (`flaxnets.features`): the maps entering each max-pool, after ReLU (and LRN where there is
one). With five convolutions and no blocks there is nothing to rematerialise stage by stage: no ``remat``
option (``flax.linen.remat`` of the whole model works).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, AdaptiveAvgPool, LocalResponseNorm, Ops, padding
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout

__all__ = ["AlexNet", "AlexNetPaper", "AlexNetSmall"]

_PAPER = "Krizhevsky, Sutskever, Hinton, ImageNet Classification with Deep CNNs, NeurIPS 2012"


def _classifier(module: nn.Module, x: jnp.ndarray, hidden: tuple[int, ...], dropout: float, train: bool
                ) -> jnp.ndarray:
    """Dropout before each hidden dense layer (torchvision's order), ReLU after, then the class layer
    (none when ``module.num_classes`` is 0: the last hidden layer's features are returned)."""
    dense = partial(module.ops.dense, dtype=module.dtype, param_dtype=module.param_dtype)
    x = x.reshape((x.shape[0], -1))
    for index, width in enumerate(hidden):
        x = nn.Dropout(dropout, deterministic=not train, name=f"dropout{index + 1}")(x)
        x = nn.relu(dense(width, name=f"fc{index + 1}")(x))
    if module.num_classes:
        x = dense(module.num_classes, name=f"fc{len(hidden) + 1}")(x)
    return x.astype(jnp.promote_types(module.dtype, jnp.float32))


class AlexNet(nn.Module):
    """torchvision's AlexNet: the single-tower network of Krizhevsky's "One weird trick for parallelizing
    convolutional neural networks" (arXiv:1404.5997), not the 2012 paper's.

    It departs from the 2012 paper (see `AlexNetPaper`): 64-192-384-256-256 filters instead of
    96-256-384-384-256, no Local Response Normalization, padding 2 on the first convolution, and an
    adaptive average pool to 6x6 so that any input of at least 63x63 reaches the classifier.
    61,100,840 parameters at 1000 classes.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last hidden dense layer's."""
        return 4096

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(self.ops.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        pool = self.ops.max_pool
        x = nn.relu(conv(64, (11, 11), 4, padding=padding(2), name="conv1")(x))
        x = pool(3, 2, name="pool1")(tap(self, x, "conv1", reduction=4))
        x = nn.relu(conv(192, (5, 5), padding=padding(2), name="conv2")(x))
        x = pool(3, 2, name="pool2")(tap(self, x, "conv2", reduction=8))
        x = nn.relu(conv(384, (3, 3), padding=padding(1), name="conv3")(x))
        x = nn.relu(conv(256, (3, 3), padding=padding(1), name="conv4")(x))
        x = nn.relu(conv(256, (3, 3), padding=padding(1), name="conv5")(x))
        x = pool(3, 2, name="pool5")(tap(self, x, "conv5", reduction=16))
        x = AdaptiveAvgPool(6, name="avgpool")(x)
        return _classifier(self, x, (4096, 4096), self.dropout, train)


class AlexNetPaper(nn.Module):
    """The 2012 paper's AlexNet on one device: 96@11x11/4, LRN, 3x3/2 max-pool, 256@5x5, LRN, max-pool,
    384@3x3, 384@3x3, 256@3x3, max-pool, then 4096-4096-classes with dropout 0.5 (section 3.5, figure 2).

    Input is 227x227 (the paper says 224, but only 227 gives its 55x55 first maps without padding).
    Local Response Normalization uses the paper's k=2, n=5, alpha=1e-4, beta=0.75 (section 3.3) with
    alpha not divided by n. Overlapping pooling, 3x3 windows with stride 2, as in section 3.4.

    Departures: the paper splits every layer but conv3 and the dense layers across two GPUs (conv2, conv4
    and conv5 see only their own half of the maps); this is the usual single-tower form, so conv2, conv4
    and conv5 see all input maps and the network has 62,378,344 parameters at 1000 classes instead of the
    paper's ~60M. ``bias_one=True`` applies the paper's initialisation of the biases of conv2, conv4,
    conv5 and the hidden dense layers to 1 (section 5); the default is 0, which trains as well with
    modern initialisation.
    """

    num_classes: int = 1000
    dropout: float = 0.5
    bias_one: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last hidden dense layer's."""
        return 4096

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        one = nn.initializers.ones if self.bias_one else nn.initializers.zeros
        gauss = nn.initializers.normal(0.01)  # section 5: weights from N(0, 0.01^2)
        conv = partial(self.ops.conv, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=gauss)
        dense = partial(self.ops.dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=gauss)
        pool = self.ops.max_pool
        lrn = partial(LocalResponseNorm, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="paper")
        x = nn.relu(conv(96, (11, 11), 4, padding="VALID", name="conv1")(x))
        x = pool(3, 2, name="pool1")(tap(self, lrn(name="lrn1")(x), "lrn1", reduction=4))
        x = nn.relu(conv(256, (5, 5), padding=padding(2), bias_init=one, name="conv2")(x))
        x = pool(3, 2, name="pool2")(tap(self, lrn(name="lrn2")(x), "lrn2", reduction=8))
        x = nn.relu(conv(384, (3, 3), padding=padding(1), name="conv3")(x))
        x = nn.relu(conv(384, (3, 3), padding=padding(1), bias_init=one, name="conv4")(x))
        x = nn.relu(conv(256, (3, 3), padding=padding(1), bias_init=one, name="conv5")(x))
        x = pool(3, 2, name="pool5")(tap(self, x, "conv5", reduction=16))
        x = x.reshape((x.shape[0], -1))
        for index in (1, 2):
            x = dense(4096, bias_init=one, name=f"fc{index}")(x)
            x = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout{index}")(nn.relu(x))
        if self.num_classes:
            x = dense(self.num_classes, name="fc3")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


class AlexNetSmall(nn.Module):
    """A scaled-down AlexNet for 32x32 input (CIFAR-10, and 28x28 Fashion-MNIST): the paper's pattern of a
    large strided first convolution, LRN and overlapping pooling after the first two convolutions, three
    3x3 convolutions and a dropout classifier, at widths that train in minutes.

    Layers: 48@7x7/2 (pad 3), LRN, 3x3/2 max-pool (pad 1), 128@5x5, LRN, max-pool, 3x 192@3x3, max-pool,
    then 512-512-classes with dropout. Not from a paper: a teaching-size member of the family.
    """

    num_classes: int = 10
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: the last hidden dense layer's."""
        return 512

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(self.ops.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        pool = self.ops.max_pool
        lrn = partial(LocalResponseNorm, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="paper")
        x = nn.relu(conv(48, (7, 7), 2, padding=padding(3), name="conv1")(x))
        x = pool(3, 2, padding=1, name="pool1")(tap(self, lrn(name="lrn1")(x), "lrn1", reduction=2))
        x = nn.relu(conv(128, (5, 5), padding=padding(2), name="conv2")(x))
        x = pool(3, 2, padding=1, name="pool2")(tap(self, lrn(name="lrn2")(x), "lrn2", reduction=4))
        for index in (3, 4, 5):
            x = nn.relu(conv(192, (3, 3), padding=padding(1), name=f"conv{index}")(x))
        x = pool(3, 2, padding=1, name="pool5")(tap(self, x, "conv5", reduction=8))
        return _classifier(self, x, (512, 512), self.dropout, train)


# torchvision's AlexNet: features = Conv(0) ReLU MaxPool Conv(3) ReLU MaxPool Conv(6) ReLU Conv(8) ReLU
# Conv(10) ReLU MaxPool; avgpool to 6x6; classifier = Dropout Linear(1) ReLU Dropout Linear(4) ReLU Linear(6).
_TORCH_NAMES = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc1": "classifier.1",
    "fc2": "classifier.4",
    "fc3": "classifier.6",
}
TORCH_LAYOUT = TorchLayout(
    heads=(("fc3",),),
    module_name=lambda model, path: _TORCH_NAMES[path[0]],
    flattened={("fc1",): lambda model: (6, 6)},
)

register(
    ModelSpec(
        name="alexnet",
        build=AlexNet,
        family="alexnet",
        torch_layout=TORCH_LAYOUT,
        paper="Krizhevsky, One weird trick for parallelizing CNNs, 2014 (arXiv:1404.5997)",
        input_size=224,
        torchvision="alexnet",
        params=61_100_840,
        gflops=0.714,
        top1=56.522,
        description="torchvision's AlexNet (64-192-384-256-256, no LRN)",
        min_input_size=63,
        default_params=61_100_840,
    )
)
register(
    ModelSpec(
        name="alexnet_paper",
        build=AlexNetPaper,
        family="alexnet",
        torch_layout=TORCH_LAYOUT,
        paper=_PAPER,
        input_size=227,
        description="the 2012 paper's AlexNet on one tower, with LRN (227x227)",
        min_input_size=67,
        default_params=62_378_344,
    )
)
register(
    ModelSpec(
        name="alexnet_small",
        build=AlexNetSmall,
        family="alexnet",
        torch_layout=TORCH_LAYOUT,
        paper=_PAPER,
        input_size=32,
        num_classes=10,
        description="a small AlexNet with LRN for 32x32 input",
        min_input_size=1,
        default_params=1_707_658,
    )
)
