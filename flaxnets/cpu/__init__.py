"""Opt-in speed for XLA's CPU backend: one kernel set, one gradient fence and one library flag.

The models in `flaxnets` are plain JAX; nothing here is used unless asked for, and ``import flaxnets``
does not import this module. ``python -m train`` and the benchmarks ask for all three when JAX's backend
is the CPU (`cpu_backend_ahead` before JAX starts, `is_cpu_backend` after), and say so in one line
(`describe`). In your own loop:

    flaxnets.cpu.prefer_eigen()                       # before JAX starts, if you can
    model = flaxnets.create_model("resnet18", num_classes=10, ops=flaxnets.cpu.ops())
    tx = optax.chain(flaxnets.cpu.tie_gradients(), optax.sgd(0.1, momentum=0.9))

The pieces, measured with jaxlib 0.10.2 on a 2-core AVX-512 machine, float32, batch 8-32
(benchmarks/RESULTS.md has the commands):

* `prefer_eigen` (`flaxnets.cpu.flags`) has XLA run convolutions and matrix products with Eigen and only
  reductions with YNNPACK (jaxlib's default gives YNNPACK all three). Eigen's convolutions are faster
  than YNNPACK's (forward 1.1-1.9x, input gradients 1.1-2.5x, kernel gradients 2.0-3.3x), YNNPACK's
  reductions faster than XLA's own (BatchNorm forward and backward on 32x56x56x64: 40 against 162 ms).
  Against YNNPACK for everything, ResNet-18's train step went from 0.58x PyTorch's speed to 0.92-1.13x.
* `ops` (`flaxnets.cpu.kernels`): convolutions, dense layers and max pooling with hand-written
  gradients where XLA's CPU code is slow: a max-pool gradient without select-and-scatter, a dense
  input gradient as a 1x1 convolution, 1x1 kernel gradients (all kernel gradients with YNNPACK) as
  one matrix product. Being `jax.custom_vjp` functions, they refuse forward-mode differentiation.
* Three fences against XLA's CPU fusion and copy insertion (`flaxnets.cpu.fences`), which drop
  `lax.optimization_barrier`: max pooling stores its winning taps and convolutions their inputs once
  for the backward pass (both inside `ops`), and `tie_gradients`, an optax transformation, orders every
  gradient before any in-place parameter update (AlexNet train step: 985 -> 912 ms).

Together they made train steps 1.27-1.88x faster than plain JAX (AlexNet, ResNet-18/50, VGG-11, GoogLeNet
at batch 32, 2 AMD EPYC cores, 2026-11-30); `benchmarks/RESULTS.md` has the figures against PyTorch with
the set on and off (``python -m benchmarks.vs_torch --kernels cpu|plain``) and the worth of each fence
(``python -m benchmarks.cpu_kernels``).
"""

from __future__ import annotations

import jax

import os

from flaxnets.cpu.fences import tie_gradients
from flaxnets.cpu.flags import (EIGEN_SETTING, YNN_OPTION, _option_value, cpu_backend_ahead, prefer_eigen,
                                ynnpack_convolutions)
from flaxnets.cpu.kernels import ops

__all__ = ["EIGEN_SETTING", "YNN_OPTION", "cpu_backend_ahead", "describe", "is_cpu_backend", "ops", "prefer_eigen",
           "tie_gradients", "ynnpack_convolutions"]


def is_cpu_backend() -> bool:
    """Whether JAX's default backend is the CPU: where ``python -m train`` and the benchmarks turn this
    module's kernels and fence on."""
    return jax.default_backend() == "cpu"


def describe() -> str:
    """One line saying what a run on XLA's CPU backend turns on: this module's kernel set and gradient fence,
    and which library runs the convolutions, with the ``XLA_FLAGS`` option that chose it."""
    value = _option_value(os.environ.get("XLA_FLAGS", ""))
    library = "YNNPACK" if ynnpack_convolutions() else "Eigen"
    why = f"{YNN_OPTION}={value} in XLA_FLAGS" if value is not None else f"jaxlib's default; {EIGEN_SETTING} picks Eigen"
    return f"XLA's CPU backend: flaxnets.cpu's kernels and gradient fence on, convolutions with {library} ({why})."
