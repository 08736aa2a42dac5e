"""Layers the classic CNNs need and `flax.linen` does not ship, written to PyTorch's semantics.

Everything here takes NHWC input and is plain JAX, so every transformation works through it. Pooling
follows `torch.nn.MaxPool2d` / `AvgPool2d` / `AdaptiveAvgPool2d` exactly (explicit padding,
`ceil_mode`), so that weights converted from torchvision give the same activations, and so that every
shape matches the published architecture tables. `Ops` names the layers a model builds its
convolutions, dense layers and max pooling with (`PLAIN` by default; `flaxnets.cpu.ops` for XLA's CPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "BatchNorm",
    "LocalResponseNorm",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "GlobalAvgPool",
    "Ops",
    "PLAIN",
    "max_pool",
    "pool_output_size",
    "padding",
    "InputTooSmallError",
    "BatchTooSmallError",
]


class InputTooSmallError(ValueError):
    """Raised while tracing a model when its input is too small for some layer's window."""


class BatchTooSmallError(ValueError):
    """Raised while tracing a training step whose batch gives a `BatchNorm` one value per channel."""


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


def _pool_pads(x, window, stride, padding, ceil_mode) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (before, after) padding of both spatial axes that gives PyTorch's output size."""
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
    return tuple(pads)


def max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
             pads: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
    """Max pooling of NHWC ``x`` padded with -inf by ``pads``: `lax.reduce_window` with `lax.max`, whose
    gradient goes to the first maximum of each window, as PyTorch's does."""
    # numpy constants, not traced values: JAX then recognises the max monoid and uses reduce_window_max,
    # which every transformation (jvp and batching included) knows.
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


def _avg_pool(x, window, stride, padding, ceil_mode, count_include_pad=True):
    window, stride, padding = _pair(window), _pair(stride), _pair(padding)
    pads = _pool_pads(x, window, stride, padding, ceil_mode)
    dims, strides = (1, *window, 1), (1, *stride, 1)
    sums = lax.reduce_window(x, np.array(0, x.dtype), lax.add, dims, strides, ((0, 0), *pads, (0, 0)))
    if count_include_pad and not ceil_mode:
        return sums / (window[0] * window[1])
    # PyTorch divides by the window's overlap with the padded input (count_include_pad) or with the
    # input alone; the extra ceil_mode padding on the right is never counted.
    if count_include_pad:
        ones = jnp.ones((1, x.shape[1] + 2 * padding[0], x.shape[2] + 2 * padding[1], 1), x.dtype)
        count_pads = [(0, max(right - left, 0)) for left, right in pads]
    else:
        ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
        count_pads = pads
    counts = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, dims, strides, ((0, 0), *count_pads, (0, 0)))
    return sums / counts


class MaxPool(nn.Module):
    """`torch.nn.MaxPool2d` on NHWC input: explicit padding (with -inf) and `ceil_mode`.

    ``max_pool`` computes the pooling from the input, the window, the strides and the explicit
    ``((top, bottom), (left, right))`` padding; `None` is `flaxnets.layers.max_pool`. It plays the part
    of `flax.linen.Conv`'s ``conv_general_dilated`` field: another implementation of the same operation
    (a kernel set such as `flaxnets.cpu.ops` passes one).
    """

    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False
    max_pool: Callable[..., jnp.ndarray] | None = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        window = _pair(self.window)
        stride = window if self.stride is None else _pair(self.stride)
        pads = _pool_pads(x, window, stride, _pair(self.padding), self.ceil_mode)
        return (self.max_pool or max_pool)(x, window, stride, pads)


class AvgPool(nn.Module):
    """`torch.nn.AvgPool2d` on NHWC input: explicit zero padding, `ceil_mode`, `count_include_pad`."""

    window: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = self.window if self.stride is None else self.stride
        return _avg_pool(x, self.window, stride, self.padding, self.ceil_mode, self.count_include_pad)


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
            return _avg_pool(x, (h // out_h, w // out_w), (h // out_h, w // out_w), 0, False)
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
    ``mean``/``var``). Like PyTorch, the running variance is updated with the unbiased batch variance
    (``n / (n - 1)`` times the biased one used to normalise), so running statistics after a step equal
    torchvision's.

    The batch statistics take one pass over the input: the mean and the mean square of ``x - shift`` are
    reduced together, ``shift`` being the running mean (its gradient stopped), and the variance is their
    difference of squares. Subtracting a prior estimate of the mean keeps that difference exact to
    float32 rounding times ``(mean - shift)**2 / var``, which is small once the running mean tracks the
    batch's (and the "shifted data" algorithm of Chan, Golub and LeVeque 1983, "Algorithms for computing
    the sample variance"); PyTorch's two passes (mean, then the mean squared deviation) read every
    activation once more. Normalisation is one multiply-add per element, ``x * inv + (bias - mean * inv)``
    with ``inv = scale / sqrt(var + epsilon)``. benchmarks/RESULTS.md ("GPU") has the formulations measured.

    Statistics and the multiply-add are computed in at least float32 whatever ``dtype`` is, and kept
    (with ``scale`` and ``bias``) in ``param_dtype`` raised to at least float32: float64 under
    ``jax_enable_x64`` when asked for, float32 for bfloat16 parameters; only the output is cast to
    ``dtype``. With ``axis_name`` set (under ``shard_map``/``pmap``) both moments are averaged over that
    device axis in one collective, so every device normalises with the statistics of the whole global
    batch. ``momentum`` is flax's (the weight of the old running value): PyTorch's ``momentum=0.1`` is
    ``0.9`` here. As in PyTorch, training refuses a batch with one value per channel (a batch of 1 whose
    map is 1x1: `BatchTooSmallError`) and an empty batch leaves the statistics unchanged; initialisation
    and inference take any batch.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        kept = jnp.promote_types(self.param_dtype, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), kept)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), kept)
        scale = self.param("scale", self.scale_init, (features,), kept)
        bias = self.param("bias", self.bias_init, (features,), kept)
        compute = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), kept)
        xc = x.astype(compute)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            # Flax initialises outside any device mapping, so collectives only run once initialised.
            synced = self.axis_name is not None and not self.is_initializing()
            shift = lax.stop_gradient(running_mean.value).astype(compute)
            deviation = xc - shift
            moments = (jnp.mean(deviation, axes), jnp.mean(jnp.square(deviation), axes))
            if synced:
                moments = lax.pmean(moments, self.axis_name)
            mean = shift + moments[0]
            var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0)
            if not self.is_initializing():
                # Values per channel over the whole batch: a static int (psum of a constant is the axis size).
                count = math.prod(x.shape[:-1]) * (lax.psum(1, self.axis_name) if synced else 1)
                if count == 1:  # the variance would be 0 and every output ``bias``: refused, as PyTorch does
                    raise BatchTooSmallError(f"BatchNorm in training mode needs more than one value per channel, "
                                             f"got input of shape {tuple(x.shape)}: train with a batch of 2 or more, "
                                             "or a larger input.")
                if count:  # an empty batch (its moments NaN) leaves the statistics as they were, as in PyTorch
                    unbiased = var * (count / (count - 1))
                    running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                    running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        inv = scale * lax.rsqrt(var + self.epsilon)
        return (xc * inv + (bias - mean * inv)).astype(self.dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The constructors a model builds its convolutions, dense layers and max pooling with.

    Every model takes one as its ``ops`` field. The default, `PLAIN`, is `flax.linen.Conv`,
    `flax.linen.Dense` and `MaxPool`: standard JAX operations that every transformation (``grad``,
    ``jvp``, ``vmap``, ``remat``, sharding) handles on every backend. Another set must build layers with
    the same parameters and results; `flaxnets.cpu.ops` is one, with gradients that XLA's CPU backend
    runs faster, passed by the caller who asks for it: ``create_model(..., ops=flaxnets.cpu.ops())``.
    """

    conv: Callable[..., nn.Module] = nn.Conv
    dense: Callable[..., nn.Module] = nn.Dense
    max_pool: Callable[..., nn.Module] = MaxPool


PLAIN = Ops()
