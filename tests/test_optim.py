"""Schedules and optimizers (`train.optim`): warm-up and shapes in units of steps, weight decay on kernels only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from train import optim
from train.config import Config


def test_schedules_warm_up_then_follow_their_shape():
    config = Config(epochs=10, lr=0.4, warmup_epochs=2, schedule="cosine")
    schedule = optim.make_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(20)) == pytest.approx(0.4) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    step = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=0, schedule="step", lr_decay_epochs=(5, 8)), 10)
    assert [float(step(s)) for s in (0, 49, 50, 79, 80)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004])
    onecycle = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=3, schedule="onecycle"), 10)
    assert float(onecycle(30)) == pytest.approx(0.4, rel=1e-3) and float(onecycle(100)) < 1e-3


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
