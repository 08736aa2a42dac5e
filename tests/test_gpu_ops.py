"""`flaxnets.gpu.ops`: the GPU kernel set computes the default layers' values and gradients, on any backend,
through every transformation (it is plain JAX)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import flaxnets
from flaxnets import gpu
from flaxnets.layers import max_pool as plain_max_pool

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(fn, x, w, stride, pad):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return fn(x, w, (stride, stride), (pad, pad), dimension_numbers=dn)


@pytest.mark.parametrize("side,channels,kernel,stride,pad", [
    (20, 3, 7, 2, (3, 3)),   # ResNet's stem on an even side
    (19, 3, 7, 2, (3, 3)),   # ... and an odd one
    (27, 3, 11, 4, (2, 2)),  # AlexNet's stem
    (13, 1, 3, 2, (1, 1)),   # a grey image
    (12, 3, 1, 2, (0, 0)),   # a strided 1x1
    (15, 4, 5, 3, (0, 1)),   # uneven padding, stride 3
])
def test_folded_convolution_equals_the_plain_one(side, channels, kernel, stride, pad):
    kx, kw = jax.random.split(jax.random.key(side + kernel))
    x = jax.random.normal(kx, (2, side, side + 1, channels))
    w = jax.random.normal(kw, (kernel, kernel, channels, 5))
    assert gpu._folds(x, (stride, stride), [pad, pad], None, None, lax.conv_dimension_numbers(x.shape, w.shape, NHWC),
                      1, 1)
    @jax.jit
    def results(x, w):
        # Values, gradients with respect to both operands, and a forward-mode derivative, for both.
        out = []
        for fn in (gpu.conv_general_dilated, lax.conv_general_dilated):
            conv = lambda x, w: _conv(fn, x, w, stride, pad)
            out.append((conv(x, w), jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))(x, w),
                        jax.jvp(lambda x: conv(x, w), (x,), (jnp.ones_like(x),))[1]))
        return out

    (got, grads, tangent), (expected, expected_grads, expected_tangent) = results(x, w)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5 * kernel * kernel * channels, rtol=1e-5)
    for a, b in zip(grads, expected_grads):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(tangent, expected_tangent, atol=1e-3)


def test_wide_or_unit_stride_convolutions_pass_through():
    dn = lax.conv_dimension_numbers((1, 8, 8, 16), (3, 3, 16, 4), NHWC)
    x = jnp.zeros((1, 8, 8, 16))
    assert not gpu._folds(x, (2, 2), [(1, 1)] * 2, None, None, dn, 1, 1)  # too many channels to gain
    assert not gpu._folds(x[..., :3], (1, 1), [(1, 1)] * 2, None, None, dn, 1, 1)  # nothing to fold
    assert not gpu._folds(x[..., :3], (2, 2), "SAME", None, None, dn, 1, 1)


@pytest.mark.parametrize("by_phase", [False, True], ids=["strided taps", "taps by stride phase"])
@pytest.mark.parametrize("window,stride,pads", [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0))),
                                                ((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((0, 1), (0, 1))),
                                                ((3, 2), (3, 2), ((0, 2), (1, 0)))])
def test_max_pool_values_and_first_maximum_gradients(window, stride, pads, by_phase):
    # Small integers: windows hold many ties, where only the first maximum may receive the gradient.
    x = jax.random.randint(jax.random.key(0), (2, 9, 10, 3), 0, 3).astype(jnp.float32)
    g = jax.random.normal(jax.random.key(1), plain_max_pool(x, window, stride, pads).shape)

    @jax.jit
    def results(x):
        out = []
        for fn in (partial(gpu.max_pool, by_phase=by_phase), plain_max_pool):
            pool = lambda x: fn(x, window, stride, pads)
            out.append((pool(x), jax.grad(lambda x: jnp.sum(pool(x) * g))(x),
                        jax.vmap(lambda x: pool(x[None])[0])(x)))
        return out

    for got, expected in zip(*results(x)):
        np.testing.assert_array_equal(got, expected)


def test_a_model_with_the_gpu_set_computes_the_same_step():
    # A narrow ResNet of one block per stage keeps the stem, max-pool and every block kind, cheaply.
    x = jax.random.normal(jax.random.key(0), (2, 24, 24, 3))
    options = dict(num_classes=10, width=8, stage_sizes=(1, 1))
    plain = flaxnets.create_model("resnet18", **options)
    folded = flaxnets.create_model("resnet18", **options, ops=gpu.ops())
    variables = jax.jit(lambda x: plain.init(jax.random.key(1), x, train=False))(x)

    @jax.jit
    def losses(variables):
        def loss(model):
            def f(params):
                logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
                return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
            return jax.value_and_grad(f)(variables["params"])
        return loss(folded), loss(plain)

    (a, ga), (b, gb) = losses(variables)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(u, v, atol=2e-4, rtol=2e-3)
    assert gpu.ops() is gpu.ops()
