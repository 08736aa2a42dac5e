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


@pytest.mark.parametrize("side,stride,pad", [(9, 1, (0, 0)), (9, 2, (0, 0)), (10, 2, "VALID"), (11, 3, "SAME"),
                                             (12, 2, "SAME")])
def test_pointwise_convolution_as_a_product_equals_the_plain_one(side, stride, pad):
    kx, kw = jax.random.split(jax.random.key(side * stride))
    x = jax.random.normal(kx, (2, side, side + 1, 6))
    w = jax.random.normal(kw, (1, 1, 6, 5))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    product = partial(gpu.conv_general_dilated, pointwise_as_product=True)

    @jax.jit
    def results(x, w):
        out = []
        for fn in (product, lax.conv_general_dilated):
            conv = lambda x, w: fn(x, w, (stride, stride), pad if isinstance(pad, str) else (pad, pad),
                                   dimension_numbers=dn)
            out.append((conv(x, w), jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))(x, w),
                        jax.jvp(lambda x: conv(x, w), (x,), (jnp.ones_like(x),))[1],
                        jax.vmap(lambda x: conv(x[None], w)[0])(x)))
        return out

    got, expected = results(x, w)
    assert jax.make_jaxpr(lambda x, w: product(x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=dn))(
        x, w).eqns[-1].primitive.name == "dot_general"
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_only_unpadded_ungrouped_pointwise_convolutions_become_products():
    x, dn = jnp.zeros((1, 8, 8, 16)), lax.conv_dimension_numbers((1, 8, 8, 16), (1, 1, 16, 4), NHWC)
    pointwise = lambda w, padding, groups=1, dilation=None: gpu._pointwise(x, w, padding, None, dilation, dn, groups, 1)
    assert pointwise(jnp.zeros((1, 1, 16, 4)), [(0, 0), (0, 0)]) and pointwise(jnp.zeros((1, 1, 16, 4)), "VALID")
    assert not pointwise(jnp.zeros((3, 3, 16, 4)), [(1, 1), (1, 1)])  # not 1x1
    assert not pointwise(jnp.zeros((1, 1, 16, 4)), [(1, 1), (1, 1)])  # padded: the border is a bias-free zero
    assert not pointwise(jnp.zeros((1, 1, 8, 4)), [(0, 0), (0, 0)], groups=2)
    assert pointwise(jnp.zeros((1, 1, 16, 4)), "SAME")  # which pads a 1x1 window by nothing
    assert not pointwise(jnp.zeros((1, 1, 16, 4)), "SAME", dilation=(2, 2))


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


@pytest.mark.parametrize("arch,kernels", [("resnet18", "gpu"), ("resnet50", "gpu, 1x1 as products")])
def test_a_model_with_the_gpu_set_computes_the_same_step(arch, kernels):
    # A narrow ResNet of one block per stage keeps the stem, max-pool and every block kind, cheaply; the
    # bottlenecks have 1x1 convolutions of stride 1 and 2.
    from benchmarks.step_variants import kernel_sets

    x = jax.random.normal(jax.random.key(0), (2, 24, 24, 3))
    options = dict(num_classes=10, width=8, stage_sizes=(1, 1))
    plain = flaxnets.create_model(arch, **options)
    folded = flaxnets.create_model(arch, **options, ops=kernel_sets()[kernels])
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
    convolutions = {name: str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)).count(
        "conv_general_dilated") for name, model in (("plain", plain), ("set", folded))}
    # The set computes differently where it should: every 1x1 a product (and the stem folded, still a convolution).
    assert convolutions["set"] == convolutions["plain"] - (6 if arch == "resnet50" else 0)  # four in blocks, two shortcuts
