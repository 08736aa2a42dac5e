"""Which libraries XLA's CPU backend runs a network with, and how flaxnets adapts to them.

jaxlib 0.10 hands a CPU program's convolutions, dot products and reductions to YNNPACK by default. The
debug option ``--xla_cpu_experimental_ynn_fusion_type`` lists what YNNPACK takes; whatever it does not
take, XLA runs itself, with Eigen for convolutions and dot products. Measured on this project's CPU
(2 cores with AVX-512, float32, batch 8-32; `benchmarks/RESULTS.md`):

* Eigen's convolutions are faster than YNNPACK's: forward 1.1-1.9x, input gradients 1.1-2.5x, kernel
  gradients 2.0-3.3x, at or above PyTorch's (oneDNN's) speed for stride-1 layers.
* YNNPACK's reductions are faster than XLA's own: BatchNorm forward and backward on 32x56x56x64, 40 ms
  against 162 ms; a bias gradient over 32x55x55x64, 0.8 ms against 20 ms.

So `prefer_eigen` sets the option to ``reduce``: YNNPACK for reductions, Eigen for the rest. Against
YNNPACK for everything, that took ResNet-18's train step from 0.58x PyTorch's speed to 0.92-1.13x and
VGG-11's from 0.98x to 1.10-1.30x (three runs). What YNNPACK did well and Eigen does not is done
another way in `flaxnets.layers`: a dense layer's input gradient (`dot_general`), 1x1 kernel gradients
(`conv_general_dilated`) and max pooling (`MaxPool`, which also keeps YNNPACK's reduction fusion away
from the pooling and the dense layers behind it).

Whichever library runs, XLA's CPU compiler also needs three fences, since it drops
`lax.optimization_barrier` before fusion and copy insertion: max pooling stores its winning taps and
convolutions their inputs once for the backward pass (`flaxnets.layers`), instead of having fusion
rebuild them at every read, and the trainer's step ties the gradients together so that parameters are
updated in place without copies (`train.step`).

The option is read once, when JAX starts its CPU backend, so it has to be in ``XLA_FLAGS`` before then:
`prefer_eigen` puts it there (``python -m train`` and the benchmarks call it first thing) and leaves the
variable alone when it already names the option, so a user's own choice wins. Code traced later reads
the same variable (`ynnpack_convolutions`) to pick the kernel gradient that is fast with the library in
use: XLA's own with Eigen, an im2col matrix product with YNNPACK.
"""

from __future__ import annotations

import os

__all__ = ["EIGEN_SETTING", "YNN_OPTION", "prefer_eigen", "ynnpack_convolutions"]

YNN_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
# YNNPACK keeps the reductions (BatchNorm's statistics, bias gradients), which XLA's own CPU code runs
# 4-25x slower; convolutions and dot products go to Eigen.
EIGEN_SETTING = f"{YNN_OPTION}=reduce"


def _option_value(flags: str) -> str | None:
    """The value of the last ``--xla_cpu_experimental_ynn_fusion_type=...`` in ``flags``, or None."""
    value = None
    for token in flags.split():
        if token.startswith(YNN_OPTION + "="):
            value = token[len(YNN_OPTION) + 1:]
    return value


def prefer_eigen() -> bool:
    """Route this process's CPU convolutions and matrix products to Eigen, leaving reductions to YNNPACK.

    Appends ``--xla_cpu_experimental_ynn_fusion_type=reduce`` to ``XLA_FLAGS`` (YNNPACK for reductions
    only) unless the variable already sets that option. Returns whether Eigen runs this process's CPU
    convolutions: False when the option names YNNPACK convolutions, or when JAX's backends already
    started (then nothing is changed, since XLA would not read the variable again and traced code would
    misjudge the library in use).
    """
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if _option_value(flags) is not None:
        return not ynnpack_convolutions()
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_SETTING}".strip()
    return True


def ynnpack_convolutions() -> bool:
    """Whether XLA's CPU backend runs convolutions with YNNPACK, judged from ``XLA_FLAGS`` as it is now.

    True for jaxlib's default (the option absent) and when the option lists ``individual_convolution``
    (alone or as ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``); False when it is set without it.
    """
    value = _option_value(os.environ.get("XLA_FLAGS", ""))
    if value is None:
        return True
    kinds = [kind.strip().lower() for kind in value.split(",") if kind.strip()]
    return any(kind.removeprefix("library_fusion_type_") == "individual_convolution" for kind in kinds)

