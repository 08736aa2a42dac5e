"""Schedules and optimizers (`train.optim`): warm-up and shapes in units of steps, weight decay on kernels only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from train import optim
from train.config import Config, ConfigError


def test_schedules_warm_up_then_follow_their_shape():
    config = Config(epochs=10, lr=0.4, warmup_epochs=2, schedule="cosine")
    schedule = optim.make_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(20)) == pytest.approx(0.4) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    step = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=0, schedule="step", lr_decay_epochs=(5, 8)), 10)
    assert [float(step(s)) for s in (0, 49, 50, 79, 80)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004])
    onecycle = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=3, schedule="onecycle"), 10)
    assert float(onecycle(30)) == pytest.approx(0.4, rel=1e-3) and float(onecycle(100)) < 1e-3


def test_a_step_decay_at_the_warm_ups_end_applies_and_decays_at_one_epoch_compound():
    # Warm-up over the first epoch (10 steps), then 0.1 at once: the decay asked for at epoch 1 is not lost.
    step = optim.make_schedule(Config(epochs=3, lr=0.1, warmup_epochs=1, schedule="step", lr_decay_epochs=(1, 2)), 10)
    assert [float(step(s)) for s in (5, 10, 19, 20, 29)] == pytest.approx([0.05, 0.01, 0.01, 0.001, 0.001])
    # A warm-up clipped to half the run (2 of 4 epochs) ends where the first decay is.
    clipped = Config(epochs=4, lr=0.1, warmup_epochs=5, schedule="step", lr_decay_epochs=(2, 3)).validate()
    assert [float(optim.make_schedule(clipped, 10)(s)) for s in (20, 30)] == pytest.approx([0.01, 0.001])
    twice = optim.make_schedule(Config(epochs=4, lr=0.1, warmup_epochs=0, schedule="step", lr_decay_epochs=(2, 2)), 10)
    assert [float(twice(s)) for s in (19, 20)] == pytest.approx([0.1, 0.001])  # as PyTorch's MultiStepLR
    with pytest.raises(ConfigError, match=r"--lr-decay-epochs 1 would decay the rate within the 2-epoch warm-up"):
        Config(epochs=10, warmup_epochs=2, schedule="step", lr_decay_epochs=(1, 5)).validate()


def test_a_constant_rate_is_reached_however_long_the_warm_up_asked_for():
    config = Config(epochs=2, lr=0.05, warmup_epochs=5, schedule="constant").validate()
    assert config.warmup_epochs_used == 1
    assert float(optim.make_schedule(config, 10)(10)) == pytest.approx(0.05)


def test_weight_decay_skips_biases_and_normalisation():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    tx, _ = optim.make_optimizer(Config(optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.1, warmup_epochs=0,
                                        schedule="constant"), 1)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(updates["conv"]["kernel"].max()) == pytest.approx(-0.1)
    assert float(abs(updates["conv"]["bias"]).max()) == 0.0 and float(abs(updates["bn"]["scale"]).max()) == 0.0


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
def test_every_optimizer_reduces_a_quadratic(name):
    tx, _ = optim.make_optimizer(Config(optimizer=name, lr=0.05, warmup_epochs=0, schedule="constant",
                                        weight_decay=0.0, clip_grad_norm=1.0), 1)
    params = {"w": jnp.full((2, 2), 3.0)}
    state = tx.init(params)
    for _ in range(50):
        grads = jax.grad(lambda p: (p["w"] ** 2).sum())(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float((params["w"] ** 2).sum()) < 36.0 * 0.5


# -- data ---------------------------------------------------------------------------------------------------------
