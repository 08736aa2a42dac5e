"""The CPU kernel set: convolution, dense and max-pooling functions with hand-written gradients.

Each is a drop-in for the function a `flax.linen` layer calls (`flax.linen.Conv`'s
``conv_general_dilated``, `flax.linen.Dense`'s ``dot_general``, `flaxnets.layers.MaxPool`'s
``max_pool``): the same values and, up to float32 summation order, the same gradients, computed in a
way that XLA's CPU backend runs faster. They are `jax.custom_vjp` functions, so forward-mode
differentiation (``jvp``, ``linearize``, ``jacfwd``, Hessians) does not pass through them: that is why
they are an opt-in (`ops`), never the default. Measured figures: `flaxnets.cpu` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import math
from functools import partial, reduce
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxnets.cpu.fences import stored, stored_once
from flaxnets.cpu.flags import ynnpack_convolutions
from flaxnets.layers import MaxPool, Ops

__all__ = ["ops", "max_pool", "conv_general_dilated", "dot_general"]

Convolutions = Literal["eigen", "ynnpack"]


# ------------------------------------------------------------------------------------------------------
# max pooling


def _window_views(x, window, stride, pads):
    """The input, padded with -inf, seen once per window tap: ``views[k][n, i, j, c]`` is tap ``k`` of
    output ``(i, j)``'s window, taps in row-major order."""
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    out_h = (padded.shape[1] - window[0]) // stride[0] + 1
    out_w = (padded.shape[2] - window[1]) // stride[1] + 1
    views = []
    for dy in range(window[0]):
        for dx in range(window[1]):
            limit = (x.shape[0], dy + (out_h - 1) * stride[0] + 1, dx + (out_w - 1) * stride[1] + 1, x.shape[3])
            views.append(lax.slice(padded, (0, dy, dx, 0), limit, (1, stride[0], stride[1], 1)))
    return padded.shape, views


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, stride, pads, fence):
    return reduce(lax.max, _window_views(x, window, stride, pads)[1])


def max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
             pads: tuple[tuple[int, int], tuple[int, int]], *, fence: bool = True) -> jnp.ndarray:
    """`flaxnets.layers.max_pool` whose gradient, like XLA's select-and-scatter and PyTorch's, goes to the
    first maximum of each window (row-major), computed without select-and-scatter: XLA's CPU backend runs
    that as a scalar loop, which made the max-pool gradient the largest single cost of a ResNet train step
    (0.49 s against 0.04 s for the forward pooling, 8x112x112x64 input). Here the forward pass remembers
    which tap won and the backward pass adds each tap's share with strided pads: vectorised loops.

    The pooling itself is the elementwise maximum of the window's strided views, which XLA fuses into one
    loop: 8x faster than `lax.reduce_window` for AlexNet's 3x3 stride-2 pooling (1.2 ms against 10 ms,
    batch 32), and, with YNNPACK running reductions, it keeps YNNPACK from taking the last pooling and
    the dense layers behind it into one slow fusion (VGG-11 inference, batch 32: 4.3 s against 2.9 s).
    ``fence=False`` leaves out the stored-once fence on the winning taps (to measure what it buys).
    """
    return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in pads), fence)


def _max_and_winner(x, window, stride, pads):
    padded_shape, views = _window_views(x, window, stride, pads)
    best, winner = views[0], jnp.zeros(views[0].shape, jnp.int8 if len(views) < 128 else jnp.int32)
    for tap, view in enumerate(views[1:], start=1):
        better = view > best  # strictly greater: the first maximum keeps the gradient on ties
        best = lax.max(best, view)
        winner = jnp.where(better, jnp.asarray(tap, winner.dtype), winner)
    return best, winner, padded_shape


def _max_pool_forward(x, window, stride, pads, fence):
    best, winner, padded_shape = _max_and_winner(x, window, stride, pads)
    # The backward pass reads each winner once per window tap; unstored, XLA's CPU fusion would rebuild
    # the compare-and-select chain in every one of those reads (GoogLeNet's 3x3 stride-1 pooling,
    # 32x28x28x192, forward and backward: 157 ms against 12 ms).
    if fence:
        winner = stored_once(best, lambda w, v: w, lambda w, v: _max_and_winner(v, window, stride, pads)[1],
                             winner, x)
    return best, (winner, x.shape, padded_shape)


def _max_pool_backward(window, stride, pads, fence, residuals, grad):
    winner, shape, padded_shape = residuals
    total = None
    tap = 0
    zero = jnp.zeros((), grad.dtype)
    for dy in range(window[0]):
        for dx in range(window[1]):
            share = jnp.where(winner == tap, grad, zero)
            config = [(0, 0, 0)]
            for axis, start in ((1, dy), (2, dx)):
                used = start + (grad.shape[axis] - 1) * stride[axis - 1] + 1
                config.append((start, padded_shape[axis] - used, stride[axis - 1] - 1))
            config.append((0, 0, 0))
            placed = lax.pad(share, zero, config)
            total = placed if total is None else total + placed
            tap += 1
    (top, _), (left, _) = pads
    return (lax.slice(total, (0, top, left, 0), (shape[0], top + shape[1], left + shape[2], shape[3])),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


# ------------------------------------------------------------------------------------------------------
# convolution

_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
# Below this many input channels XLA's own kernel gradient is faster (a stem's 3 colour channels).
_GEMM_MIN_CHANNELS = 32
# Above this many bytes of im2col patches the kernel gradient runs one matmul per kernel tap instead.
_IM2COL_MAX_BYTES = 128 * 2**20


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, convolutions: Convolutions = "eigen", fence: bool = True):
    """`jax.lax.conv_general_dilated` with the kernel gradient that suits XLA's CPU ``convolutions``
    library, for `flax.linen.Conv`'s ``conv_general_dilated`` field.

    * With YNNPACK (jaxlib's default), XLA computes the kernel gradient of a 2-D convolution as a
      convolution whose window is the whole feature map, at a quarter to a half of the speed of the
      forward convolutions (VGG-11 train step, batch 4: 2.5 s of 5.0 s). For an NHWC convolution with
      at least 32 input channels and no dilation or groups, the kernel gradient is then one matrix
      product of im2col patches with the output gradient (one product per kernel tap when the patches
      would be large).
    * With Eigen (`flaxnets.cpu.prefer_eigen`), XLA's own kernel gradient is 1.4-2.6x faster than that
      product for larger kernels and is kept, but not for 1x1 kernels: XLA transposes the activations to
      put channels first (0.9 s for one 32x56x56x256 tensor in a ResNet-50 train step), where the
      product of the activations with the output gradient needs no copy (2.0-2.7x faster alone).

    Every floating-point input is also handed to the backward pass stored (`flaxnets.cpu.fences.stored`),
    not as the elementwise chain that made it (ResNet-18 train step 2,082 -> 1,940 ms, ResNet-50 7.0 ->
    6.4 s); ``fence=False`` leaves that out. All other convolutions are `lax.conv_general_dilated` as called.
    """
    plain = (
        lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1 and precision is None
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
        and rhs.shape[2] >= _GEMM_MIN_CHANNELS and lhs.dtype == rhs.dtype
        and (convolutions == "ynnpack" or rhs.shape[:2] == (1, 1))
    )
    if fence and jnp.issubdtype(lhs.dtype, jnp.floating):
        lhs = stored(lhs)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads)


def _plain_conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, w, strides, pads):
    return _plain_conv(x, w, strides, pads)


def _conv_nhwc_forward(x, w, strides, pads):
    return _plain_conv(x, w, strides, pads), (x, w)


def _taps(x, out_shape, kernel, strides, pads):
    """For each kernel tap (row-major), the input pixels it meets over the whole output: (N, Ho, Wo, C)."""
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    n, ho, wo, _ = out_shape
    return [lax.slice(padded, (0, dy, dx, 0), (n, dy + (ho - 1) * strides[0] + 1, dx + (wo - 1) * strides[1] + 1,
                                                 x.shape[3]), (1, strides[0], strides[1], 1))
            for dy in range(kernel[0]) for dx in range(kernel[1])]


def _kernel_grad_gemm(x, g, kernel_shape, strides, pads):
    kh, kw, cin, cout = kernel_shape
    taps = _taps(x, g.shape, (kh, kw), strides, pads)
    rows = math.prod(g.shape[:3])
    flat_g = g.reshape(rows, cout)
    if rows * kh * kw * cin * x.dtype.itemsize <= _IM2COL_MAX_BYTES:
        patches = jnp.stack(taps, axis=3).reshape(rows, kh * kw * cin)
        grad = lax.dot_general(patches, flat_g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        grad = jnp.stack([lax.dot_general(t.reshape(rows, cin), flat_g, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32) for t in taps])
    return grad.reshape(kernel_shape).astype(x.dtype)


def _conv_nhwc_backward(strides, pads, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda v: _plain_conv(v, w, strides, pads), x)[1](g)[0]
    dw = _kernel_grad_gemm(x, g, w.shape, strides, pads)
    return dx, dw.astype(w.dtype)


_conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


# ------------------------------------------------------------------------------------------------------
# dense


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` with a faster input gradient on XLA's CPU backend, for `flax.linen.Dense`'s
    ``dot_general`` field.

    A dense layer's input gradient ``g @ kernel.T`` contracts the kernel over its last axis; XLA's CPU
    backend (with YNNPACK off) ran that 6-7x slower than the forward product (AlexNet's first dense
    layer, batch 32: 135 ms against 21 ms). Here it is a 1x1 convolution that treats the kernel as a
    one-row image with ``features`` channels and the output gradient as the filter bank (18 ms; as fast
    with YNNPACK on). Only the plain dense contraction (last axis of ``lhs`` with the first of a 2-D
    ``rhs``) is rewritten; everything else is `lax.dot_general` as called.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (
        rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
        and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None
        and not kwargs and lhs.dtype == rhs.dtype
    )
    if not plain:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    return _dense(lhs, rhs)


def _plain_dense(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _dense(x, w):
    return _plain_dense(x, w)


def _dense_forward(x, w):
    return _plain_dense(x, w), (x, w)


def _dense_backward(residuals, g):
    x, w = residuals
    rows = g.reshape(-1, g.shape[-1])
    # (1, 1, in, out) image convolved with a (1, 1, out, rows) filter bank: (1, 1, in, rows) = (g @ w.T).T
    dx = lax.conv_general_dilated(w[None, None], rows.T[None, None], (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))[0, 0].T
    dw = lax.dot_general(x.reshape(-1, x.shape[-1]), rows, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape), dw


_dense.defvjp(_dense_forward, _dense_backward)


# ------------------------------------------------------------------------------------------------------
# the kernel set


def ops(convolutions: Convolutions | None = None, *, fences: bool = True) -> Ops:
    """The kernel set for XLA's CPU backend: `flax.linen.Conv`, `flax.linen.Dense` and
    `flaxnets.layers.MaxPool` with this module's functions. Pass it as a model's ``ops`` field:
    ``flaxnets.create_model(name, ops=flaxnets.cpu.ops())``.

    ``convolutions`` names the library XLA runs convolutions with, which decides the kernel gradient;
    `None` reads it from ``XLA_FLAGS`` now (`ynnpack_convolutions`), once: build the set after
    `flaxnets.cpu.prefer_eigen` if you call it. ``fences=False`` leaves out the stored-once fences of max
    pooling and convolutions (``python -m benchmarks.cpu_kernels`` measures what they buy). Equal
    arguments give the same (equal) set.
    """
    if convolutions is None:
        convolutions = "ynnpack" if ynnpack_convolutions() else "eigen"
    if convolutions not in ("eigen", "ynnpack"):
        raise ValueError(f"convolutions must be 'eigen' or 'ynnpack', got {convolutions!r}.")
    return _ops(convolutions, bool(fences))


@functools.cache
def _ops(convolutions: Convolutions, fences: bool) -> Ops:
    conv = partial(conv_general_dilated, convolutions=convolutions, fence=fences)
    return Ops(conv=partial(nn.Conv, conv_general_dilated=conv), dense=partial(nn.Dense, dot_general=dot_general),
               max_pool=partial(MaxPool, max_pool=partial(max_pool, fence=fences)))
