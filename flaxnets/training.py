"""Training-recipe helpers that act on a model's variables: an exponential moving average of the weights,
and the mask that keeps weight decay off biases and normalisation parameters.

- `ema_update`: ``ema <- decay * ema + (1 - decay) * new`` over every leaf (parameters and BatchNorm
  statistics alike, as torchvision's ``ExponentialMovingAverage`` with ``use_buffers=True`` and timm's
  ``ModelEmaV2`` average both), with optax's ``incremental_update`` (Polyak averaging). Until
  ``start_step`` the average is the weights themselves: torchvision's reference recipe restarts it during the
  learning-rate warm-up, whose weights are not worth remembering.
- `decay_mask`: True for the leaves weight decay applies to (kernels: more than one dimension), False for
  biases and BatchNorm scales and offsets, for ``optax.add_decayed_weights(..., mask=decay_mask)`` or
  ``optax.adamw(..., mask=decay_mask)``. No decay on those is the rule of Goyal et al. 2017 (arXiv:1706.02677,
  section 5.1) and of torchvision's recipe (``--norm-weight-decay 0.0``; it decays biases).

    >>> import optax
    >>> from flaxnets.training import decay_mask, ema_update
    >>> tx = optax.chain(optax.add_decayed_weights(1e-4, mask=decay_mask), optax.sgd(0.1, momentum=0.9))
    >>> # after each step:  ema = ema_update(ema, {"params": params, "batch_stats": stats}, 0.999, step)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["ema_update", "decay_mask", "ema_decay_per_step"]


def ema_update(ema: Any, new: Any, decay: float, step: jnp.ndarray | int | None = None, start_step: int = 0) -> Any:
    """The moving average ``ema`` (a pytree like ``new``) after one more step with weights ``new``.

    With ``step`` (the number of the step that produced ``new``, counted from 0) below ``start_step``, the
    average is reset to ``new``. Integer leaves (counters) are taken from ``new`` as they are.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
    weight = 1.0 - decay
    if step is not None and start_step:
        weight = jnp.where(jnp.asarray(step) < start_step, 1.0, weight)

    def one(average, value):
        if not jnp.issubdtype(jnp.result_type(value), jnp.inexact):
            return value
        return optax.incremental_update(value, average, weight).astype(jnp.result_type(average))

    return jax.tree_util.tree_map(one, ema, new)


def ema_decay_per_step(decay: float, every_steps: int) -> float:
    """The per-step decay equal to ``decay`` applied once every ``every_steps`` steps (torchvision's recipe
    updates its average every 32 steps): ``decay ** (1 / every_steps)``."""
    return decay ** (1.0 / every_steps)


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: kernels, not biases or normalisation parameters."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) > 1, params)
