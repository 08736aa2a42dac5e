"""The opt-in CPU speed work (`flaxnets.cpu`): which library XLA uses, the kernel set giving the plain
layers' values and gradients, and the fences being exact identities.

Tolerances: float32 results of the kernel set agree with the plain layers to 1e-5 relative (outputs)
and 1e-4 relative to the largest gradient of the tree (gradients); only the summation order differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxnets
from flaxnets.cpu import EIGEN_SETTING, YNN_OPTION, fences, kernels, ynnpack_convolutions
from flaxnets.layers import PLAIN, MaxPool, padding
from train.optim import after_fence

ROOT = Path(__file__).resolve().parent.parent
CONVOLUTIONS = ("eigen", "ynnpack")


def assert_trees_close(got, expected, rtol=1e-4):
    """Every leaf within ``rtol`` of the largest magnitude in ``expected`` (gradients that are zero in
    exact arithmetic, such as a bias before BatchNorm, are rounding noise on either side)."""
    scale = max((float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(expected) if leaf.size),
                default=0.0)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=rtol * scale)


# ------------------------------------------------------------------------------------------------------
# which library


@pytest.mark.parametrize("flags, expected", [
    ("", True),
    ("--xla_force_host_platform_device_count=8", True),
    (f"{YNN_OPTION}=", False),
    (f"{YNN_OPTION}=reduce", False),
    (f"{YNN_OPTION}=individual_dot", False),
    (f"{YNN_OPTION}=individual_dot,individual_convolution", True),
    (f"{YNN_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", True),
    (f"{YNN_OPTION}=individual_convolution {YNN_OPTION}=", False),  # the last one counts, as in XLA
])
def test_ynnpack_convolutions_reads_the_option(monkeypatch, flags, expected):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert ynnpack_convolutions() is expected


def test_prefer_eigen_sets_the_option_only_before_jax_starts():
    """In a fresh process: the CPU is known to be ahead, before JAX starts, only when no other platform
    is named; the option is added, a user's own setting is kept, and once JAX runs nothing changes (XLA
    would not read the variable again). The trainer's line says which library runs the convolutions."""
    script = """
import os
import jax, jax.numpy as jnp
from flaxnets.cpu import cpu_backend_ahead, describe, prefer_eigen
jax.config.update("jax_platforms", "cuda,cpu")
on_gpu = cpu_backend_ahead()
jax.config.update("jax_platforms", "cpu")
ahead = cpu_backend_ahead()
first = prefer_eigen()
flags = os.environ["XLA_FLAGS"]
jnp.ones(3).block_until_ready()
line = describe()
os.environ["XLA_FLAGS"] = ""
late = prefer_eigen()
print(on_gpu, ahead, first, repr(flags), late, repr(os.environ["XLA_FLAGS"]), line, sep="|")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    fields = out.stdout.strip().split("|")
    assert fields[:6] == ["False", "True", "True", f"'--xla_force_host_platform_device_count=2 {EIGEN_SETTING}'",
                          "False", "''"]
    assert fields[6].startswith("XLA's CPU backend: ") and f"with Eigen ({EIGEN_SETTING} in XLA_FLAGS)" in fields[6]
    env["XLA_FLAGS"] = f"{YNN_OPTION}=individual_convolution"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split("|")[2:4] == ["False", f"'{YNN_OPTION}=individual_convolution'"]


def test_the_kernel_set_is_decided_when_it_is_built(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", EIGEN_SETTING)
    eigen = flaxnets.cpu.ops()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert flaxnets.cpu.ops() == flaxnets.cpu.ops("ynnpack") != eigen == flaxnets.cpu.ops("eigen")
    assert eigen.conv.keywords["conv_general_dilated"].keywords["convolutions"] == "eigen"  # not re-read later
    with pytest.raises(ValueError, match="'eigen' or 'ynnpack'"):
        flaxnets.cpu.ops("onednn")


# ------------------------------------------------------------------------------------------------------
# the kernel set against the plain layers


def _layer_check(plain: nn.Module, fast: nn.Module, x: jnp.ndarray, rtol: float = 1e-5):
    variables = plain.init(jax.random.key(1), x)
    fast_variables = fast.init(jax.random.key(1), x)
    assert_trees_close(fast_variables, variables, rtol=0)  # same parameters from the same key
    got, expected = fast.apply(variables, x), plain.apply(variables, x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(expected.astype(jnp.float32)))))
    probe = jax.random.normal(jax.random.key(2), expected.shape, expected.dtype)

    def grads(layer):
        return jax.grad(lambda v, x: jnp.sum(layer.apply(v, x) * probe).astype(jnp.float32), (0, 1))(variables, x)

    assert_trees_close(grads(fast), grads(plain), rtol=1e-4 if x.dtype == jnp.float32 else 2e-2)


CONV_CASES = [
    pytest.param(dict(features=40, kernel_size=(3, 3), padding=padding(1)), (2, 9, 9, 32), id="3x3"),
    pytest.param(dict(features=36, kernel_size=(1, 1), strides=2), (2, 9, 9, 40), id="1x1-stride2"),
    pytest.param(dict(features=24, kernel_size=(3, 3), strides=2, padding="SAME", use_bias=False), (2, 10, 9, 32),
                 id="same-stride2"),
    pytest.param(dict(features=8, kernel_size=(5, 5), strides=2, padding="VALID"), (2, 11, 11, 3), id="stem"),
    pytest.param(dict(features=8, kernel_size=(3, 3), padding=1, kernel_dilation=2, feature_group_count=2),
                 (2, 9, 9, 4), id="groups-dilation"),
    pytest.param(dict(features=40, kernel_size=(3, 3), padding=padding(1), dtype=jnp.bfloat16), (2, 6, 6, 32),
                 id="bfloat16"),
]


@pytest.mark.parametrize("convolutions", CONVOLUTIONS)
@pytest.mark.parametrize("fields, shape", CONV_CASES)
def test_cpu_conv_gives_flax_conv_values_and_gradients(convolutions, fields, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    _layer_check(nn.Conv(**fields), flaxnets.cpu.ops(convolutions).conv(**fields), x,
                 rtol=1e-5 if fields.get("dtype") is None else 1e-2)


@pytest.mark.parametrize("fields", [dict(features=24), dict(features=24, use_bias=False),
                                    dict(features=24, dtype=jnp.bfloat16)], ids=["bias", "no-bias", "bfloat16"])
def test_cpu_dense_gives_flax_dense_values_and_gradients(fields):
    x = jax.random.normal(jax.random.key(0), (6, 3, 40))
    _layer_check(nn.Dense(**fields), flaxnets.cpu.ops().dense(**fields), x,
                 rtol=1e-5 if fields.get("dtype") is None else 1e-2)


def test_cpu_dot_general_passes_other_contractions_through():
    lhs, rhs = jax.random.normal(jax.random.key(0), (2, 3, 4)), jax.random.normal(jax.random.key(1), (2, 4, 5))
    dims = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(kernels.dot_general(lhs, rhs, dims), jax.lax.dot_general(lhs, rhs, dims))


@pytest.mark.parametrize("window, stride, pad, ceil_mode", [
    (3, 2, 0, False), (3, 2, 1, False), (2, 2, 0, True), (3, 1, 1, True), (3, 2, 0, True), ((3, 2), (2, 1), (1, 0), False),
])
def test_cpu_max_pool_gives_the_plain_values_and_gradients(window, stride, pad, ceil_mode):
    # Ties, as after a ReLU: the first maximum of a window takes its gradient, in both.
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 9, 8, 3)))
    x = x.at[0, 1:4, 1:4, 0].set(0.5)
    fields = dict(window=window, stride=stride, padding=pad, ceil_mode=ceil_mode)
    plain, fast = MaxPool(**fields), flaxnets.cpu.ops().max_pool(**fields)
    np.testing.assert_array_equal(fast.apply({}, x), plain.apply({}, x))
    probe = jax.random.normal(jax.random.key(1), plain.apply({}, x).shape)

    def grad(layer):
        return jax.grad(lambda v: jnp.sum(layer.apply({}, v) * probe))(x)

    # Overlapping windows add their shares in another order: equal to float32 rounding.
    np.testing.assert_allclose(grad(fast), grad(plain), rtol=0, atol=1e-6)


# ResNet-18 for CIFAR with one block a stage at a quarter of its width: the same kinds of layer (both kinds
# of shortcut included), half the program to compile.
@pytest.mark.parametrize("name, side, fences, fields", [
    ("resnet18_cifar", 16, True, {"width": 16, "stage_sizes": (1, 1, 1, 1)}), ("alexnet_small", 32, True, {}),
    ("lenet5_bn", 28, True, {}), ("lenet5_bn", 28, False, {})], ids=["resnet18_cifar", "alexnet_small", "lenet5_bn",
                                                                      "lenet5_bn-no-fences"])
def test_cpu_kernels_model_gives_the_plain_model_values_and_gradients(name, side, fences, fields):
    """The whole network, training mode: logits, BatchNorm statistics and gradients of the loss (and the
    same without the stored-once fences, which `benchmarks.cpu_kernels` times)."""
    spec = flaxnets.get_spec(name)
    plain = flaxnets.create_model(name, num_classes=10, **fields)
    if fences:
        fast = flaxnets.create_model(name, num_classes=10, ops=flaxnets.cpu.ops(), **fields)
        assert fast.ops == flaxnets.cpu.ops() and plain.ops == PLAIN
    else:
        fast = flaxnets.create_model(name, num_classes=10, ops=flaxnets.cpu.ops(fences=False), **fields)
    x = jax.random.normal(jax.random.key(0), (4, side, side, spec.in_channels))
    variables = plain.init(jax.random.key(1), x, False)
    assert_trees_close(fast.init(jax.random.key(1), x, False), variables, rtol=0)

    @partial(jax.jit, static_argnums=0)
    def loss_and_grads(model, params):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.key(2)})
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4))), (logits, updates)
        return jax.grad(loss, has_aux=True)(params)

    grads, (logits, updates) = loss_and_grads(fast, variables["params"])
    expected_grads, (expected_logits, expected_updates) = loss_and_grads(plain, variables["params"])
    assert_trees_close(logits, expected_logits, rtol=1e-5)
    assert_trees_close(updates, expected_updates, rtol=1e-5)
    assert_trees_close(grads, expected_grads, rtol=1e-4)


def test_cpu_kernels_refuse_forward_mode_and_plain_layers_do_not():
    """The reason the kernel set is an opt-in: `jax.custom_vjp` functions have no forward mode."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain = flaxnets.create_model("alexnet_small", num_classes=10)
    fast = flaxnets.create_model("alexnet_small", num_classes=10, ops=flaxnets.cpu.ops())
    variables = plain.init(jax.random.key(1), x, False)
    jax.jvp(lambda v: plain.apply(variables, v, False), (x,), (x,))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda v: fast.apply(variables, v, False), (x,), (x,))


def test_cpu_kernels_accept_an_empty_batch():
    """The stored-once fences index their first element; an empty batch must still differentiate."""
    ops = flaxnets.cpu.ops()
    layer = nn.Sequential([ops.conv(4, (3, 3), padding=padding(1)), nn.relu, ops.max_pool(2), ops.conv(4, (3, 3))])
    variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, jnp.zeros((0, 8, 8, 3)))))(variables["params"])
    for leaf in jax.tree_util.tree_leaves(grads):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))




# ------------------------------------------------------------------------------------------------------
# the fences: exact identities


def test_max_pool_winner_is_the_same_from_either_branch():
    """The winning taps pass through a conditional (so XLA stores them once); its second branch, taken
    only when the first output is NaN, recomputes them and must agree."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    x = x.at[0, 1:4, 1:4, 0].set(0.0)  # a window of ties: the first tap wins
    window, stride, pads = (3, 3), (2, 2), ((1, 1), (1, 1))
    expected = kernels._max_and_winner(x, window, stride, pads)[1]
    _, (winner, _, _) = kernels._max_pool_forward(x, window, stride, pads, True)
    np.testing.assert_array_equal(winner, expected)
    poisoned = x.at[0, 0, 0, 0].set(jnp.nan)  # the corner output is NaN: the recomputing branch runs
    _, (winner, _, _) = jax.jit(kernels._max_pool_forward, static_argnums=(1, 2, 3, 4))(poisoned, window, stride,
                                                                                         pads, True)
    np.testing.assert_array_equal(winner, kernels._max_and_winner(poisoned, window, stride, pads)[1])


def test_stored_input_is_the_input_and_passes_gradients_through():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    probe = jax.random.normal(jax.random.key(1), x.shape)
    for value in (x, x.at[0, 0, 0, 0].set(jnp.nan)):  # NaN in the corner: the rounding branch runs
        out, vjp = jax.vjp(jax.jit(fences.stored), value)
        np.testing.assert_array_equal(out, value)
        np.testing.assert_array_equal(vjp(probe)[0], probe)
    half = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(jax.vjp(fences.stored, half)[0], half)


def test_tied_gradients_are_unchanged_to_the_bit():
    """`tie_gradients` adds -0.0, from a conditional, to every gradient: an exact identity for signed
    zeros, infinities and NaN, whatever the first elements are."""
    tie = flaxnets.cpu.tie_gradients()
    # No subnormals: XLA's CPU arithmetic flushes them to zero in any computation, this one included.
    special = jnp.array([-0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 1.2e-38, -3.5, 3.4e38])
    trees = [
        {"a": special, "b": jnp.arange(6.0).reshape(2, 3)},
        {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array([[jnp.inf]]), "c": jnp.array([2.0], jnp.bfloat16)},
        {"a": jnp.array([-0.0]), "b": jnp.array([3.4e38, 3.4e38])},  # first elements whose sum overflows
    ]
    for grads in trees:
        tied, state = jax.jit(tie.update)(grads, tie.init(grads))
        assert state == optax.EmptyState()
        for got, expected in zip(jax.tree_util.tree_leaves(tied), jax.tree_util.tree_leaves(grads)):
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(np.signbit(np.asarray(got, np.float32)),
                                          np.signbit(np.asarray(expected, np.float32)))
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    assert tie.update({}, tie.init({}))[0] == {}
    empty = tie.update({"a": jnp.zeros((0, 3)), "b": jnp.ones(2)}, optax.EmptyState())[0]
    assert empty["a"].shape == (0, 3) and (np.asarray(empty["b"]) == 1.0).all()


def test_tie_gradients_chains_in_front_of_an_optimizer():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree_util.tree_map(lambda p: 0.5 * p - 1.0, params)
    plain = optax.sgd(0.1, momentum=0.9)
    for tx in (optax.chain(flaxnets.cpu.tie_gradients(), plain), after_fence(flaxnets.cpu.tie_gradients(), plain)):
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        expected, _ = plain.update(grads, plain.init(params), params)
        assert_trees_close(updates, expected, rtol=0)
    # The trainer's form keeps the optimizer's own state, so checkpoints do not depend on the fence.
    fenced = after_fence(flaxnets.cpu.tie_gradients(), plain)
    assert jax.tree_util.tree_structure(fenced.init(params)) == jax.tree_util.tree_structure(plain.init(params))
