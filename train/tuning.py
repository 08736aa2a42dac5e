"""How the compiled steps are built on a GPU: the table that the GPU run's tuning step fills.

`step_settings()` is read once where a step is compiled, by the trainer's drivers (`train.parallel`) and
by the benchmarks (`benchmarks.common.build_step`). On a GPU it returns `GPU_SETTINGS`; on any other
backend nothing (the CPU has its own opt-in, `flaxnets.cpu`).

`GPU_SETTINGS` is neutral (JAX's and XLA's defaults) until a GPU run measures better:
``python -m benchmarks.gpu_run tune`` (step 3 of ``benchmarks/gpu_run.sh``) times ResNet-50's bfloat16
train step under each variant and prints the winner as the line to put here, with what every variant
gave; benchmarks/RESULTS.md ("GPU") records it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax

__all__ = ["StepSettings", "GPU_SETTINGS", "step_settings"]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Options of a compiled step that do not change its mathematics beyond rounding.

    Attributes:
      compiler_options: XLA options of the step's executable alone (``jax.jit(..., compiler_options=...)``),
        e.g. ``{"xla_gpu_enable_latency_hiding_scheduler": True}``.
      matmul_precision: `jax.default_matmul_precision` while the step is traced (``"bfloat16"``,
        ``"tensorfloat32"``, ``"float32"``), or None for JAX's default.
    """

    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    matmul_precision: str | None = None

    def traced(self, fn: Callable) -> Callable:
        """``fn`` traced under `matmul_precision` (``fn`` itself when that is None)."""
        if self.matmul_precision is None:
            return fn

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with jax.default_matmul_precision(self.matmul_precision):
                return fn(*args, **kwargs)
        return wrapped


# Neutral until the first real GPU run: fill it from that run's "tune" step (benchmarks/RESULTS.md, "GPU").
GPU_SETTINGS = StepSettings(compiler_options={}, matmul_precision=None)


def step_settings(backend: str | None = None) -> StepSettings:
    """The settings for ``backend`` (default: JAX's default backend): `GPU_SETTINGS` on a GPU, else none."""
    backend = backend or jax.default_backend()
    return GPU_SETTINGS if backend in ("gpu", "cuda", "rocm") else StepSettings()
