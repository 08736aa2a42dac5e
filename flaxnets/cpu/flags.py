"""Which libraries XLA's CPU backend runs a network with: `prefer_eigen` and `ynnpack_convolutions`.

jaxlib 0.10 hands a CPU program's convolutions, dot products and reductions to YNNPACK by default. The
debug option ``--xla_cpu_experimental_ynn_fusion_type`` lists what YNNPACK takes; whatever it does not
take, XLA runs itself, with Eigen for convolutions and dot products. `prefer_eigen` sets it to
``reduce`` (YNNPACK for reductions, Eigen for the rest; `flaxnets.cpu` says what that buys).

The option is read once, when JAX starts its CPU backend, so it has to be in ``XLA_FLAGS`` before then:
`prefer_eigen` puts it there (``python -m train`` and the benchmarks call it first thing) and leaves the
variable alone when it already names the option, so a user's own choice wins. `ynnpack_convolutions`
reads the variable back; `flaxnets.cpu.ops` calls it once, when it builds a kernel set, to pick the
kernel gradient that suits the library in use.
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

