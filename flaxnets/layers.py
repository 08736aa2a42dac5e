"""Layers the classic CNNs need and `flax.linen` does not ship, written to PyTorch's semantics.

Everything here takes NHWC input. Pooling follows `torch.nn.MaxPool2d` / `AvgPool2d` /
`AdaptiveAvgPool2d` exactly (explicit padding, `ceil_mode`), so that weights converted from torchvision
give the same activations, and so that every shape matches the published architecture tables.
"""

from __future__ import annotations

import math
import os
from functools import partial, reduce
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxnets.cpu import ynnpack_convolutions

__all__ = [
    "BatchNorm",
    "LocalResponseNorm",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "GlobalAvgPool",
    "pool_output_size",
    "padding",
    "InputTooSmallError",
    "conv_general_dilated",
    "dot_general",
    "Conv",
    "Dense",
]


class InputTooSmallError(ValueError):
    """Raised while tracing a model when its input is too small for some layer's window."""


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class LocalResponseNorm(nn.Module):
    """Local Response Normalization across channels (Krizhevsky, Sutskever, Hinton 2012, section 3.3).

    ``y_c = x_c / (k + a * sum_{j in window(c)} x_j**2) ** beta`` where the window holds ``size`` adjacent
    channels centred on ``c`` and clipped at the first and last channel (zeros beyond them).

    Two conventions for ``a`` exist and both are common:

    * ``convention="paper"`` (also TensorFlow's ``tf.nn.local_response_normalization``): ``a = alpha``.
      The 2012 paper's constants are ``k=2, size=5, alpha=1e-4, beta=0.75``; TensorFlow's ``depth_radius``
      is ``(size - 1) // 2`` (see :meth:`from_tensorflow`).
    * ``convention="torch"`` (PyTorch's ``nn.LocalResponseNorm`` and Caffe's LRN layer): ``a = alpha / size``.

    For an even ``size`` the window follows PyTorch: ``size // 2`` channels before ``c`` and
    ``(size - 1) // 2`` after. The sum over the window is a `lax.reduce_window` over the channel axis: one
    vectorised op, exact (no cumulative-sum cancellation), with JAX's own gradient.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    convention: Literal["paper", "torch"] = "paper"

    @classmethod
    def from_tensorflow(
        cls, depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5, **kwargs
    ) -> "LocalResponseNorm":
        """Build the layer from `tf.nn.local_response_normalization`'s arguments (same defaults)."""
        return cls(size=2 * depth_radius + 1, alpha=alpha, beta=beta, k=bias, convention="paper", **kwargs)

    @classmethod
    def from_torch(
        cls, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs
    ) -> "LocalResponseNorm":
        """Build the layer from `torch.nn.LocalResponseNorm`'s arguments (same defaults)."""
        return cls(size=size, alpha=alpha, beta=beta, k=k, convention="torch", **kwargs)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.size < 1:
            raise ValueError(f"LocalResponseNorm needs size >= 1, got {self.size}.")
        if self.convention not in ("paper", "torch"):
            raise ValueError(f"LocalResponseNorm convention must be 'paper' or 'torch', got {self.convention!r}.")
        # Square and sum in at least float32: bfloat16 squares of large activations lose the small ones.
        compute = jnp.promote_types(x.dtype, jnp.float32)
        squares = jnp.square(x.astype(compute))
        before, after = self.size // 2, (self.size - 1) // 2
        window = (1,) * (x.ndim - 1) + (self.size,)
        padding = ((0, 0),) * (x.ndim - 1) + ((before, after),)
        sums = lax.reduce_window(squares, np.array(0, compute), lax.add, window, (1,) * x.ndim, padding)
        alpha = self.alpha / self.size if self.convention == "torch" else self.alpha
        scale = (self.k + alpha * sums) ** -self.beta
        return (x.astype(compute) * scale).astype(x.dtype)


def pool_output_size(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of one spatial axis under PyTorch's pooling rule (documented in `nn.MaxPool2d`)."""
    span = size + 2 * padding - window
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    # With ceil_mode the last window must start inside the input or its left padding, never in the
    # right padding alone.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool(x, kind, window, stride, padding, ceil_mode, count_include_pad=True):
    window, stride, padding = _pair(window), _pair(stride), _pair(padding)
    pads = []
    for axis in range(2):
        size = x.shape[1 + axis]
        out = pool_output_size(size, window[axis], stride[axis], padding[axis], ceil_mode)
        if out < 1:
            raise InputTooSmallError(
                f"pooling window {window[axis]} does not fit an input of size {size} (padding {padding[axis]})"
            )
        right = (out - 1) * stride[axis] + window[axis] - size - padding[axis]
        pads.append((padding[axis], max(right, 0)))
    dims, strides = (1, *window, 1), (1, *stride, 1)
    full_pads = ((0, 0), *pads, (0, 0))
    if kind == "max":
        if not cpu_gradients():
            return _max_pool_reference(x, tuple(window), tuple(stride), tuple(pads))
        return _max_pool(x, tuple(window), tuple(stride), tuple(pads))
    sums = lax.reduce_window(x, np.array(0, x.dtype), lax.add, dims, strides, full_pads)
    if count_include_pad and not ceil_mode:
        return sums / (window[0] * window[1])
    # PyTorch divides by the window's overlap with the padded input (count_include_pad) or with the
    # input alone; the extra ceil_mode padding on the right is never counted.
    if count_include_pad:
        # Count the explicit padding as part of the input, but not what ceil_mode adds beyond it.
        ones = jnp.ones((1, x.shape[1] + 2 * padding[0], x.shape[2] + 2 * padding[1], 1), x.dtype)
        count_pads = [(0, max(right - left, 0)) for left, right in pads]
    else:
        ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
        count_pads = pads
    counts = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, dims, strides, ((0, 0), *count_pads, (0, 0)))
    return sums / counts


def cpu_gradients() -> bool:
    """Whether max pooling, convolutions and dense layers use the hand-written gradients that are faster
    on XLA's CPU backend (`MaxPool`, `conv_general_dilated`, `dot_general`): only when JAX's default
    backend is the CPU, and unless ``FLAXNETS_XLA_GRADIENTS=1``. They are `jax.custom_vjp` functions, so
    forward-mode differentiation (`jax.jvp`, `jax.jacfwd`, Hessians) does not pass through them; set that
    variable (before tracing) to get XLA's own gradients, which support it, everywhere. GPUs and TPUs
    always use XLA's."""
    return jax.default_backend() == "cpu" and os.environ.get("FLAXNETS_XLA_GRADIENTS", "0") in ("", "0")


def _max_pool_reference(x, window, stride, pads):
    # numpy constants, not traced values: JAX then recognises the max monoid and uses reduce_window_max.
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, *window, 1), (1, *stride, 1),
                             ((0, 0), *pads, (0, 0)))


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


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, pads):
    """Max pooling whose gradient goes, like XLA's select-and-scatter and PyTorch's, to the first maximum of
    each window (row-major), computed without select-and-scatter: XLA's CPU backend runs that as a scalar
    loop, which made the max-pool gradient the largest single cost of a ResNet train step on a CPU (0.49 s
    against 0.04 s for the forward pooling, 8x112x112x64 input). Here the forward pass remembers which tap
    won and the backward pass adds each tap's share with strided pads: vectorised, fused loops.

    The pooling itself is the elementwise maximum of the window's strided views, which XLA fuses into
    one loop: 8x faster than `lax.reduce_window` for AlexNet's 3x3 stride-2 pooling (1.2 ms against
    10 ms, batch 32), and, with YNNPACK running reductions (`flaxnets.cpu`), it keeps YNNPACK from
    taking the last pooling and the dense layers behind it into one slow fusion (VGG-11 inference,
    batch 32: 4.3 s against 2.9 s)."""
    return reduce(lax.max, _window_views(x, window, stride, pads)[1])


def _stored_once(witness, keep, recompute, *operands):
    """``keep(*operands)``, passed through a conditional so that XLA's CPU fusion stores the result once.

    XLA's CPU fusion copies a cheap elementwise chain into every consumer that reads its result, and it
    drops `lax.optimization_barrier` before fusing; a conditional is an edge it does not fuse across.
    ``recompute(*operands)`` is the other branch and must give the same array, so the result never
    depends on the predicate, which only has to be opaque to the compiler: the first element of the
    floating-point ``witness`` equals itself (false only when it is NaN). Empty arrays pass straight.
    """
    if not witness.size:
        return keep(*operands)
    corner = witness[(0,) * witness.ndim]
    return lax.cond(corner == corner, keep, recompute, *operands)


def _max_and_winner(x, window, stride, pads):
    padded_shape, views = _window_views(x, window, stride, pads)
    best, winner = views[0], jnp.zeros(views[0].shape, jnp.int8 if len(views) < 128 else jnp.int32)
    for tap, view in enumerate(views[1:], start=1):
        better = view > best  # strictly greater: the first maximum keeps the gradient on ties
        best = lax.max(best, view)
        winner = jnp.where(better, jnp.asarray(tap, winner.dtype), winner)
    return best, winner, padded_shape


def _max_pool_forward(x, window, stride, pads):
    best, winner, padded_shape = _max_and_winner(x, window, stride, pads)
    # The backward pass reads each winner once per window tap; unstored, XLA's CPU fusion would rebuild
    # the compare-and-select chain in every one of those reads. GoogLeNet's 3x3 stride-1 pooling
    # (32x28x28x192), forward and backward: 157 ms -> 12 ms.
    winner = _stored_once(best, lambda w, v: w, lambda w, v: _max_and_winner(v, window, stride, pads)[1],
                          winner, x)
    return best, (winner, x.shape, padded_shape)


def _max_pool_backward(window, stride, pads, residuals, grad):
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


_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
# Below this many input channels XLA's own kernel gradient is faster (a stem's 3 colour channels).
_GEMM_MIN_CHANNELS = 32
# Above this many bytes of im2col patches the kernel gradient runs one matmul per kernel tap instead.
_IM2COL_MAX_BYTES = 128 * 2**20


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """`jax.lax.conv_general_dilated` with a faster kernel gradient on a CPU that uses YNNPACK, for
    `flax.linen.Conv`.

    The same convolution and the same gradients (up to float32 summation order). When XLA's CPU backend
    runs convolutions with YNNPACK (jaxlib's default, see `flaxnets.cpu`), it computes the kernel gradient
    of a 2-D convolution as a convolution whose window is the whole feature map, at a quarter to a half
    of the speed of the forward convolutions (VGG-11 train step, batch 4: 2.5 s of 5.0 s). For an NHWC
    convolution with at least 32 input channels and no dilation or groups, the kernel gradient is then
    one matrix product of im2col patches with the output gradient (one product per kernel tap when the
    patches would be large). With Eigen (`flaxnets.cpu.prefer_eigen`, as ``python -m train`` runs) XLA's
    own kernel gradient is 1.4-2.6x faster than that product for larger kernels and is kept, but not for
    1x1 kernels: XLA transposes the activations to put channels first (0.9 s for one 32x56x56x256
    tensor in a ResNet-50 train step), where the product of the activations with the output gradient
    needs no copy (2.0-2.7x faster alone). Other platforms keep XLA's own gradient
    (`lax.platform_dependent`), as do all other convolutions.

    On a CPU every floating-point input is also handed to the backward pass as a stored array, not as
    the elementwise chain that made it, which XLA would otherwise recompute inside the kernel gradient's
    transposed copy (`_stored`; ResNet-18 train step 2,082 -> 1,940 ms, ResNet-50 7.0 -> 6.4 s).
    """
    plain = (
        lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1 and precision is None
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
        and rhs.shape[2] >= _GEMM_MIN_CHANNELS and lhs.dtype == rhs.dtype and cpu_gradients()
        and (ynnpack_convolutions() or rhs.shape[:2] == (1, 1))
    )
    if cpu_gradients() and jnp.issubdtype(lhs.dtype, jnp.floating):
        lhs = _stored(lhs)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads)


@jax.custom_vjp
def _stored(x):
    """``x`` itself; under differentiation, ``x`` stored once for the backward pass to read (see below)."""
    return x


def _stored_forward(x):
    # A convolution's kernel gradient reads its input through a transposed copy (channels first). XLA's
    # CPU fusion rebuilds that input inside the copy from whatever cheap elementwise chain made it (in a
    # ResNet, BatchNorm, ReLU and the residual sums of every earlier block of the stage), in the copy's
    # transposed order: 63 ms for one 32x56x56x64 input of ResNet-18 where the copy alone takes 3 ms.
    # `_stored_once` stores it; its second branch is an exact identity (rounding to the dtype's own
    # precision). Only the differentiated forward pass has it: inference and the primal function are
    # untouched.
    info = jnp.finfo(x.dtype)
    return _stored_once(x, lambda v: v, lambda v: lax.reduce_precision(v, info.nexp, info.nmant), x), None


def _stored_backward(_, g):
    return (g,)


_stored.defvjp(_stored_forward, _stored_backward)


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


def _kernel_grad_xla(x, g, kernel_shape, strides, pads):
    w = jnp.zeros(kernel_shape, x.dtype)
    return jax.vjp(lambda k: _plain_conv(x, k, strides, pads), w)[1](g)[0]


def _conv_nhwc_backward(strides, pads, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda v: _plain_conv(v, w, strides, pads), x)[1](g)[0]
    dw = lax.platform_dependent(x, g, cpu=partial(_kernel_grad_gemm, kernel_shape=w.shape, strides=strides, pads=pads),
                                default=partial(_kernel_grad_xla, kernel_shape=w.shape, strides=strides, pads=pads))
    return dx, dw.astype(w.dtype)


_conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` with a faster input gradient on CPU, for `flax.linen.Dense`.

    The same product and the same gradients (up to float32 summation order). A dense layer's input
    gradient ``g @ kernel.T`` contracts the kernel over its last axis; XLA's CPU backend (with YNNPACK
    off, see `flaxnets.cpu`) ran that 6-7x slower than the forward product (AlexNet's first dense layer,
    batch 32: 135 ms against 21 ms). On a CPU it is instead computed as a 1x1 convolution that treats the
    kernel as a one-row image with ``features`` channels and the output gradient as the filter bank
    (18 ms; as fast with YNNPACK on). Only the plain dense contraction (last axis of ``lhs`` with the first
    of a 2-D ``rhs``) is rewritten; everything else is `lax.dot_general` as called.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (
        rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
        and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None
        and not kwargs and lhs.dtype == rhs.dtype and cpu_gradients()
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


class Dense(nn.Dense):
    """`flax.linen.Dense` with flaxnets' CPU input gradient (`dot_general`): the same fields, parameters
    (``kernel``, ``bias``), initialisers and results."""

    dot_general: Any = dot_general

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias


class Conv(nn.Conv):
    """`flax.linen.Conv` for 2-D NHWC input with flaxnets' CPU kernel gradient (`conv_general_dilated`):
    the same fields, parameters (``kernel``, ``bias``), initialisers and results.

    Covers what the classic CNNs use: a batch of images, explicit or "SAME"/"VALID" padding, strides,
    dilation and feature groups. Masks, unshared weights and circular, reflect or causal padding are
    refused (`flax.linen.Conv` has them).
    """

    conv_general_dilated: Any = conv_general_dilated

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        padding = nn.linear.canonicalize_padding(self.padding, len(kernel_size))
        if inputs.ndim != 4 or len(kernel_size) != 2 or self.mask is not None or not self.shared_weights or (
                isinstance(padding, str) and padding not in ("SAME", "VALID")):
            raise ValueError(f"flaxnets.layers.Conv takes 2-D NHWC input with shared weights, no mask and explicit, "
                             f"'SAME' or 'VALID' padding (got input shape {inputs.shape}, kernel {kernel_size}, "
                             f"padding {self.padding!r}); use flax.linen.Conv for the rest.")
        groups = self.feature_group_count
        kernel = self.param("kernel", self.kernel_init, kernel_size + (inputs.shape[-1] // groups, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _pair(1 if self.strides is None else self.strides)
        y = self.conv_general_dilated(
            inputs, kernel, strides, padding,
            lhs_dilation=_pair(1 if self.input_dilation is None else self.input_dilation),
            rhs_dilation=_pair(1 if self.kernel_dilation is None else self.kernel_dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=self.precision)
        return y if bias is None else y + bias


class MaxPool(nn.Module):
    """`torch.nn.MaxPool2d` on NHWC input: explicit padding (with -inf) and `ceil_mode`."""

    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = self.window if self.stride is None else self.stride
        return _pool(x, "max", self.window, stride, self.padding, self.ceil_mode)


class AvgPool(nn.Module):
    """`torch.nn.AvgPool2d` on NHWC input: explicit zero padding, `ceil_mode`, `count_include_pad`."""

    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = self.window if self.stride is None else self.stride
        return _pool(x, "avg", self.window, stride, self.padding, self.ceil_mode, self.count_include_pad)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """Averaging matrix (out, size) of `AdaptiveAvgPool`: bin i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class AdaptiveAvgPool(nn.Module):
    """`torch.nn.AdaptiveAvgPool2d` on NHWC input, for any input size (smaller inputs are replicated).

    Written as two small averaging matrices so that it is one fused contraction for any pair of sizes;
    when the input already has the output size it is the identity, as in PyTorch.
    """

    output_size: int | tuple[int, int]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_h, out_w = _pair(self.output_size)
        _, h, w, _ = x.shape
        if (h, w) == (out_h, out_w):
            return x
        if h % out_h == 0 and w % out_w == 0:
            return _pool(x, "avg", (h // out_h, w // out_w), (h // out_h, w // out_w), 0, False)
        rows = jnp.asarray(_adaptive_matrix(h, out_h), x.dtype)
        cols = jnp.asarray(_adaptive_matrix(w, out_w), x.dtype)
        return jnp.einsum("nhwc,ph,qw->npqc", x, rows, cols)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, keeping (N, C): `AdaptiveAvgPool2d(1)` followed by `flatten`."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.mean(x, axis=(1, 2))


def padding(p: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric ``padding=p`` of a 2-D convolution as `flax.linen.Conv` padding.

    Flax's ``"SAME"`` pads stride-2 convolutions on even inputs asymmetrically (0 before, 1 after), which
    shifts every window by one pixel relative to PyTorch; explicit pairs keep the two frameworks equal.
    """
    ph, pw = _pair(p)
    return ((ph, ph), (pw, pw))


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last (Ioffe and Szegedy 2015), as `torch.nn.BatchNorm2d` does it.

    A drop-in for `flax.linen.BatchNorm` (same variable names: params ``scale``/``bias``, batch_stats
    ``mean``/``var``) that departs from it in two ways, both to follow PyTorch:

    * the running variance is updated with the unbiased batch variance (``n / (n - 1)`` times the biased
      one used to normalise), so running statistics after a step equal torchvision's;
    * the variance is computed in two passes, ``mean((x - mean)**2)``, not as ``mean(x**2) - mean**2``,
      which loses precision when activations have a large mean.

    Statistics are computed in float32 whatever ``dtype`` is. With ``axis_name`` set (under
    ``shard_map``/``pmap``) the mean and variance are averaged over that device axis, so every device
    normalises with the statistics of the whole global batch. ``momentum`` is flax's (the weight of the old
    running value): PyTorch's ``momentum=0.1`` is ``0.9`` here.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xc = x.astype(compute)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            # Flax initialises outside any device mapping, so collectives only run once initialised.
            synced = self.axis_name is not None and not self.is_initializing()
            mean = jnp.mean(xc, axes)
            if synced:
                mean = lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xc - mean), axes)
            if synced:
                var = lax.pmean(var, self.axis_name)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1]) * (lax.psum(1, self.axis_name) if synced else 1)
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        y = (xc - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype or x.dtype)
