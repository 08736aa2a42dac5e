"""Inception v3 (Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture for Computer
Vision", CVPR 2016, arXiv:1512.00567), laid out as torchvision's ``inception_v3`` so that parameter counts
and weights carry over.

The network is written as tables: every Inception module is a tuple of branches, every branch a sequence of
convolutions (each a BatchNorm-ReLU unit), pools and side-by-side pairs, read by one module, `InceptionBlock`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import PLAIN, AvgPool, BatchNorm, GlobalAvgPool, Ops
from flaxnets.models.googlenet import ConvUnit, imagenet_to_half_range, sow_latest
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout, joined

__all__ = ["InceptionV3", "InceptionBlock", "Conv", "Pair", "STEM", "MIXED", "AUX_MIN_MAP"]

ModuleDef = Callable[..., nn.Module]


class Conv(NamedTuple):
    """One convolution unit (convolution, BatchNorm, ReLU): output channels, kernel, stride and padding, the
    kernel and padding as one number or as (height, width)."""

    features: int
    kernel: int | tuple[int, int]
    strides: int = 1
    pad: int | tuple[int, int] = 0


class Pair(NamedTuple):
    """Two convolutions applied side by side to the same maps, their outputs concatenated (figure 7 of the
    paper: a 3x3 expanded into a 1x3 and a 3x1)."""

    first: Conv
    second: Conv


# The pools inside the modules: a 3x3 average pool with stride 1 and padding 1 (the padding counted in the
# average, PyTorch's default), and the 3x3/2 max pool of the grid reductions and the stem.
AVG = "avg"
MAX = "max"

Step = Conv | Pair | str
Branch = tuple[str, tuple[Step, ...]]

# 1x7 then 7x1, and 7x1 then 1x7: the factorised 7x7 of figure 6.
_1x7 = {"kernel": (1, 7), "pad": (0, 3)}
_7x1 = {"kernel": (7, 1), "pad": (3, 0)}
_EXPANDED = Pair(Conv(384, (1, 3), pad=(0, 1)), Conv(384, (3, 1), pad=(1, 0)))


def module_a(pool_proj: int) -> tuple[Branch, ...]:
    """35x35 grid (figure 5); ``pool_proj`` channels after the pool. Google's model, which torchvision ports,
    keeps a 5x5 branch beside the two stacked 3x3s that replace it in the figure."""
    return (
        ("branch1x1", (Conv(64, 1),)),
        ("branch5x5", (Conv(48, 1), Conv(64, 5, pad=2))),
        ("branch3x3dbl", (Conv(64, 1), Conv(96, 3, pad=1), Conv(96, 3, pad=1))),
        ("branch_pool", (AVG, Conv(pool_proj, 1))),
    )


def module_c(c7: int) -> tuple[Branch, ...]:
    """17x17 grid (figure 6): 7x7 convolutions factorised into 1x7 and 7x1, ``c7`` channels inside."""
    return (
        ("branch1x1", (Conv(192, 1),)),
        ("branch7x7", (Conv(c7, 1), Conv(c7, **_1x7), Conv(192, **_7x1))),
        ("branch7x7dbl", (Conv(c7, 1), Conv(c7, **_7x1), Conv(c7, **_1x7), Conv(c7, **_7x1), Conv(192, **_1x7))),
        ("branch_pool", (AVG, Conv(192, 1))),
    )


# Grid reductions (figure 10): strided convolutions beside a strided max pool, 35 -> 17 and 17 -> 8.
REDUCTION_B: tuple[Branch, ...] = (
    ("branch3x3", (Conv(384, 3, 2),)),
    ("branch3x3dbl", (Conv(64, 1), Conv(96, 3, pad=1), Conv(96, 3, 2))),
    ("branch_pool", (MAX,)),
)
REDUCTION_D: tuple[Branch, ...] = (
    ("branch3x3", (Conv(192, 1), Conv(320, 3, 2))),
    ("branch7x7x3", (Conv(192, 1), Conv(192, **_1x7), Conv(192, **_7x1), Conv(192, 3, 2))),
    ("branch_pool", (MAX,)),
)
# 8x8 grid (figure 7): expanded filter banks.
MODULE_E: tuple[Branch, ...] = (
    ("branch1x1", (Conv(320, 1),)),
    ("branch3x3", (Conv(384, 1), _EXPANDED)),
    ("branch3x3dbl", (Conv(448, 1), Conv(384, 3, pad=1), _EXPANDED)),
    ("branch_pool", (AVG, Conv(192, 1))),
)

# Table 1 of the paper, with torchvision's names (299x299 input: 149, 147, 147, 73, 73, 71, 35 pixels).
STEM: tuple[tuple[str, Step], ...] = (
    ("Conv2d_1a_3x3", Conv(32, 3, 2)),
    ("Conv2d_2a_3x3", Conv(32, 3)),
    ("Conv2d_2b_3x3", Conv(64, 3, pad=1)),
    ("maxpool1", MAX),
    ("Conv2d_3b_1x1", Conv(80, 1)),
    ("Conv2d_4a_3x3", Conv(192, 3)),
    ("maxpool2", MAX),
)
# 35x35x288 after the 5s, 17x17x768 after the 6s (the auxiliary head reads Mixed_6e), 8x8x2048 after the 7s.
MIXED: tuple[tuple[str, tuple[Branch, ...]], ...] = (
    ("Mixed_5b", module_a(32)),
    ("Mixed_5c", module_a(64)),
    ("Mixed_5d", module_a(64)),
    ("Mixed_6a", REDUCTION_B),
    ("Mixed_6b", module_c(128)),
    ("Mixed_6c", module_c(160)),
    ("Mixed_6d", module_c(160)),
    ("Mixed_6e", module_c(192)),
    ("Mixed_7a", REDUCTION_D),
    ("Mixed_7b", MODULE_E),
    ("Mixed_7c", MODULE_E),
)
AUX_AFTER = "Mixed_6e"
# The feature points (timm's) and their reductions: the last unit or module before each halving of the grid.
FEATURES = {"Conv2d_2b_3x3": 2, "Conv2d_4a_3x3": 4, "Mixed_5d": 8, "Mixed_6e": 16, "Mixed_7c": 32}
# The auxiliary head pools 5x5 windows with stride 3 and then applies a 5x5 convolution without padding: it
# needs maps of at least 3 * (5 - 1) + 5 = 17 pixels, which Mixed_6e gives from a 299x299 input up.
AUX_MIN_MAP = 17
AUX_MIN_INPUT = 299


def _pool(kind: str, max_pool: ModuleDef, name: str) -> nn.Module:
    if kind == AVG:
        return AvgPool(3, 1, padding=1, name=name)
    return max_pool(3, 2, name=name)


class InceptionBlock(nn.Module):
    """Branches side by side on the same input, concatenated on channels in table order.

    Module names follow torchvision: the convolutions of a branch are numbered from 1 (``branch5x5_1``,
    ``branch5x5_2``), the halves of a `Pair` take the letters a and b (``branch3x3_2a``), and a branch with
    a single convolution goes by the branch's name (``branch1x1``, ``branch_pool``). Pools have no weights
    and carry the branch's name with their step number.
    """

    branches: Sequence[Branch]
    unit: ModuleDef
    max_pool: ModuleDef

    @nn.compact
    def __call__(self, x):
        outputs = []
        for branch, steps in self.branches:
            numbered = sum(not isinstance(step, str) for step in steps) > 1
            y, index = x, 0
            for step in steps:
                if isinstance(step, str):
                    y = _pool(step, self.max_pool, f"{branch}_pool{index}")(y)
                    continue
                index += 1
                name = f"{branch}_{index}" if numbered else branch
                if isinstance(step, Pair):
                    y = jnp.concatenate([self.unit(*step.first, name=f"{name}a")(y),
                                         self.unit(*step.second, name=f"{name}b")(y)], axis=-1)
                else:
                    y = self.unit(*step, name=name)(y)
            outputs.append(y)
        return jnp.concatenate(outputs, axis=-1)


class AuxHead(nn.Module):
    """The auxiliary classifier on Mixed_6e (figure 8 of the paper): 5x5/3 average pool, 128@1x1, 768@5x5,
    global average, dense; BatchNorm after both convolutions (the paper's "BN-auxiliary", section 7)."""

    num_classes: int
    unit: ModuleDef
    conv: ModuleDef
    dense: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool):
        if min(x.shape[1:3]) < AUX_MIN_MAP:
            if not self.is_initializing():
                raise ValueError(
                    f"Inception v3's auxiliary classifier needs Mixed_6e maps of at least {AUX_MIN_MAP}x{AUX_MIN_MAP}, "
                    f"an input of at least {AUX_MIN_INPUT}x{AUX_MIN_INPUT} pixels, to train; it got "
                    f"{x.shape[1]}x{x.shape[2]} maps. Build the model with aux_logits=False for smaller images."
                )
            # Its weights do not depend on the input size: on a smaller input, make them on zero maps of the
            # smallest size it takes, so that the variables are the same at every size (and evaluation,
            # which does not run the head, works down to the network's true minimum).
            x = jnp.zeros((x.shape[0], AUX_MIN_MAP, AUX_MIN_MAP, x.shape[-1]), x.dtype)
        x = AvgPool(5, 3, name="pool")(x)
        x = self.unit(128, 1, name="conv0")(x)
        # torchvision initialises this convolution and the dense layer with smaller spreads (std 0.01, 0.001).
        x = self.unit(768, 5, conv=partial(self.conv, kernel_init=nn.initializers.normal(0.01)), name="conv1")(x)
        x = GlobalAvgPool(name="avgpool")(x)
        logits = self.dense(self.num_classes, kernel_init=nn.initializers.normal(0.001), name="fc")(x)
        # Only a training apply records them: `init` then returns no "aux_logits" collection.
        if train and not self.is_initializing():
            sow_latest(self, logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))


class InceptionV3(nn.Module):
    """Inception v3: a stem of plain convolutions (`STEM`), eleven Inception modules on 35x35, 17x17 and 8x8
    grids with two grid reductions (`MIXED`), global average pooling, dropout and one dense layer; during
    training an auxiliary classifier on the 17x17 maps.

    The layout is torchvision's ``inception_v3``, itself a port of Google's TensorFlow model, which departs
    from the paper's figures in places: the 35x35 modules keep a 5x5 branch (`module_a`); the first 35x35
    module has 32 pool-projection channels and the others 64; the 8x8 modules also expand their double-3x3
    branch. BatchNorm follows every convolution (epsilon 1e-3, as in the TensorFlow model), convolutions
    have no bias. The paper's label-smoothing regularisation (section 7) belongs to the loss, not to the
    model (``python -m train --label-smoothing 0.1``).

    Input is 299x299 (the paper's and the pretrained weights' size), but evaluation works from 75x75 up
    (`flaxnets.min_input_size`), as torchvision's; training with the auxiliary head needs 299x299 or more,
    since the head's 5x5 convolution must fit (``aux_logits=False`` trains at any size from 75). With
    ``train=True`` the auxiliary logits are sown into the ``"aux_logits"`` collection, as GoogLeNet's are
    (`flaxnets.models.googlenet.collect_aux_logits` reads them); ``init`` returns only ``params`` and
    ``batch_stats``, the same at every input size. ``transform_input`` re-maps ImageNet-normalised input to
    the (x - 0.5) / 0.5 range of torchvision's pretrained weights. With ``num_classes=0`` there is no head
    at all and the model returns the 2048 pooled features (after the dropout).

    Initialisation is torchvision's: every convolution and dense layer from N(0, 0.1^2) (its truncation at
    +-2 lies 20 standard deviations out), the auxiliary head's 5x5 convolution and dense layer from
    N(0, 0.01^2) and N(0, 0.001^2); dense biases start at zero, where PyTorch's default draws them uniformly.

    Feature points (`flaxnets.features`), timm's: ``Conv2d_2b_3x3``, ``Conv2d_4a_3x3``, ``Mixed_5d``,
    ``Mixed_6e`` and ``Mixed_7c``. ``remat=True`` recomputes each Inception module's activations in the
    backward pass instead of storing them.
    """

    num_classes: int = 1000
    aux_logits: bool = True
    dropout: float = 0.5
    transform_input: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: Mixed_7c's output channels."""
        return 2048

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.transform_input:
            x = imagenet_to_half_range(x)
        init = nn.initializers.normal(0.1)
        conv = partial(self.ops.conv, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-3,
                       dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.bn_axis_name)
        dense = partial(self.ops.dense, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
        unit = partial(ConvUnit, conv=conv, norm=norm)
        # The head is built at initialisation (so the parameters never depend on the mode) and runs when training.
        with_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())

        block = nn.remat(InceptionBlock) if self.remat else InceptionBlock
        for name, step in STEM:
            x = _pool(step, self.ops.max_pool, name)(x) if isinstance(step, str) else unit(*step, name=name)(x)
            if name in FEATURES:
                x = tap(self, x, name, reduction=FEATURES[name])
        for name, branches in MIXED:
            x = block(branches, unit, self.ops.max_pool, name=name)(x)
            if name in FEATURES:
                x = tap(self, x, name, reduction=FEATURES[name])
            if name == AUX_AFTER and with_aux:
                AuxHead(self.num_classes, unit, conv, dense, name="AuxLogits")(x, train)
        x = GlobalAvgPool(name="avgpool")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        if self.num_classes:
            x = dense(self.num_classes, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


# The modules carry torchvision's names. Its pretrained weights were trained with transform_input on
# (torchvision's inception_v3() sets it whenever weights are given).
TORCH_LAYOUT = TorchLayout(heads=(("fc",), ("AuxLogits", "fc")), module_name=joined, aux_heads=("AuxLogits",),
                           pretrained_overrides={"transform_input": True})

register(
    ModelSpec(
        name="inception_v3",
        build=InceptionV3,
        family="inception",
        torch_layout=TORCH_LAYOUT,
        paper="Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016 "
              "(arXiv:1512.00567)",
        input_size=299,
        torchvision="inception_v3",
        params=27_161_264,
        gflops=5.713,
        top1=77.294,
        description="torchvision's Inception v3 (BatchNorm, factorised 7x7), auxiliary head; 299x299",
        # The weight of Google's training script for this network (TF-slim's train_image_classifier.py).
        aux_loss_weight=0.4,
        min_input_size=75,
        min_train_input_size=299,
        default_params=27_161_264,
    )
)
