"""Which libraries XLA's CPU backend runs a network with: `prefer_eigen` and `ynnpack_convolutions`.

jaxlib 0.10 hands a CPU program's convolutions, dot products and reductions to YNNPACK by default. The
debug option ``--xla_cpu_experimental_ynn_fusion_type`` lists what YNNPACK takes; whatever it does not
take, XLA runs itself, with Eigen for convolutions and dot products. `prefer_eigen` sets it to
``reduce`` (YNNPACK for reductions, Eigen for the rest; `flaxnets.cpu` says what that buys).

The option is read once, when JAX starts its CPU backend, so it has to be in ``XLA_FLAGS`` before then:
`prefer_eigen` puts it there and leaves the variable alone when it already names the option, so a user's
own choice wins. ``python -m train`` and the benchmarks call it first thing, but only when
`cpu_backend_ahead` says JAX will run on the CPU: an accelerator's run keeps ``XLA_FLAGS`` as it was.
`ynnpack_convolutions` reads the variable back; `flaxnets.cpu.ops` calls it once, when it builds a kernel
set, to pick the kernel gradient that suits the library in use.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil

__all__ = ["EIGEN_SETTING", "YNN_OPTION", "cpu_backend_ahead", "prefer_eigen", "ynnpack_convolutions"]

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


def cpu_backend_ahead() -> bool:
    """Whether JAX's default backend is, or will be when it starts, the CPU; decided without starting it.

    Once JAX has started, its default backend answers. Before, the CPU is ahead when ``JAX_PLATFORMS``
    (JAX's ``jax_platforms`` setting) names it first, or when nothing else can start: no PJRT plugin is
    installed (the ``jax_plugins`` namespace or entry points, ``PJRT_NAMES_AND_LIBRARY_PATHS``) and no
    ``libtpu``. With an accelerator's plugin installed and no platform named, only starting JAX would tell,
    too late for `prefer_eigen`; the answer is then False.
    """
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return jax.default_backend() == "cpu"
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


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

