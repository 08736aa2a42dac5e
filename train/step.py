"""The per-device training and evaluation steps: pure functions, the same under shard_map, pmap and jit.

``train_step(state, batch, *, model, tx, ...) -> (state, metrics)`` runs on one device's slice of the global
batch; `bind` fixes the keywords once per run, and the step's random key is ``state.rng``.
With ``axis_name`` set it averages gradients over the device axis (`lax.pmean`) and the model's
BatchNorm layers average their statistics over it (the model is built with ``bn_axis_name``), so the
update equals the one a single device would make on the whole global batch.

Augmentation happens here, on the device: images arrive as uint8 and are cropped, flipped, resized and
normalised inside the compiled step. The random numbers of each example come from the step's key folded
with the example's index in the dataset, so they do not depend on how the batch is split over devices.
TrivialAugment Wide or RandAugment (`flaxnets.autoaugment`) and random erasing (`flaxnets.augment`) run
here too, on every training image; mixup and cutmix (`Mixing`) mix each device's share of the batch, and
the moving average of the weights (`EmaTrainState`) follows every step.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from flaxnets import augment, autoaugment
from flaxnets.training import ema_update

__all__ = ["TrainState", "EmaTrainState", "with_ema", "Preprocess", "Mixing", "train_step", "eval_step",
           "cross_entropy"]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree that Orbax saves and restores whole."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # base key; step k uses fold_in(rng, k)


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A `TrainState` with an exponential moving average of the weights beside them (``--ema-decay``):
    ``ema`` holds ``params`` and ``batch_stats`` (`flaxnets.training.ema_update`). A class of its own, so that
    the checkpoints of runs without it keep the structure they always had."""

    ema: Any

    def averaged(self) -> "EmaTrainState":
        """The state with the averaged weights in place of the trained ones, for evaluation."""
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


def with_ema(state: TrainState) -> EmaTrainState:
    """``state`` with a moving average that starts at its weights."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    return EmaTrainState(**fields, ema={"params": state.params, "batch_stats": state.batch_stats})


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """uint8 images to model input: augmentation (train only), resize, normalisation, dtype.

    ``crop_padding`` pads with black pixels and crops back at a random offset (the CIFAR recipe of He et
    al. 2016, section 4.2); ``flip`` mirrors half of the images left-right. ``lighting`` is the standard
    deviation of AlexNet's PCA colour noise (Krizhevsky et al. 2012, section 4.1; 0.1 in the paper): each
    training image gets ``eigvec @ (alpha * eigval)`` added to every pixel, ``alpha ~ N(0, lighting)`` per
    image and component, with the eigen-decomposition of the training pixels' covariance at [0, 1] scale.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int  # output side
    augment: bool = True
    crop_padding: int = 0
    flip: bool = False
    dtype: Any = jnp.float32
    lighting: float = 0.0
    eigval: tuple[float, ...] = ()
    eigvec: tuple[tuple[float, ...], ...] = ()
    auto_augment: str | None = None  # "ta_wide" (TrivialAugment Wide) or "ra" (RandAugment)
    ra_num_ops: int = 2
    ra_magnitude: int = 9
    random_erase: float = 0.0  # probability of erasing a rectangle of each normalised image

    def __call__(self, images: jnp.ndarray, keys: jnp.ndarray | None, *, train: bool) -> jnp.ndarray:
        training = train and keys is not None
        if training and self.auto_augment:
            # On the uint8 images, before the crop and flip (for streamed data, after the host's): the order
            # changes where black borders fall, not the distribution of the operations.
            images = jax.vmap(self._policy)(images, keys)
        x = images.astype(jnp.float32) / 255.0
        if training and self.augment:
            x = jax.vmap(self._augment_one)(x, keys)
        n, h, w, c = x.shape
        if (h, w) != (self.size, self.size):
            x = jax.image.resize(x, (n, self.size, self.size, c), "bilinear", antialias=False)
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        if training and self.random_erase:  # after normalisation, as torchvision's recipe: 0 is the mean pixel
            x = jax.vmap(lambda image, key: augment.random_erasing(image, jax.random.fold_in(key, 4),
                                                                   self.random_erase))(x, keys)
        return x.astype(self.dtype)

    def _policy(self, image: jnp.ndarray, key: jnp.ndarray) -> jnp.ndarray:
        key = jax.random.fold_in(key, 3)
        if self.auto_augment == "ta_wide":
            return autoaugment.trivial_augment_wide(image, key)
        return autoaugment.rand_augment(image, key, self.ra_num_ops, self.ra_magnitude)

    def _augment_one(self, image: jnp.ndarray, key: jnp.ndarray) -> jnp.ndarray:
        crop_key, flip_key = jax.random.split(key)
        if self.lighting and self.eigval:
            image = image + self.colour_noise(jax.random.fold_in(key, 2))
        if self.crop_padding:
            p = self.crop_padding
            h, w, c = image.shape
            padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
            dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
            image = lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        if self.flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image


    def colour_noise(self, key: jnp.ndarray) -> jnp.ndarray:
        """One image's PCA colour offset, a vector of one value per channel."""
        alpha = self.lighting * jax.random.normal(key, (len(self.eigval),))
        return jnp.asarray(self.eigvec, jnp.float32) @ (alpha * jnp.asarray(self.eigval, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup and cutmix of each device's share of the batch, after preprocessing (`flaxnets.augment.mix`,
    timm's ``Mixup``). The partner of an example is the one at the mirrored position of the same device's
    share, as timm's is in each process's batch; in ``"batch"`` mode every device draws the same lambda."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"

    def __call__(self, images: jnp.ndarray, targets: jnp.ndarray, key: jnp.ndarray):
        return augment.mix(images, targets, key, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                           prob=self.prob, switch_prob=self.switch_prob, mode=self.mode)


def smoothed_targets(labels: jnp.ndarray, num_classes: int, smoothing: float = 0.0) -> jnp.ndarray:
    """One-hot labels smoothed as in Szegedy et al. 2016 (section 7)."""
    targets = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(targets, smoothing) if smoothing else targets


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, num_classes: int, smoothing: float = 0.0) -> jnp.ndarray:
    """Per-example cross-entropy against one-hot labels smoothed as in Szegedy et al. 2016 (section 7)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), smoothed_targets(labels, num_classes, smoothing))


def _example_keys(rng: jnp.ndarray, step: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
    step_key = jax.random.fold_in(rng, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(indices)


def train_step(
    state: TrainState,
    batch: dict[str, jnp.ndarray],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    preprocess: Preprocess,
    num_classes: int,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.0,
    mixing: Mixing | None = None,
    ema_decay: float = 0.0,
    ema_start_step: int = 0,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimisation step on this device's ``batch`` (``image`` uint8, ``label``, ``index`` in the dataset).

    Returns the new state and metric sums over the global batch (``loss_sum``, ``correct``, ``count``),
    so they can be added across steps and divided once. With `mixing` the loss is against the mixed
    targets and ``correct`` counts predictions of each example's own label. With ``ema_decay`` the state is
    an `EmaTrainState` whose average takes in the new weights (reset to them before ``ema_start_step``).
    """
    keys = _example_keys(state.rng, state.step, batch["index"])
    images = preprocess(batch["image"], keys, train=True)
    step_key = jax.random.fold_in(state.rng, state.step)
    dropout_key = jax.random.fold_in(step_key, 1 << 30)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
    targets = smoothed_targets(batch["label"], num_classes, label_smoothing)
    if mixing is not None:
        images, targets = mixing(images, targets, jax.random.fold_in(step_key, (1 << 30) + 1))

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats", "aux_logits"],
                                      rngs={"dropout": dropout_key})
        losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
        loss = losses.mean()
        for head in jax.tree_util.tree_leaves(mutated.get("aux_logits", {})):
            loss = loss + aux_loss_weight * optax.softmax_cross_entropy(head.astype(jnp.float32), targets).mean()
        return loss, (logits, losses, mutated.get("batch_stats", state.batch_stats))

    grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss_sum": losses.sum(),
        "correct": (logits.argmax(-1) == batch["label"]).sum(),
        "count": jnp.asarray(losses.shape[0]),
    }
    if axis_name is not None:
        metrics = {k: lax.psum(v, axis_name) for k, v in metrics.items()}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if ema_decay:
        new_state = new_state.replace(ema=ema_update(state.ema, {"params": params, "batch_stats": batch_stats},
                                                     ema_decay, state.step, ema_start_step))
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jnp.ndarray],
    *,
    model: nn.Module,
    preprocess: Preprocess,
    num_classes: int,
    flip: bool = False,
    axis_name: str | None = None,
) -> dict[str, jnp.ndarray]:
    """Metric sums on this device's ``batch``; examples with ``mask == 0`` (padding) count for nothing.

    Images of shape ``(N, K, H, W, C)`` are K views of each example (ten-crop evaluation): the prediction
    is the mean of their softmax outputs, and the loss that of the mean. ``flip`` makes two views of
    ``(N, H, W, C)`` images, each image and its mirror (left to right), and adds ``correct_one_view``, the
    top-1 count of the images alone, so that what the mirrors add can be read off.
    """
    images = batch["image"]
    if flip:
        if images.ndim != 4:
            raise ValueError(f"flip makes two views of (N, H, W, C) images; got shape {images.shape}")
        images = jnp.stack([images, images[:, :, ::-1]], axis=1)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    one_view = None
    if images.ndim == 5:
        n, views = images.shape[:2]
        logits = model.apply(variables, preprocess(images.reshape((n * views,) + images.shape[2:]), None, train=False),
                             train=False).reshape(n, views, -1)
        one_view = logits[:, 0]
        probabilities = jax.nn.softmax(logits.astype(jnp.float32)).mean(axis=1)
        logits = jnp.log(jnp.maximum(probabilities, 1e-30))
    else:
        logits = model.apply(variables, preprocess(images, None, train=False), train=False)
    mask = batch["mask"].astype(jnp.float32)
    losses = cross_entropy(logits, batch["label"], num_classes)
    top5 = lax.top_k(logits, min(5, num_classes))[1]
    metrics = {
        "loss_sum": (losses * mask).sum(),
        "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
        "correct5": ((top5 == batch["label"][:, None]).any(-1) * mask).sum(),
        "count": mask.sum(),
    }
    if flip:
        metrics["correct_one_view"] = ((one_view.argmax(-1) == batch["label"]) * mask).sum()
    if axis_name is not None:
        metrics = lax.psum(metrics, axis_name)
    return metrics


def bind(step: Callable, **kwargs) -> Callable:
    """The step with its static configuration fixed, leaving ``(state, batch)``."""
    return partial(step, **kwargs)
