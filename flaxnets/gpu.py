"""Opt-in speed for XLA's GPU backend: a kernel set (`ops`) that computes the same layers another way.

The models in `flaxnets` are plain JAX and run on a GPU as they are; ``python -m train`` and the
benchmarks pass this set when JAX's backend is a GPU. In your own code:

    model = flaxnets.create_model("resnet50", num_classes=1000, ops=flaxnets.gpu.ops())

Unlike `flaxnets.cpu`'s set, everything here is plain differentiable JAX (no `jax.custom_vjp`), so
every transformation, forward-mode included, works through it; the parameters, their names and shapes,
and the results (up to float rounding) are those of the default layers. Two layers change:

* **Strided convolutions of few input channels** (the 7x7 stride-2 stems of ResNet, GoogLeNet and
  DenseNet, AlexNet's 11x11 stride-4 one), which cuDNN runs far below its speed on wider inputs because
  3 colour channels fill its tiles badly: the input is folded space-to-depth (each ``s x s`` block of
  pixels becomes ``s * s * C`` channels) and the kernel, padded to a multiple of the stride, is folded
  the same way, so that a stride-1 convolution over ``s * s`` times as many channels computes the same
  sums. The same rewrite is the space-to-depth stem of MLPerf's TPU ResNet-50 entries.
* **Max pooling**: the maximum of the window's strided views (one fused loop), with the gradient sent
  to the first maximum of each window (row-major, as PyTorch and XLA's select-and-scatter send it) by
  selecting among the views with the index of the winning tap, its gradient stopped; autodiff turns the
  selection into one fused loop of strided pads. On an H200 the whole ResNet-50 step gained 1.5% from it,
  though its gradient loop alone took longer than select-and-scatter (RESULTS.md says where the time went).

benchmarks/RESULTS.md ("GPU") has what each is worth on an H200 (the GPU run's ``tune`` step, and
``python -m benchmarks.step_variants --variant library:gpu --variant library:plain``).

Two more formulations are options of the functions, off in `ops` until a measurement puts them there:
``max_pool(..., by_phase=True)`` (the taps read by stride phase, so that their gradients are plain pads)
and ``conv_general_dilated(..., pointwise_as_product=True)`` (1x1 convolutions as matrix products). The
``tune`` step times both (`benchmarks.step_variants.kernel_sets` names the sets).
"""

from __future__ import annotations

from functools import partial, reduce
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxnets.layers import MaxPool, Ops

__all__ = ["ops", "conv_general_dilated", "max_pool", "FOLD_MAX_CHANNELS"]

# Inputs with at most this many channels are folded space-to-depth (an RGB or grey image).
FOLD_MAX_CHANNELS = 4
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _folds(lhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
           batch_group_count) -> bool:
    """Whether the convolution is a strided 2-D NHWC one of few channels that folding computes exactly."""
    if lhs.ndim != 4 or dimension_numbers != _NHWC or feature_group_count != 1 or batch_group_count != 1:
        return False
    if isinstance(padding, str) or any(d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return False
    strides = tuple(window_strides)
    return len(set(strides)) == 1 and strides[0] > 1 and lhs.shape[-1] <= FOLD_MAX_CHANNELS


def _fold_conv(x, w, stride: int, padding: Sequence[tuple[int, int]], precision, preferred_element_type):
    n, h, width, c = x.shape
    kh, kw, _, features = w.shape
    (top, bottom), (left, right) = padding
    out_h, out_w = (h + top + bottom - kh) // stride + 1, (width + left + right - kw) // stride + 1
    taps_h, taps_w = -(-kh // stride), -(-kw // stride)  # kernel side after folding
    rows, cols = stride * (out_h - 1 + taps_h), stride * (out_w - 1 + taps_w)
    # Pad (or crop: a negative high padding) to whole blocks. Pixels past the layer's own padding meet
    # only the zero taps added to the kernel below, and cropped ones no tap at all.
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, rows - h - top, 0), (left, cols - width - left, 0),
                                             (0, 0, 0)))
    x = x.reshape(n, rows // stride, stride, cols // stride, stride, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, rows // stride, cols // stride, stride * stride * c)
    w = jnp.pad(w, ((0, taps_h * stride - kh), (0, taps_w * stride - kw), (0, 0), (0, 0)))
    w = w.reshape(taps_h, stride, taps_w, stride, c, features).transpose(0, 2, 1, 3, 4, 5)
    w = w.reshape(taps_h, taps_w, stride * stride * c, features)
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_NHWC, precision=precision,
                                    preferred_element_type=preferred_element_type)


def _pointwise(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
               batch_group_count) -> bool:
    """Whether the convolution is an unpadded, undilated, ungrouped 1x1 NHWC one: a product of matrices."""
    if lhs.ndim != 4 or dimension_numbers != _NHWC or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return False
    # "SAME" pads a 1x1 window by nothing, whatever the stride.
    unpadded = padding in ("VALID", "SAME") or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
    return tuple(rhs.shape[:2]) == (1, 1) and unpadded


def _pointwise_conv(x, w, strides: Sequence[int], precision, preferred_element_type):
    sy, sx = (int(s) for s in strides)
    if (sy, sx) != (1, 1):  # a strided 1x1 reads every s-th pixel: (h - 1) // s + 1 of them, as the slice does
        x = x[:, ::sy, ::sx, :]
    return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, pointwise_as_product: bool = False):
    """`jax.lax.conv_general_dilated`, with a strided NHWC convolution of at most `FOLD_MAX_CHANNELS` input
    channels computed space-to-depth (see the module's docstring); every other one passes through.

    ``pointwise_as_product`` writes each 1x1 convolution (unpadded, strided or not) as a matrix product
    over the channels (`jax.lax.dot_general`), which XLA's GPU backend may run as a GEMM fused with the
    elementwise work around it (BatchNorm's multiply-add and ReLU) instead of as a cuDNN convolution: the
    same sums, in another order. `ops` leaves it off; the GPU run's ``tune`` step times it."""
    if _folds(lhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
              batch_group_count):
        return _fold_conv(lhs, rhs, int(window_strides[0]), [tuple(p) for p in padding], precision,
                          preferred_element_type)
    if pointwise_as_product and _pointwise(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                           feature_group_count, batch_group_count):
        return _pointwise_conv(lhs, rhs, window_strides, precision, preferred_element_type)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)


def _taps(x, window, strides, pads):
    """The input padded with -inf, seen once per window tap (row-major): ``taps[k][n, i, j, c]`` is tap
    ``k`` of output ``(i, j)``'s window. Each tap is a strided slice, whose gradient is a pad with
    interior zeros."""
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    out_h = (padded.shape[1] - window[0]) // strides[0] + 1
    out_w = (padded.shape[2] - window[1]) // strides[1] + 1
    return [lax.slice(padded, (0, dy, dx, 0),
                      (x.shape[0], dy + (out_h - 1) * strides[0] + 1, dx + (out_w - 1) * strides[1] + 1, x.shape[3]),
                      (1, strides[0], strides[1], 1))
            for dy in range(window[0]) for dx in range(window[1])]


def _phase_taps(x, window, strides, pads):
    """`_taps` read from the input split by stride phase: padded to whole ``s x s`` blocks and reshaped to
    ``(n, rows, s, cols, s, c)``, where tap ``(dy, dx)`` is one unit-stride slice (rows from ``dy // s``,
    phase ``dy % s``). Its gradient is then a pad without interior zeros, summed per phase."""
    (sy, sx), (kh, kw) = strides, window
    n, h, w, c = x.shape
    out_h = (h + sum(pads[0]) - kh) // sy + 1
    out_w = (w + sum(pads[1]) - kw) // sx + 1
    rows, cols = -(-(sy * (out_h - 1) + kh) // sy), -(-(sx * (out_w - 1) + kw) // sx)  # blocks the windows reach
    # Pad (or crop, where the windows stop short of the layer's own padding) to exactly rows x cols blocks.
    padded = lax.pad(x, np.array(-np.inf, x.dtype), ((0, 0, 0), (pads[0][0], rows * sy - h - pads[0][0], 0),
                                                      (pads[1][0], cols * sx - w - pads[1][0], 0), (0, 0, 0)))
    phases = padded.reshape(n, rows, sy, cols, sx, c)
    return [phases[:, dy // sy:dy // sy + out_h, dy % sy, dx // sx:dx // sx + out_w, dx % sx, :]
            for dy in range(kh) for dx in range(kw)]


def _first_maximum(taps):
    """The maximum of ``taps``, as a selection of the first tap that reaches it (row-major order), the
    selection's index held constant: autodiff sends the gradient to that tap alone."""
    best = reduce(lax.max, taps)
    winner = jnp.zeros(best.shape, jnp.int8 if len(taps) < 128 else jnp.int32)
    for k in range(len(taps) - 1, -1, -1):  # the last write is the first tap that reaches the maximum
        winner = jnp.where(taps[k] == best, jnp.asarray(k, winner.dtype), winner)
    winner = lax.stop_gradient(winner)
    out = taps[0]
    for k in range(1, len(taps)):
        out = jnp.where(winner == k, taps[k], out)
    return out


def max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
             pads: tuple[tuple[int, int], tuple[int, int]], *, by_phase: bool = False) -> jnp.ndarray:
    """`flaxnets.layers.max_pool` as a selection among the window's taps (see the module's docstring):
    the same values, and gradients that reach the first maximum of each window.

    ``by_phase`` reads the taps from the input split by stride phase (`_phase_taps`), so that the gradient
    is one plain pad per tap instead of one with interior zeros: the same values and gradients, another
    loop for XLA to compile. `ops` uses the strided taps; the GPU run's ``tune`` step times both."""
    return _first_maximum((_phase_taps if by_phase else _taps)(x, tuple(window), tuple(strides), pads))


def ops() -> Ops:
    """The GPU kernel set: `flax.linen.Conv` with `conv_general_dilated`, `flaxnets.layers.MaxPool` with
    `max_pool`, `flax.linen.Dense` as it is. Pass it as a model's ``ops``; every call returns the same set."""
    return _OPS


_OPS = Ops(conv=partial(nn.Conv, conv_general_dilated=conv_general_dilated), dense=nn.Dense,
           max_pool=partial(MaxPool, max_pool=max_pool))
