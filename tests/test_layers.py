"""The hand-written layers of `flaxnets.layers` against references that share no code with them.

Local Response Normalization is checked against a float64 NumPy loop written below from the two published
definitions, against its own gradients, and against PyTorch; pooling and BatchNorm against PyTorch, whose
semantics the layers promise to follow (so that torchvision weights give the same activations). PyTorch
tests skip with a reason where torch is not installed.
"""

from __future__ import annotations

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flaxnets.layers import (
    AdaptiveAvgPool,
    AvgPool,
    BatchNorm,
    BatchTooSmallError,
    GlobalAvgPool,
    InputTooSmallError,
    LocalResponseNorm,
    MaxPool,
    padding,
    pool_output_size,
)
from reference import torch_or_skip

# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def float64():
    """Let JAX compute in float64 for one test, and restore the default afterwards.

    jax 0.10 has no ``jax.experimental.enable_x64``; ``jax.enable_x64`` is the configuration state itself and
    works as a context manager, which restores the old value even when the test fails.
    """
    with jax.enable_x64(True):
        yield


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def nhwc(x_nchw) -> np.ndarray:
    """A PyTorch NCHW tensor as a NumPy NHWC array."""
    return np.transpose(x_nchw.detach().numpy(), (0, 2, 3, 1))


def to_nchw(x_nhwc: np.ndarray):
    """A NumPy NHWC array as a PyTorch NCHW tensor (a copy: torch wants contiguous memory)."""
    torch = torch_or_skip()
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def run(layer: nn.Module, x, **kwargs):
    """Apply a layer that has no variables."""
    return layer.apply({}, jnp.asarray(x), **kwargs)


# --------------------------------------------------------------------------------------------------------
# Local Response Normalization
# --------------------------------------------------------------------------------------------------------


def lrn_reference(x: np.ndarray, before: int, after: int, a: float, beta: float, k: float) -> np.ndarray:
    """``y_c = x_c / (k + a * sum(x_j**2 for j in [c - before, c + after])) ** beta`` in float64.

    The window is clipped at the first and last channel (channels beyond them count as zero). A plain loop
    over channels, deliberately unlike the layer's single vectorised window sum.
    """
    x = np.asarray(x, np.float64)
    channels = x.shape[-1]
    out = np.empty_like(x)
    for c in range(channels):
        first, last = max(0, c - before), min(channels - 1, c + after)
        squares = np.sum(x[..., first : last + 1] ** 2, axis=-1)
        out[..., c] = x[..., c] / (k + a * squares) ** beta
    return out


def torch_window(size: int) -> tuple[int, int]:
    """PyTorch's window around channel c: it pads size // 2 channels before and (size - 1) // 2 after."""
    return size // 2, (size - 1) // 2


def test_lrn_small_example_by_hand():
    # Three channels 1, 2, 3 with a window of 3, alpha 1, beta 1, k 1 ("paper": alpha not divided):
    # channel 0 sees 1 + 4 (channel -1 is outside), channel 1 sees 1 + 4 + 9, channel 2 sees 4 + 9.
    layer = LocalResponseNorm(size=3, alpha=1.0, beta=1.0, k=1.0, convention="paper")
    y = run(layer, np.array([[[[1.0, 2.0, 3.0]]]], np.float32))
    np.testing.assert_allclose(np.asarray(y).ravel(), [1 / 6, 2 / 15, 3 / 14], rtol=1e-6)
    # "torch" divides alpha by the size: channel 1 becomes 2 / (1 + 14 / 3).
    y = run(layer.clone(convention="torch"), np.array([[[[1.0, 2.0, 3.0]]]], np.float32))
    np.testing.assert_allclose(np.asarray(y).ravel(), [1 / (1 + 5 / 3), 2 / (1 + 14 / 3), 3 / (1 + 13 / 3)], rtol=1e-6)


# Sizes odd and even, channel counts both larger and smaller than the window (3 channels: every window of
# 4 or more is clipped at both ends at once).
@pytest.mark.parametrize("channels", [3, 8])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("convention", ["paper", "torch"])
def test_lrn_matches_float64_reference(float64, convention, size, channels):
    # alpha is large so that the window sum dominates k: a wrong window or a wrong convention shows.
    alpha, beta, k = 0.7, 0.75, 1.5
    x = normal(size * 10 + channels, (2, 3, 4, channels), scale=2.0, dtype=np.float64)
    layer = LocalResponseNorm(size=size, alpha=alpha, beta=beta, k=k, convention=convention)
    y = run(layer, x)
    assert y.dtype == jnp.float64
    a = alpha / size if convention == "torch" else alpha
    np.testing.assert_allclose(np.asarray(y), lrn_reference(x, *torch_window(size), a, beta, k), rtol=1e-12, atol=0)


def test_lrn_paper_constants_on_large_activations(float64):
    # The 2012 paper's k=2, n=5, alpha=1e-4, beta=0.75 only normalise visibly on activations of order 100.
    x = normal(0, (2, 5, 5, 96), scale=100.0, dtype=np.float64)
    y = run(LocalResponseNorm(), x)  # the defaults are the paper's constants
    np.testing.assert_allclose(np.asarray(y), lrn_reference(x, 2, 2, 1e-4, 0.75, 2.0), rtol=1e-12, atol=0)
    assert not np.allclose(np.asarray(y), x / 2.0**0.75, rtol=1e-3)  # the window sum matters here


@pytest.mark.parametrize("depth_radius", [0, 1, 2, 5])
def test_lrn_from_tensorflow(float64, depth_radius):
    # tf.nn.local_response_normalization: sqr_sum[c] = sum(x[c - r : c + r + 1] ** 2),
    # output = x / (bias + alpha * sqr_sum) ** beta, alpha not divided by anything.
    layer = LocalResponseNorm.from_tensorflow(depth_radius=depth_radius, bias=1.5, alpha=0.3, beta=0.6)
    assert (layer.size, layer.k, layer.alpha, layer.beta) == (2 * depth_radius + 1, 1.5, 0.3, 0.6)
    assert layer.convention == "paper"
    x = normal(depth_radius, (2, 3, 3, 7), dtype=np.float64)
    expected = lrn_reference(x, depth_radius, depth_radius, 0.3, 0.6, 1.5)
    np.testing.assert_allclose(np.asarray(run(layer, x)), expected, rtol=1e-12, atol=0)


def test_lrn_constructor_defaults_follow_each_framework():
    tf_default = LocalResponseNorm.from_tensorflow()  # TF: depth_radius=5, bias=1, alpha=1, beta=0.5
    assert (tf_default.size, tf_default.k, tf_default.alpha, tf_default.beta) == (11, 1.0, 1.0, 0.5)
    torch_default = LocalResponseNorm.from_torch(4)  # torch: alpha=1e-4, beta=0.75, k=1
    assert (torch_default.size, torch_default.k, torch_default.alpha, torch_default.beta) == (4, 1.0, 1e-4, 0.75)
    assert torch_default.convention == "torch"


@pytest.mark.parametrize(("size", "convention"), [(1, "paper"), (4, "torch"), (5, "paper"), (6, "paper")])
def test_lrn_gradients(float64, size, convention):
    layer = LocalResponseNorm(size=size, alpha=0.5, beta=0.75, k=1.0, convention=convention)
    x = jnp.asarray(normal(size, (1, 2, 2, 5), dtype=np.float64))
    check_grads(lambda v: layer.apply({}, v), (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("channels", [3, 8, 16])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_lrn_matches_torch(size, channels):
    torch = torch_or_skip()
    F = torch.nn.functional
    alpha, beta, k = 0.05, 0.75, 1.0
    x = normal(size + channels, (2, 4, 5, channels))
    expected = nhwc(F.local_response_norm(to_nchw(x), size, alpha=alpha, beta=beta, k=k))
    got = run(LocalResponseNorm.from_torch(size, alpha=alpha, beta=beta, k=k), x)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=0)
    # The module form, with torch's own defaults, against from_torch's defaults. Its alpha=1e-4 only matters
    # on activations of order 100, where float32 values are 1e-5 apart: compare relatively there.
    expected = nhwc(torch.nn.LocalResponseNorm(size)(to_nchw(x * 100)))
    got = run(LocalResponseNorm.from_torch(size), x * 100)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=1e-6)
    # torch's alpha is the paper's alpha times the size: the two conventions differ by nothing else.
    expected = nhwc(F.local_response_norm(to_nchw(x), size, alpha=alpha * size, beta=beta, k=k))
    got = run(LocalResponseNorm(size=size, alpha=alpha, beta=beta, k=k, convention="paper"), x)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=0)


def test_lrn_keeps_bfloat16_and_rounds_only_its_output():
    # The layer squares and sums in float32 and rounds once, at the end, to the input's bfloat16: its
    # result is within bfloat16's rounding (2**-9 relative) of the exact one on the same bfloat16 input.
    x = np.asarray(jnp.asarray(normal(3, (2, 3, 3, 16), scale=50.0), jnp.bfloat16))
    layer = LocalResponseNorm(size=5, alpha=1e-3, beta=0.75, k=2.0)
    low = run(layer, x)
    assert low.dtype == jnp.bfloat16
    exact = lrn_reference(x.astype(np.float64), 2, 2, 1e-3, 0.75, 2.0)
    np.testing.assert_allclose(np.asarray(low, np.float64), exact, rtol=2**-8, atol=0)


def test_lrn_is_one_vectorised_op_whatever_the_channel_count():
    # A Python loop over channels would trace one set of equations per channel (96 for AlexNet's conv1).
    layer = LocalResponseNorm()

    def equations(channels: int) -> int:
        jaxpr = jax.make_jaxpr(lambda v: layer.apply({}, v))(jnp.zeros((1, 4, 4, channels)))
        return len(jaxpr.jaxpr.eqns)

    assert equations(96) == equations(8)
    assert equations(96) < 20


def test_lrn_rejects_bad_settings():
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="size"):
        run(LocalResponseNorm(size=0), x)
    with pytest.raises(ValueError, match="convention"):
        run(LocalResponseNorm(convention="caffe"), x)


# --------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------

# (input height and width, window, stride, padding): odd and even sides, windows that overlap (3/2),
# windows that do not fit evenly, explicit padding, rectangular windows, the inception branch's 3/1 pool.
POOL_GEOMETRIES = [
    ((13, 14), 3, 2, 0),
    ((13, 14), 3, 2, 1),
    ((7, 7), 2, 2, 0),
    ((14, 14), 3, 1, 1),
    ((6, 5), 2, None, 1),
    ((5, 6), (3, 2), (2, 1), (1, 0)),
    ((9, 10), (2, 3), (2, 3), (1, 1)),
    ((1, 1), 2, 2, 0),
    ((4, 4), 1, 2, 0),
]


def pool_case_id(case) -> str:
    (h, w), window, stride, pad = case
    return f"{h}x{w}-k{window}-s{stride}-p{pad}".replace(" ", "")


def pool_input(hw: tuple[int, int]) -> np.ndarray:
    return normal(hw[0] * 100 + hw[1], (2, *hw, 3))


def assert_pool_matches(layer, x, torch_pool) -> None:
    """``layer`` on NHWC ``x`` equals ``torch_pool()`` (NCHW), or both refuse the geometry."""
    try:
        expected = torch_pool()
    except RuntimeError:  # torch: "Output size is too small"; here a clear error too
        with pytest.raises(InputTooSmallError):
            run(layer, x)
        return
    got = run(layer, x)
    assert got.shape == nhwc(expected).shape
    np.testing.assert_allclose(np.asarray(got), nhwc(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("case", POOL_GEOMETRIES, ids=pool_case_id)
def test_max_pool_matches_torch(case, ceil_mode):
    torch = torch_or_skip()
    hw, window, stride, pad = case
    x = pool_input(hw)
    assert_pool_matches(MaxPool(window, stride, pad, ceil_mode), x,
                        lambda: torch.nn.functional.max_pool2d(to_nchw(x), window, stride, pad, ceil_mode=ceil_mode))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("case", POOL_GEOMETRIES, ids=pool_case_id)
def test_avg_pool_matches_torch(case, ceil_mode, count_include_pad):
    torch = torch_or_skip()
    hw, window, stride, pad = case
    x = pool_input(hw)
    assert_pool_matches(AvgPool(window, stride, pad, ceil_mode, count_include_pad), x,
                        lambda: torch.nn.functional.avg_pool2d(to_nchw(x), window, stride, pad, ceil_mode=ceil_mode,
                                                               count_include_pad=count_include_pad))


@pytest.mark.parametrize(
    ("hw", "out"),
    [
        ((13, 14), (4, 5)),  # neither side divides
        ((7, 7), 4),  # overlapping bins
        ((14, 14), 4),
        ((14, 14), 7),  # divides: a plain 2x2 pool
        ((12, 10), (4, 3)),  # one side divides, the other does not
        ((6, 6), 7),  # upsampling: bins repeat input pixels
        ((1, 1), 4),  # replication, as VGG does at 32x32 input
        ((5, 5), 5),  # the identity
    ],
)
def test_adaptive_avg_pool_matches_torch(hw, out):
    torch = torch_or_skip()
    x = pool_input(hw)
    expected = nhwc(torch.nn.functional.adaptive_avg_pool2d(to_nchw(x), out))
    got = run(AdaptiveAvgPool(out), x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=0)


def test_global_avg_pool_matches_torch():
    torch = torch_or_skip()
    x = pool_input((7, 9))
    expected = torch.nn.functional.adaptive_avg_pool2d(to_nchw(x), 1).flatten(1).numpy()
    got = run(GlobalAvgPool(), x)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=0)


def test_pool_output_size_matches_torch_shapes():
    torch = torch_or_skip()
    checked = 0
    for size, window, stride, ceil_mode in itertools.product(range(1, 13), range(1, 6), range(1, 5), (False, True)):
        for pad in range(window // 2 + 1):  # torch allows padding up to half the window
            ours = pool_output_size(size, window, stride, pad, ceil_mode)
            x = torch.zeros(1, 1, size)
            try:
                theirs = torch.nn.functional.max_pool1d(x, window, stride, pad, ceil_mode=ceil_mode).shape[-1]
            except RuntimeError:  # torch refuses an output smaller than one element
                assert ours < 1, (size, window, stride, pad, ceil_mode)
            else:
                assert ours == theirs, (size, window, stride, pad, ceil_mode)
            checked += 1
    assert checked > 1000


def test_pool_too_small_input_is_a_clear_error():
    with pytest.raises(InputTooSmallError, match="window 3"):
        run(MaxPool(3, 2), jnp.ones((1, 2, 2, 1)))
    assert issubclass(InputTooSmallError, ValueError)  # callers may catch a plain ValueError


def test_conv_padding_matches_torch_on_strided_even_input():
    # Flax's "SAME" pads a stride-2 convolution on an even input as (0, 1), PyTorch's padding=1 as (1, 1):
    # `padding` gives PyTorch's placement.
    torch = torch_or_skip()
    x = normal(0, (2, 8, 8, 3))
    weight = normal(1, (4, 3, 3, 3))  # torch's (out, in, h, w)
    expected = nhwc(torch.nn.functional.conv2d(to_nchw(x), torch.from_numpy(weight), stride=2, padding=1))
    conv = nn.Conv(4, (3, 3), strides=2, padding=padding(1), use_bias=False)
    got = conv.apply({"params": {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0))}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("running_mean_offset", [0.0, -50.0], ids=["tracked", "cold"])
def test_batch_norm_matches_torch(running_mean_offset):
    """A large mean (50, standard deviation 3) makes an unshifted one-pass variance (E[x^2] - E[x]^2) wrong
    in float32. With the running mean near the batch's ("tracked", as after a few steps of training) the
    shifted one-pass statistics match PyTorch's two passes to float32 rounding; with it far away ("cold",
    a first step on inputs of mean 50) they lose float32's epsilon times ((mean - running mean) / std)**2
    of relative precision in the variance, as the layer's docstring states, and the tolerance says so."""
    torch = torch_or_skip()
    channels = 5
    x = normal(0, (4, 3, 2, channels), scale=3.0) + 50.0
    reference = torch.nn.BatchNorm2d(channels)  # momentum 0.1 and eps 1e-5: the layer's defaults
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(normal(1, (channels,)) + 1))
        reference.bias.copy_(torch.from_numpy(normal(2, (channels,))))
        reference.running_mean.copy_(torch.from_numpy(normal(3, (channels,)) + 50.0 + running_mean_offset))
        reference.running_var.copy_(torch.from_numpy(np.abs(normal(4, (channels,))) + 0.5))
    eps = np.finfo(np.float32).eps
    atol = max(1e-5, 8 * eps * (running_mean_offset / 3.0) ** 2 * 3.0)
    variables = {
        "params": {"scale": reference.weight.detach().numpy(), "bias": reference.bias.detach().numpy()},
        "batch_stats": {"mean": reference.running_mean.numpy().copy(), "var": reference.running_var.numpy().copy()},
    }
    layer = BatchNorm()  # momentum 0.9 here is torch's 0.1: the weight of the old running value

    # Training: normalise with the batch's statistics, update the running ones (torch uses the unbiased variance).
    reference.train()
    expected = nhwc(reference(to_nchw(x)))
    got, updates = layer.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), expected, atol=atol, rtol=0)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), reference.running_mean.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(stats["var"]), reference.running_var.numpy(), atol=atol * 9, rtol=0)

    # Evaluation with the updated running statistics.
    reference.eval()
    expected = nhwc(reference(to_nchw(x)))
    got = layer.apply({"params": variables["params"], **updates}, jnp.asarray(x), use_running_average=True)
    np.testing.assert_allclose(np.asarray(got), expected, atol=atol, rtol=0)


def test_batch_norm_refuses_one_value_per_channel_in_training_only():
    """PyTorch raises for a training batch with one value per channel, whose variance is 0 and whose every
    output would be ``bias``; so does this layer, counting the values over the device axis when synced.
    Initialisation and inference take a batch of one; an empty batch leaves the statistics alone."""
    layer = BatchNorm()
    one = jnp.ones((1, 1, 1, 3))
    variables = layer.init(jax.random.key(0), one, use_running_average=False)
    with pytest.raises(BatchTooSmallError, match="more than one value per channel"):
        layer.apply(variables, one, use_running_average=False, mutable=["batch_stats"])
    assert layer.apply(variables, one, use_running_average=True).shape == one.shape
    empty, updates = layer.apply(variables, one[:0], use_running_average=False, mutable=["batch_stats"])
    assert empty.shape == (0, 1, 1, 3)  # and the statistics stay as they were, not NaN
    chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
    two = jnp.asarray([1.0, 3.0]).reshape(1, 2, 1, 1) * jnp.ones(3)  # biased variance 1, unbiased 2
    _, updates = layer.apply(variables, two, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], np.full(3, 0.9 * 1 + 0.1 * 2), rtol=1e-6)

    synced = BatchNorm(axis_name="devices")
    apply = lambda x: synced.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    with pytest.raises(BatchTooSmallError):
        jax.vmap(apply, axis_name="devices")(one[None])
    images = jnp.asarray([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]]).reshape(2, 1, 1, 1, 3)  # two devices of one value
    out, _ = jax.vmap(apply, axis_name="devices")(images)
    np.testing.assert_allclose(np.asarray(out).reshape(2, 3), [[1, 1, -1], [-1, -1, 1]], atol=1e-4)


def test_batch_norm_keeps_float32_statistics_for_bfloat16_compute():
    layer = BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    x = jnp.asarray(normal(0, (4, 3, 3, 2)), jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves((variables, updates)):
        assert leaf.dtype == jnp.float32
