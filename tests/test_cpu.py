"""The CPU paths: which library XLA uses (`flaxnets.cpu`), the hand-written CPU gradients that depend on
it, and `flaxnets.layers.Conv` / `Dense` being drop-ins for Flax's layers."""

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
import pytest

from flaxnets.cpu import EIGEN_SETTING, YNN_OPTION, ynnpack_convolutions
from flaxnets.layers import Conv, Dense, MaxPool, dot_general, padding

ROOT = Path(__file__).resolve().parent.parent
EIGEN = f"--xla_force_host_platform_device_count=8 {EIGEN_SETTING}"
YNNPACK = "--xla_force_host_platform_device_count=8"


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
    """In a fresh process: the option is added, XLA honours it (no YNNPACK fusion in the compiled
    convolution), a user's own setting is kept, and once JAX runs nothing changes."""
    script = """
import os, sys
import jax, jax.numpy as jnp
from flaxnets.cpu import prefer_eigen, ynnpack_convolutions
first = prefer_eigen()
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
text = conv.lower(jnp.zeros((1, 8, 8, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text()
flags = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = ""
late = prefer_eigen()
print(first, "ynn" in text, repr(flags), late, repr(os.environ["XLA_FLAGS"]), sep="|")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split("|") == ["True", "False", f"'--xla_force_host_platform_device_count=2 {EIGEN_SETTING}'",
                                  "False", "''"]
    env["XLA_FLAGS"] = f"{YNN_OPTION}=individual_convolution"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split("|")[:3] == ["False", "True", f"'{YNN_OPTION}=individual_convolution'"]


@pytest.mark.parametrize("kwargs, shape", [
    (dict(features=8, kernel_size=(3, 3), padding=padding(1)), (2, 9, 9, 4)),
    (dict(features=8, kernel_size=(5, 5), strides=2, padding="VALID"), (2, 11, 11, 3)),
    (dict(features=6, kernel_size=(3, 3), strides=(2, 1), padding="SAME", use_bias=False), (1, 8, 7, 4)),
    (dict(features=8, kernel_size=(3, 3), padding=1, kernel_dilation=2, feature_group_count=2), (2, 9, 9, 4)),
    (dict(features=8, kernel_size=(3, 3), padding=padding(1), dtype=jnp.bfloat16), (2, 6, 6, 3)),
])
def test_conv_is_flax_conv(kwargs, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ours, theirs = Conv(**kwargs), nn.Conv(**kwargs)
    variables = theirs.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(ours.init(jax.random.key(1), x)), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)  # same initialisers, same keys
    got, expected = ours.apply(variables, x), theirs.apply(variables, x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=1e-2, atol=1e-2)
    if kwargs.get("dtype") is None:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_refuses_what_it_does_not_cover():
    x = jnp.zeros((1, 8, 8, 3))
    for layer in (Conv(4, (3, 3), padding="CIRCULAR"), Conv(4, 3), Conv(4, (3, 3), mask=jnp.ones((3, 3, 3, 4)))):
        with pytest.raises(ValueError, match="flaxnets.layers.Conv takes 2-D NHWC input"):
            layer.init(jax.random.key(0), x)


def test_dense_is_flax_dense():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    for kwargs in (dict(features=4), dict(features=4, use_bias=False), dict(features=4, dtype=jnp.bfloat16)):
        variables = nn.Dense(**kwargs).init(jax.random.key(1), x)
        mine = Dense(**kwargs).init(jax.random.key(1), x)
        assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(variables)
        got, expected = Dense(**kwargs).apply(variables, x), nn.Dense(**kwargs).apply(variables, x)
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=1e-2, atol=1e-2)


def test_dense_gradients_equal_xla_gradients():
    x = jax.random.normal(jax.random.key(0), (6, 3, 40))
    w = jax.random.normal(jax.random.key(1), (40, 24))
    b = jax.random.normal(jax.random.key(2), (24,))
    probe = jax.random.normal(jax.random.key(3), (6, 3, 24))

    def fast(x, w, b):
        return jnp.sum((dot_general(x, w, (((2,), (0,)), ((), ()))) + b) * probe)

    def plain(x, w, b):
        return jnp.sum((jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))) + b) * probe)

    for got, expected in zip(jax.grad(fast, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(jax.grad(fast, (0, 1, 2)))(x, w, b))
    assert "conv_general_dilated" in jaxpr  # the input gradient's 1x1 convolution
    # Anything but the plain dense contraction is lax.dot_general itself.
    lhs, rhs = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))))
    np.testing.assert_array_equal(batched, jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,)))))


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(32, (3, 3), padding=padding(1))(x))
        x = MaxPool(3, 2, padding=1)(x)
        x = Conv(40, (3, 3), padding=padding(1))(x)
        x = Conv(36, (1, 1), strides=2)(x)
        return Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("flags", [EIGEN, YNNPACK], ids=["eigen", "ynnpack"])
def test_cpu_gradients_equal_xla_gradients_with_either_library(monkeypatch, flags):
    """With YNNPACK the convolutions' kernel gradient is the im2col product; with Eigen, XLA's own (so a
    3x3 convolution alone is differentiable forward too) except for 1x1 kernels. Either way the gradients are XLA's, and
    FLAXNETS_XLA_GRADIENTS=1 makes everything forward-differentiable. The option only steers tracing here:
    the process keeps the library it started with."""
    monkeypatch.setenv("XLA_FLAGS", flags)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 32))
    params = _Tiny().init(jax.random.key(1), x)
    loss = partial(lambda p, x: jnp.sum(_Tiny().apply(p, x) ** 2), x=x)
    fast = jax.grad(loss)(params)
    def conv(p):
        return Conv(40, (3, 3), padding=padding(1), use_bias=False).apply(p, x)

    conv_params = Conv(40, (3, 3), padding=padding(1), use_bias=False).init(jax.random.key(2), x)
    conv_jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(conv(p))))(conv_params))
    assert ("dot_general" in conv_jaxpr) is (flags == YNNPACK)  # the im2col kernel gradient
    # A 1x1 convolution's kernel gradient is the activations-by-gradient product with either library.
    pointwise = Conv(40, (1, 1), use_bias=False)
    pointwise_params = pointwise.init(jax.random.key(3), x)
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(pointwise.apply(p, x))))(pointwise_params))
    if flags == EIGEN:
        jax.jvp(lambda p: jnp.sum(conv(p)), (conv_params,), (conv_params,))
    monkeypatch.setenv("FLAXNETS_XLA_GRADIENTS", "1")
    plain = jax.grad(loss)(params)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    _, tangent = jax.jvp(loss, (params,), (jax.tree_util.tree_map(jnp.ones_like, params),))
    assert np.isfinite(float(tangent))


def test_max_pool_winner_is_the_same_from_either_branch():
    """The forward pass passes the winning taps through a conditional (so XLA stores them once); its
    second branch, taken only when the first output is NaN, recomputes them and must agree."""
    from flaxnets.layers import _max_and_winner, _max_pool_forward

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    x = x.at[0, 1:4, 1:4, 0].set(0.0)  # a window of ties: the first tap wins
    window, stride, pads = (3, 3), (2, 2), ((1, 1), (1, 1))
    expected = _max_and_winner(x, window, stride, pads)[1]
    _, (winner, _, _) = _max_pool_forward(x, window, stride, pads)
    np.testing.assert_array_equal(winner, expected)
    poisoned = x.at[0, 0, 0, 0].set(jnp.nan)  # the corner output is NaN: the recomputing branch runs
    _, (winner, _, _) = jax.jit(_max_pool_forward, static_argnums=(1, 2, 3))(poisoned, window, stride, pads)
    np.testing.assert_array_equal(winner, _max_and_winner(poisoned, window, stride, pads)[1])


def test_max_pool_gradient_stores_the_winners_once():
    """Without the conditional, XLA fused the winner computation into each of the backward pass's nine
    reads: GoogLeNet's stride-1 pooling gradient ran 10-16x slower (`benchmarks/RESULTS.md`)."""
    x = jnp.ones((2, 8, 8, 4))
    pool = MaxPool(3, 1, padding=1)
    text = jax.jit(lambda x: jax.grad(lambda v: jnp.sum(pool(v) ** 2))(x)).lower(x).compile().as_text()
    assert "conditional(" in text


def test_stored_input_is_the_input_and_passes_gradients_through():
    from flaxnets.layers import _stored

    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    probe = jax.random.normal(jax.random.key(1), x.shape)
    for value in (x, x.at[0, 0, 0, 0].set(jnp.nan)):  # NaN in the corner: the rounding branch runs
        out, vjp = jax.vjp(jax.jit(_stored), value)
        np.testing.assert_array_equal(out, value)
        np.testing.assert_array_equal(vjp(probe)[0], probe)
    half = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(jax.vjp(_stored, half)[0], half)


def test_conv_input_is_stored_only_under_differentiation():
    """The kernel gradient reads the convolution's input from a conditional's output, so XLA cannot
    rebuild the input's elementwise chain inside its transposed copy; inference has no conditional."""
    layer = nn.Sequential([Conv(8, (3, 3), padding=padding(1)), nn.relu, Conv(8, (3, 3), padding=padding(1))])
    x = jnp.ones((2, 6, 6, 4))
    variables = layer.init(jax.random.key(0), x)

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    train = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile().as_text()
    infer = jax.jit(layer.apply).lower(variables, x).compile().as_text()
    # One conditional: the second layer's input depends on the parameters, the image does not.
    assert train.count("conditional(") == 1
    assert "conditional(" not in infer


def test_cpu_gradients_accept_an_empty_batch():
    """The stored-once fences index their first element; an empty batch must still differentiate."""
    layer = nn.Sequential([Conv(4, (3, 3), padding=padding(1)), nn.relu, MaxPool(2), Conv(4, (3, 3))])
    variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, jnp.zeros((0, 8, 8, 3)))))(variables["params"])
    for leaf in jax.tree_util.tree_leaves(grads):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
