"""The networks a Flax user would write without flaxnets: the peer that `benchmarks.peers` measures flaxnets
against.

ResNet follows the shape of Flax's own ImageNet example (``examples/imagenet/models.py``): stock
`flax.linen.Conv` with ``dtype``, `flax.linen.BatchNorm` with ``dtype`` (statistics and normalisation as
Flax computes them), ``"SAME"`` padding, `flax.linen.max_pool`, a mean over the spatial axes and a `Dense`
head. VGG-16 and GoogLeNet (torchvision's layout: BatchNorm after every convolution, 3x3 where the paper has
5x5, no auxiliary heads) are written the same plain way. The train step is the one such code writes:
integer-label cross-entropy, SGD with momentum through optax, the old state donated, inputs already
normalised on the device.

These are baselines, not library models: they make no attempt at torchvision's exact padding, pooling or
parameter layout, which flaxnets' own models keep.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["PlainLeNet5", "PlainResNet", "PlainVGG", "PlainGoogLeNet", "PLAIN_MODELS", "plain_model",
           "plain_train_step"]


class PlainLeNet5(nn.Module):
    """LeNet-5 as d2l writes it (sigmoid, average pooling, the first convolution padded by 2)."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.avg_pool(nn.sigmoid(nn.Conv(6, (5, 5), padding=2, dtype=self.dtype)(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.sigmoid(nn.Conv(16, (5, 5), padding="VALID", dtype=self.dtype)(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        for width in (120, 84):
            x = nn.sigmoid(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class _Bottleneck(nn.Module):
    filters: int
    strides: int
    conv: Callable
    norm: Callable

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters * 4, (1, 1))(y))
        if x.shape != y.shape:
            x = self.norm()(self.conv(self.filters * 4, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class _Basic(nn.Module):
    filters: int
    strides: int
    conv: Callable
    norm: Callable

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(self.conv(self.filters, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class PlainResNet(nn.Module):
    """ResNet as Flax's ImageNet example writes it."""

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = nn.relu(norm()(conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for index in range(blocks):
                x = self.block(64 * 2**stage, 2 if stage and not index else 1, conv, norm)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class PlainVGG(nn.Module):
    """VGG-16 (configuration D of Simonyan and Zisserman 2015) with its dropout classifier."""

    layers: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                   512, 512, 512, "M")
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for width in self.layers:
            if width == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype)(x))
        x = x.reshape(x.shape[0], -1)
        for _ in range(2):
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(4096, dtype=self.dtype)(x)))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class _ConvBN(nn.Module):
    features: int
    kernel: int
    strides: int = 1
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (self.kernel, self.kernel), self.strides, use_bias=False, dtype=self.dtype)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not self.train, epsilon=1e-3, dtype=self.dtype)(x))


class PlainGoogLeNet(nn.Module):
    """GoogLeNet as torchvision builds it (BatchNorm, 3x3 in the "5x5" branch), without auxiliary heads."""

    # (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) of each inception block; "M" a max-pool.
    blocks: Sequence[tuple[int, ...] | str] = (
        (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
        (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
        (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M",
        (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        unit = partial(_ConvBN, train=train, dtype=self.dtype)
        pool = partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME")
        x = pool(unit(64, 7, 2)(x))
        x = pool(unit(192, 3)(unit(64, 1)(x)))
        for block in self.blocks:
            if block == "M":
                x = pool(x)
                continue
            c1, r3, c3, r5, c5, proj = block
            x = jnp.concatenate([
                unit(c1, 1)(x),
                unit(c3, 3)(unit(r3, 1)(x)),
                unit(c5, 3)(unit(r5, 1)(x)),
                unit(proj, 1)(nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")),
            ], axis=-1)
        x = nn.Dropout(0.2, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


PLAIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": PlainLeNet5,
    "resnet18": partial(PlainResNet, stage_sizes=(2, 2, 2, 2), block=_Basic),
    "resnet50": partial(PlainResNet, stage_sizes=(3, 4, 6, 3), block=_Bottleneck),
    "resnet101": partial(PlainResNet, stage_sizes=(3, 4, 23, 3), block=_Bottleneck),
    "vgg16": PlainVGG,
    "googlenet": PlainGoogLeNet,
}


def plain_model(arch: str, num_classes: int, dtype: Any) -> nn.Module:
    """The plain Flax network for ``arch`` (a key of `PLAIN_MODELS`)."""
    if arch not in PLAIN_MODELS:
        raise KeyError(f"no plain Flax baseline for {arch}; there is one for {', '.join(PLAIN_MODELS)}")
    return PLAIN_MODELS[arch](num_classes=num_classes, dtype=dtype)


def plain_train_step(model: nn.Module, tx: Any) -> Callable:
    """``(state, images, labels) -> (state, loss)`` with ``state = (params, batch_stats, opt_state, key)``,
    jitted with the state donated: the step a plain Flax training script writes."""
    import optax

    def step(state, images, labels):
        params, batch_stats, opt_state, key = state
        key, dropout = jax.random.split(key)

        def loss_fn(params):
            logits, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": dropout})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, mutated.get("batch_stats", batch_stats)

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state, key), loss

    return jax.jit(step, donate_argnums=0)
