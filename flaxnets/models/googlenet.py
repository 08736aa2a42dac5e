"""GoogLeNet (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv:1409.4842) in two forms:
torchvision's (with BatchNorm) and the paper's (with Local Response Normalization and true 5x5 branches).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Literal, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from flaxnets.features import tap
from flaxnets.input_size import checks_input_size
from flaxnets.layers import (PLAIN, AdaptiveAvgPool, AvgPool, BatchNorm, GlobalAvgPool, LocalResponseNorm, Ops,
                             padding)
from flaxnets.registry import ModelSpec, register
from flaxnets.torch_layout import TorchLayout, dotted

__all__ = ["GoogLeNet", "Inception", "InceptionConfig", "INCEPTIONS", "ConvUnit", "collect_aux_logits",
           "imagenet_to_half_range", "sow_latest"]

ModuleDef = Callable[..., nn.Module]

# Section 5: "the losses of the auxiliary classifiers were weighted by 0.3" (the specs' aux_loss_weight).
_AUX_LOSS_WEIGHT = 0.3


class InceptionConfig(NamedTuple):
    """Filters of one Inception module's four branches (the columns of Table 1 of the paper)."""

    c1: int  # 1x1 branch
    c3_reduce: int  # 1x1 before the 3x3
    c3: int
    c5_reduce: int  # 1x1 before the "5x5"
    c5: int
    pool_proj: int  # 1x1 after the 3x3 max-pool


INCEPTIONS: dict[str, InceptionConfig] = {
    "3a": InceptionConfig(c1=64, c3_reduce=96, c3=128, c5_reduce=16, c5=32, pool_proj=32),
    "3b": InceptionConfig(c1=128, c3_reduce=128, c3=192, c5_reduce=32, c5=96, pool_proj=64),
    "4a": InceptionConfig(c1=192, c3_reduce=96, c3=208, c5_reduce=16, c5=48, pool_proj=64),
    "4b": InceptionConfig(c1=160, c3_reduce=112, c3=224, c5_reduce=24, c5=64, pool_proj=64),
    "4c": InceptionConfig(c1=128, c3_reduce=128, c3=256, c5_reduce=24, c5=64, pool_proj=64),
    "4d": InceptionConfig(c1=112, c3_reduce=144, c3=288, c5_reduce=32, c5=64, pool_proj=64),
    "4e": InceptionConfig(c1=256, c3_reduce=160, c3=320, c5_reduce=32, c5=128, pool_proj=128),
    "5a": InceptionConfig(c1=256, c3_reduce=160, c3=320, c5_reduce=32, c5=128, pool_proj=128),
    "5b": InceptionConfig(c1=384, c3_reduce=192, c3=384, c5_reduce=48, c5=128, pool_proj=128),
}

# torchvision initialises GoogLeNet's convolutions and dense layers with trunc_normal_(std=0.01, a=-2,
# b=2): the bounds are absolute, 200 standard deviations out, so the draw is N(0, 0.01^2). Flax's
# truncated_normal would cut at 2 standard deviations instead (and costs an erf per layer at init).
_init = nn.initializers.normal(0.01)


class ConvUnit(nn.Module):
    """Convolution, optional BatchNorm (then the convolution has no bias), ReLU: torchvision's BasicConv2d.

    ``kernel`` and ``pad`` are one number for a square kernel and symmetric padding, or (height, width)
    pairs (Inception v3's 1x7 and 7x1 kernels). ``conv`` carries the initialiser.
    """

    features: int
    kernel: int | tuple[int, int]
    strides: int = 1
    pad: int | tuple[int, int] = 0
    conv: ModuleDef = nn.Conv
    norm: ModuleDef | None = None

    @nn.compact
    def __call__(self, x):
        kernel = (self.kernel, self.kernel) if isinstance(self.kernel, int) else tuple(self.kernel)
        x = self.conv(self.features, kernel, self.strides, padding=padding(self.pad), use_bias=self.norm is None,
                      name="conv")(x)
        if self.norm is not None:
            x = self.norm(name="bn")(x)
        return nn.relu(x)


def imagenet_to_half_range(x: jnp.ndarray) -> jnp.ndarray:
    """Images normalised with ImageNet's channel mean and std, re-normalised to ``(x - 0.5) / 0.5``.

    The weights torchvision ported from Google's TensorFlow models (GoogLeNet, Inception v3) expect that
    range; their ``transform_input=True`` applies this map so that the usual ImageNet preprocessing serves.
    A grey image is spread to three channels by it (torchvision's map takes RGB only); other channel counts
    have no ImageNet constants and are refused.
    """
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"transform_input re-maps RGB images (a grey one is spread to three channels); these "
                         f"have {x.shape[-1]} channels: build the model with transform_input=False.")
    mean, std = jnp.array([0.485, 0.456, 0.406]), jnp.array([0.229, 0.224, 0.225])
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 then 3x3; 1x1 then a wide kernel; 3x3
    max-pool (stride 1) then 1x1 (figure 2b of the paper)."""

    config: InceptionConfig
    unit: ModuleDef
    pool: ModuleDef
    wide_kernel: int = 5

    @nn.compact
    def __call__(self, x):
        c = self.config
        b1 = self.unit(c.c1, 1, name="branch1")(x)
        b2 = self.unit(c.c3, 3, pad=1, name="branch2_1")(self.unit(c.c3_reduce, 1, name="branch2_0")(x))
        b3 = self.unit(c.c5_reduce, 1, name="branch3_0")(x)
        b3 = self.unit(c.c5, self.wide_kernel, pad=self.wide_kernel // 2, name="branch3_1")(b3)
        b4 = self.pool(3, 1, padding=1, ceil_mode=True, name="branch4_0")(x)
        b4 = self.unit(c.pool_proj, 1, name="branch4_1")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxClassifier(nn.Module):
    """Auxiliary head on 4a and 4d: pool to 4x4, 128@1x1, dense 1024 with ReLU, dropout 0.7, classes."""

    num_classes: int
    unit: ModuleDef
    dense: ModuleDef
    pool: Literal["adaptive", "paper"]
    dropout: float

    @nn.compact
    def __call__(self, x, train: bool):
        if self.pool == "paper":
            x = AvgPool(5, 3, name="pool")(x)  # 14x14 -> 4x4 at 224x224 input
        else:
            x = AdaptiveAvgPool(4, name="pool")(x)
        x = self.unit(128, 1, name="conv")(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.dense(1024, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        logits = self.dense(self.num_classes, name="fc2")(x)
        # Only a training apply records them: `init` then returns no "aux_logits" collection.
        if train and not self.is_initializing():
            sow_latest(self, logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))


def sow_latest(module: nn.Module, logits: jnp.ndarray) -> None:
    """Sow ``logits`` into ``"aux_logits"`` as a one-element tuple that replaces what an earlier apply left
    there, so that the collection never grows: variables fed back from one training step to the next
    (flax's own default would append, and NNX state would change shape, and recompile, every step)."""
    module.sow("aux_logits", "logits", logits, reduce_fn=lambda _, latest: (latest,))


class GoogLeNet(nn.Module):
    """GoogLeNet: a 7x7/2 stem, nine Inception modules (Table 1 of the paper, `INCEPTIONS`), global average
    pooling, dropout and one dense layer; two auxiliary classifiers on 4a and 4d during training.

    The defaults are torchvision's ``googlenet``, which departs from the paper: BatchNorm (epsilon 1e-3)
    after every convolution and no LRN; the "5x5" branch uses a 3x3 kernel (``wide_kernel=3``, a known
    torchvision bug kept for weight compatibility, pytorch/vision issue 906); auxiliary heads pool
    adaptively to 4x4; dropout 0.2. `googlenet_paper` sets ``batch_norm=False, lrn=True, wide_kernel=5,
    aux_pool="paper", dropout=0.4``: the published network (LRN constants from the reference Caffe model,
    size 5, alpha 1e-4 divided by the size, beta 0.75, k 1, since the paper gives none).

    The auxiliary logits are not returned: with ``train=True`` they are sown into the ``"aux_logits"``
    collection (apply with ``mutable=["aux_logits", ...]`` and read them with `collect_aux_logits`; the
    paper weights their losses by 0.3, the registry's ``aux_loss_weight``). Their parameters exist whenever ``aux_logits`` is
    set, so a checkpoint does not depend on the mode it was initialised in, and ``init`` returns only
    ``params`` and ``batch_stats``. With ``num_classes=0`` there are no auxiliary heads and the model
    returns the 1024 pooled features (after the dropout). ``transform_input`` re-maps ImageNet-normalised
    input to the (x - 0.5) / 0.5 normalisation torchvision's pretrained weights expect.

    Feature points (`flaxnets.features`): the stem's maps entering ``maxpool1`` and ``maxpool2``
    (``conv1``, ``conv3``), and ``inception3b``, ``inception4e`` and ``inception5b``. ``remat=True``
    recomputes each Inception module's activations in the backward pass instead of storing them.
    """

    num_classes: int = 1000
    aux_logits: bool = True
    batch_norm: bool = True
    lrn: bool = False
    wide_kernel: int = 3
    aux_pool: Literal["adaptive", "paper"] = "adaptive"
    dropout: float = 0.2
    aux_dropout: float = 0.7
    transform_input: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = False
    ops: Ops = PLAIN

    @property
    def num_features(self) -> int:
        """Width of the features returned with ``num_classes=0``: inception5b's output channels."""
        c = INCEPTIONS["5b"]
        return c.c1 + c.c3 + c.c5 + c.pool_proj

    @nn.compact
    @checks_input_size
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.transform_input:
            x = imagenet_to_half_range(x)
        norm = None
        if self.batch_norm:
            norm = partial(BatchNorm, use_running_average=not train, epsilon=1e-3, dtype=self.dtype,
                           param_dtype=self.param_dtype, axis_name=self.bn_axis_name)
        conv = partial(self.ops.conv, kernel_init=_init, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = partial(self.ops.dense, kernel_init=_init, dtype=self.dtype, param_dtype=self.param_dtype)
        pool = self.ops.max_pool
        unit = partial(ConvUnit, conv=conv, norm=norm)
        lrn = partial(LocalResponseNorm, size=5, alpha=1e-4, beta=0.75, k=1.0, convention="torch")
        inception = partial(nn.remat(Inception) if self.remat else Inception, unit=unit, pool=pool,
                            wide_kernel=self.wide_kernel)
        aux = partial(AuxClassifier, self.num_classes, unit, dense, self.aux_pool, self.aux_dropout)
        # Heads are built at initialisation (so the parameters never depend on the mode) and run when training.
        with_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())

        x = unit(64, 7, 2, 3, name="conv1")(x)
        x = pool(3, 2, ceil_mode=True, name="maxpool1")(tap(self, x, "conv1", reduction=2))
        if self.lrn:
            x = lrn(name="lrn1")(x)
        x = unit(64, 1, name="conv2")(x)
        x = unit(192, 3, pad=1, name="conv3")(x)
        if self.lrn:
            x = lrn(name="lrn2")(x)
        x = pool(3, 2, ceil_mode=True, name="maxpool2")(tap(self, x, "conv3", reduction=4))
        x = inception(INCEPTIONS["3a"], name="inception3a")(x)
        x = inception(INCEPTIONS["3b"], name="inception3b")(x)
        x = pool(3, 2, ceil_mode=True, name="maxpool3")(tap(self, x, "inception3b", reduction=8))
        for stage in ("4a", "4b", "4c", "4d", "4e"):
            x = inception(INCEPTIONS[stage], name=f"inception{stage}")(x)
            head = {"4a": "aux1", "4d": "aux2"}.get(stage)
            if head and with_aux:
                aux(name=head)(x, train)
        x = pool(2, 2, ceil_mode=True, name="maxpool4")(tap(self, x, "inception4e", reduction=16))
        x = inception(INCEPTIONS["5a"], name="inception5a")(x)
        x = tap(self, inception(INCEPTIONS["5b"], name="inception5b")(x), "inception5b", reduction=32)
        # The paper's 7x7/1 average pool equals a global one at 224x224 and generalises to other sizes.
        x = GlobalAvgPool(name="avgpool")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        if self.num_classes:
            x = dense(self.num_classes, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def collect_aux_logits(mutated: dict) -> list[jnp.ndarray]:
    """The auxiliary logits sown during a ``train=True`` apply, in network order (aux1, aux2).

    ``mutated`` is the second value of ``model.apply(..., mutable=[..., "aux_logits"])``; models without
    auxiliary heads give an empty list.
    """
    heads = mutated.get("aux_logits", {})
    return [heads[name]["logits"][-1] for name in sorted(heads)]


# torchvision flattens each auxiliary head's (C, 4, 4) maps into its fc1. Its published checkpoint lacks the
# auxiliary heads ("the auxiliary heads in the pretrained googlenet model are NOT pretrained", its builder
# warns), so they may be initialised afresh.
TORCH_LAYOUT = TorchLayout(
    heads=(("fc",), ("aux1", "fc2"), ("aux2", "fc2")),
    module_name=dotted,
    flattened={("aux1", "fc1"): lambda model: (4, 4), ("aux2", "fc1"): lambda model: (4, 4)},
    aux_heads=("aux1", "aux2"),
    untrained=(("aux1",), ("aux2",)),
)

_PAPER = "Szegedy et al., Going Deeper with Convolutions, CVPR 2015 (arXiv:1409.4842)"
register(
    ModelSpec(
        name="googlenet",
        build=GoogLeNet,
        family="googlenet",
        # torchvision's googlenet() turns transform_input on whenever weights are given.
        torch_layout=dataclasses.replace(TORCH_LAYOUT, pretrained_overrides={"transform_input": True}),
        paper=_PAPER,
        input_size=224,
        torchvision="googlenet",
        params=6_624_904,
        gflops=1.498,
        top1=69.778,
        description="torchvision's GoogLeNet (BatchNorm, 3x3 in the '5x5' branch), auxiliary heads",
        reference_overrides={"aux_logits": False},
        aux_loss_weight=_AUX_LOSS_WEIGHT,
        min_input_size=15,
        default_params=13_004_888,
    )
)
register(
    ModelSpec(
        name="googlenet_paper",
        build=partial(GoogLeNet, batch_norm=False, lrn=True, wide_kernel=5, aux_pool="paper", dropout=0.4),
        family="googlenet",
        torch_layout=TORCH_LAYOUT,
        paper=_PAPER,
        input_size=224,
        description="the paper's GoogLeNet: LRN, true 5x5 branches, auxiliary heads",
        aux_loss_weight=_AUX_LOSS_WEIGHT,
        min_input_size=79,
        default_params=13_378_280,
    )
)
