"""How the compiled steps are built on each backend, and kept between runs: the one place that decides it.

`step_settings()` is read where a run or a benchmark is built (`train.run.build_run`, which keeps it as
`Run.settings` and hands it to the run's driver, and `benchmarks.common.build_step`): the kernel set the
models are built with, whether the optimizer fences the gradients, and the compiler options and matmul
precision the step is compiled with (`train.parallel`'s drivers read it there only when given none).

* On a CPU, `CPU_SETTINGS`: `flaxnets.cpu`'s kernel set and gradient fence.
* On a GPU, `GPU_SETTINGS`: `flaxnets.gpu`'s kernel set, and what the GPU run's ``tune`` step measured
  best (``python -m benchmarks.gpu tune``, part of ``benchmarks/gpu_run.sh``, times ResNet-50's bfloat16
  train step under each variant and prints the winner as the line to put here; benchmarks/RESULTS.md,
  "GPU", records it).
* Elsewhere (TPU), the plain library and JAX's defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Literal, Mapping

import jax

__all__ = ["StepSettings", "CPU_SETTINGS", "GPU_SETTINGS", "step_settings", "enable_compilation_cache"]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Options of a compiled step that do not change its mathematics beyond rounding.

    Attributes:
      compiler_options: XLA options of the step's executable alone (``jax.jit(..., compiler_options=...)``),
        e.g. ``{"xla_gpu_enable_latency_hiding_scheduler": True}``.
      matmul_precision: `jax.default_matmul_precision` while the step is traced (``"bfloat16"``,
        ``"tensorfloat32"``, ``"float32"``), or None for JAX's default.
      kernels: the kernel set models are built with (a model's ``ops``): ``"cpu"`` (`flaxnets.cpu.ops`,
        with its gradient fence in the optimizer), ``"gpu"`` (`flaxnets.gpu.ops`) or ``"plain"``.
    """

    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    matmul_precision: str | None = None
    kernels: Literal["plain", "cpu", "gpu"] = "plain"

    def ops(self):
        """The kernel set `kernels` names (`flaxnets.layers.PLAIN` for ``"plain"``)."""
        if self.kernels == "cpu":
            import flaxnets.cpu

            return flaxnets.cpu.ops()
        if self.kernels == "gpu":
            import flaxnets.gpu

            return flaxnets.gpu.ops()
        import flaxnets.layers

        return flaxnets.layers.PLAIN

    @property
    def fence(self) -> bool:
        """Whether the optimizer orders every gradient before the parameter updates (`flaxnets.cpu.tie_gradients`)."""
        return self.kernels == "cpu"

    def describe(self) -> str | None:
        """One line for a run's log saying what these settings turn on; None when they are the plain defaults."""
        if self.kernels == "cpu":
            import flaxnets.cpu

            return flaxnets.cpu.describe()
        if self.kernels == "gpu" or self.compiler_options or self.matmul_precision:
            options = ", ".join(f"{k}={v}" for k, v in self.compiler_options.items())
            return ("XLA's GPU backend: flaxnets.gpu's kernels on (image stems folded space-to-depth, max pooling "
                    "without select-and-scatter)" + (f"; compiler options {options}" if options else "")
                    + (f"; matmul precision {self.matmul_precision}" if self.matmul_precision else "") + ".")
        return None

    def traced(self, fn: Callable) -> Callable:
        """``fn`` traced under `matmul_precision` (``fn`` itself when that is None)."""
        if self.matmul_precision is None:
            return fn

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with jax.default_matmul_precision(self.matmul_precision):
                return fn(*args, **kwargs)
        return wrapped


CPU_SETTINGS = StepSettings(kernels="cpu")
# From the GPU run's "tune" step (benchmarks/RESULTS.md, "GPU").
GPU_SETTINGS = StepSettings(compiler_options={}, matmul_precision=None, kernels="gpu")


def step_settings(backend: str | None = None) -> StepSettings:
    """The settings for ``backend`` (default: JAX's default backend): `CPU_SETTINGS` on a CPU,
    `GPU_SETTINGS` on a GPU, the plain defaults elsewhere."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return CPU_SETTINGS
    return GPU_SETTINGS if backend in ("gpu", "cuda", "rocm") else StepSettings()


def enable_compilation_cache() -> str | None:
    """Keep compiled steps on disk so a rerun (a resume, the next run of the same model) starts at once.

    XLA takes 10-30 s to compile a CNN's train step on a 2-core CPU and more on large models; the cache
    turns a rerun's wait into a file read. The folder is ``$JAX_COMPILATION_CACHE_DIR`` when set (an
    empty value turns the cache off), else ``xla`` in flaxnets' cache folder (`flaxnets.hub.cache_dir`:
    ``~/.cache/flaxnets``, or ``$FLAXNETS_CACHE_DIR``). Programs that compiled in under a second are not
    kept, unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets another threshold.
    """
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if folder is None:
        from flaxnets.hub import cache_dir

        folder = os.fspath(cache_dir() / "xla")
    if not folder:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own variable wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder
