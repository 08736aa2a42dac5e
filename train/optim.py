"""Optimizers and learning-rate schedules, all Optax, built from the config in units of steps.

Weight decay is the optimizer's own: added to the gradient before momentum for SGD and Adam (PyTorch's
``weight_decay``), decoupled for AdamW (Loshchilov and Hutter 2019). It applies to kernels only: biases
and BatchNorm scales and offsets (1-D parameters) are not decayed, as in Goyal et al. 2017, section 5.1
(`flaxnets.training.decay_mask`), unless ``decay_norm_and_bias`` asks for every parameter to be.
"""

from __future__ import annotations

import optax

from flaxnets.training import decay_mask
from train.config import Config

__all__ = ["make_schedule", "make_optimizer", "decay_mask", "after_fence"]


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: linear warm-up from 0 over `Config.warmup_epochs_used`, then the chosen schedule."""
    total, warmup = config.total_steps(steps_per_epoch), config.warmup_steps(steps_per_epoch)
    peak = config.lr
    if config.schedule == "onecycle":
        # Smith and Topin 2019: warm up to the peak, then anneal far below the start.
        return optax.cosine_onecycle_schedule(total, peak, pct_start=max(warmup, 1) / total)
    rest = max(total - warmup, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, rest)
    else:  # step: epochs count from the run's start; decays at one epoch compound, as in PyTorch's MultiStepLR
        boundaries: dict[int, float] = {}
        for epoch in config.lr_decay_epochs:
            at = max(epoch * steps_per_epoch - warmup, 0)  # Config refuses a decay before the warm-up's end
            boundaries[at] = boundaries.get(at, 1.0) * config.lr_decay_factor
        main = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(config: Config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer (with clipping and weight decay) and its schedule, for `Config.optimizer`."""
    schedule = make_schedule(config, steps_per_epoch)
    parts = []
    if config.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
    wd = config.weight_decay
    mask = None if config.decay_norm_and_bias else decay_mask
    if config.optimizer in ("sgd", "nesterov"):
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.optimizer == "nesterov"))
    elif config.optimizer == "adam":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=mask))
        parts.append(optax.adam(schedule))
    else:  # adamw
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=mask))
    return optax.chain(*parts), schedule


def after_fence(fence: optax.GradientTransformation, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` applied to the gradients after the stateless ``fence`` (`flaxnets.cpu.tie_gradients`).

    Unlike ``optax.chain(fence, tx)`` the state is ``tx``'s alone, so a checkpoint has the same structure
    whether or not the run used the fence: a CPU run resumes on a GPU and the other way round.
    """
    def update(updates, state, params=None):
        updates, _ = fence.update(updates, fence.init(params), params)
        return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)
