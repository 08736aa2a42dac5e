"""What every benchmark shares: the conditions of a measurement, timing, device peaks and MFU, the
compiled steps that are measured, and where results are written: only into a folder the user names
(``--out DIR``), so that a benchmark run to try something never replaces the committed figures of
``benchmarks/results/`` (``--out benchmarks/results`` does, when asked).

A benchmarked step is the trainer's own `train.step.train_step` (forward, backward, SGD with momentum,
the old state donated) or a jitted inference ``apply``, on synthetic data that already lives on the
device, so the input pipeline is no part of the figure. Parameters are drawn with NumPy from their
abstract shapes (He-normal kernels, unit BatchNorm scales and variances): initialising through XLA would
compile a second program per model, which costs more than the benchmark itself on a small CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from flaxnets.cli import ModelRequest
    from train.tuning import StepSettings

__all__ = [
    "BenchmarkError",
    "Timing",
    "measure",
    "environment",
    "PEAK_TFLOPS",
    "peak_tflops",
    "mfu",
    "peak_rss_bytes",
    "synthetic_variables",
    "Step",
    "build_step",
    "add_out_option",
    "write_results",
    "run_cli",
    "parse_dtype",
    "as_request",
    "model_for",
    "markdown_table",
    "KERNEL_CHOICES",
    "add_kernels_option",
    "kernels_argument",
]

class BenchmarkError(ValueError):
    """A benchmark cannot run as asked (bad argument, too few devices); the message says why in one sentence."""


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's ``body``; a user error prints ``error: <sentence>`` on stderr and returns 2.

    When JAX will run on the CPU, its CPU backend is first given Eigen's convolutions and YNNPACK's
    reductions, as the trainer does (`flaxnets.cpu.prefer_eigen`), so the benchmarks measure what training
    runs; ``XLA_FLAGS`` naming the option overrides it.
    """
    from flaxnets.cli import ModelRequestError
    from flaxnets.cpu import cpu_backend_ahead, prefer_eigen
    from flaxnets.registry import UnknownModelError

    if cpu_backend_ahead():  # an accelerator's run keeps XLA_FLAGS as it was
        prefer_eigen()

    try:
        return body()
    except (BenchmarkError, UnknownModelError, ModelRequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def parse_dtype(name: str) -> Any:
    """``"float32"`` or ``"bfloat16"`` to the jax dtype."""
    import jax.numpy as jnp

    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise BenchmarkError(f"--dtype must be one of {', '.join(table)}, got {name!r}.")
    return table[name]


# ------------------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls, after the warm-up calls."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)

    def describe(self, unit: float = 1e3, suffix: str = "ms") -> str:
        """``"123.4 ms (min 120.0, max 130.2, n=5)"``."""
        return (f"{self.median * unit:.1f} {suffix} (min {self.min * unit:.1f}, max {self.max * unit:.1f}, "
                f"n={self.repeats})")


def measure(call: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Time ``call`` (which must wait for its own result, e.g. with ``block_until_ready``)."""
    if repeats < 1:
        raise BenchmarkError(f"--repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


# ------------------------------------------------------------------------------------------------------
# conditions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def environment(devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """The conditions of a run: device, host, load and versions, as a flat dict of strings and numbers."""
    import flax
    import jax
    import jaxlib
    import optax

    devices = list(devices) if devices is not None else jax.devices()
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": devices[0].platform,
        "device": devices[0].device_kind,
        "device_count": len(devices),
        "host_cpu": _cpu_model(),
        "host_cores": os.cpu_count(),
        "host_memory_gib": _memory_gib(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if env["platform"] == "cpu":
        from flaxnets.cpu import ynnpack_convolutions

        env["cpu_convolutions"] = "ynnpack" if ynnpack_convolutions() else "eigen"
    return env


# Dense (no structured sparsity) peak TFLOP/s of the tensor units, from the vendors' data sheets. For
# float32 the GPU figure is TF32's: XLA lets cuBLAS/cuDNN use TF32 for float32 matmuls and convolutions
# at JAX's default precision. On TPU, float32 at the default precision runs as bfloat16 passes, so its
# peak is bfloat16's. Keys are matched as substrings of `jax.Device.device_kind`, most specific first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float32": 494.7},  # SXM
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p reports itself as "TPU v5"
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's peak for this device and dtype name, or ``None`` for a device it does not know (a CPU)."""
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``devices`` times the per-device ``peak`` (TFLOP/s)."""
    if not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12 * devices)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ------------------------------------------------------------------------------------------------------
# the measured steps


def synthetic_variables(abstract: Any, seed: int = 0) -> Any:
    """Concrete variables for an abstract tree: He-normal kernels, ones for BatchNorm scales and running
    variances, zeros elsewhere. Values a trained network could hold, so no denormals or overflows slow
    or spoil a timing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) >= 2:
            std = math.sqrt(2.0 / max(math.prod(shape[:-1]), 1))
            value = rng.standard_normal(shape, dtype=np.float32) * std
        elif name in ("scale", "var"):
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, abstract)


@dataclasses.dataclass
class Step:
    """One compiled benchmark step and the data it runs on; ``run()`` executes it once and waits."""

    arch: str
    mode: str  # "train" or "infer"
    batch: int
    size: int
    dtype: str
    devices: int
    compiled: Any
    args: list
    lower_s: float
    compile_s: float
    model: Any
    kernels: str  # the kernel set the model is built with: "cpu", "gpu" or "plain" (train.tuning.StepSettings)

    def run(self, steps: int = 1) -> None:
        """Execute ``steps`` steps back to back and wait for the last; a train step feeds its new (donated)
        state into the next call. Waiting once, not after every step, keeps the device's queue full as a
        training loop does: a wait per step adds the host's dispatch time to every step."""
        import jax

        for _ in range(steps):
            out = self.compiled(*self.args)
            if self.mode == "train":
                self.args[0] = out[0]
        jax.block_until_ready(out)

    def cost(self) -> dict[str, float]:
        """XLA's cost analysis of the compiled step (``flops`` counts only the taps inside the padding)."""
        analysis = self.compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else {}
        return dict(analysis or {})

    def memory_bytes(self) -> int | None:
        """Peak device memory of the compiled step: arguments, outputs and temporaries, less what aliases."""
        from flaxnets.analysis import compiled_memory_bytes

        return compiled_memory_bytes(self.compiled)


KERNEL_CHOICES = ("auto", "cpu", "gpu", "plain")


def add_kernels_option(parser: Any) -> None:
    """``--kernels auto|cpu|gpu|plain``; `kernels_argument` turns its value into `build_step`'s ``kernels``."""
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                        help="flaxnets.cpu's kernel set and gradient fence ('cpu'), flaxnets.gpu's ('gpu'), plain JAX "
                             "('plain'), or the backend's own as python -m train takes it ('auto')")


def kernels_argument(value: str) -> str | None:
    """``--kernels``'s value as `build_step`'s ``kernels`` (None for "auto")."""
    return None if value == "auto" else value


def as_request(arch: str | ModelRequest, size: int | None = None) -> ModelRequest:
    """``arch`` as a `flaxnets.cli.ModelRequest` (a name is the architecture with every default), its input
    side replaced by ``size`` when given."""
    from flaxnets.cli import ModelRequest

    request = arch if isinstance(arch, ModelRequest) else ModelRequest(arch)
    return request if size is None else dataclasses.replace(request, input_size=size)


def model_for(arch: str | ModelRequest, dtype: Any, **overrides: Any):
    """The requested model (a registry name: with every default) at its class count, with torchvision's
    reference fields (GoogLeNet without auxiliary heads) unless its ``--model-arg`` options say otherwise."""
    request = as_request(arch)
    return request.build(dtype=dtype, **{**request.spec.reference_overrides, **request.options, **overrides})


def build_step(
    arch: str | ModelRequest,
    mode: str,
    batch: int,
    *,
    size: int | None = None,
    dtype: str = "float32",
    devices: int = 1,
    variables: Any = None,
    compiler_options: dict[str, Any] | None = None,
    seed: int = 0,
    kernels: str | None = None,
    ops: Any = None,
    tie_gradients: bool | None = None,
    settings: StepSettings | None = None,
    donate: bool = True,
) -> Step:
    """Compile ``arch``'s train step (``mode="train"``) or inference (``"infer"``) for one batch shape.

    ``arch`` is a registry name or a `flaxnets.cli.ModelRequest` (options, channels, classes, input side);
    ``size`` replaces its input side, by default the architecture's native one. With ``devices > 1`` the
    batch is split over a mesh of the first ``devices`` devices and the state replicated; BatchNorm then
    normalises with the statistics of the whole batch, as the trainer does. ``variables`` (e.g. converted
    from torchvision) replace the synthetic ones. ``compiler_options`` are XLA debug options for this
    executable only.
    ``kernels`` names the kernel set the model is built from ("cpu": `flaxnets.cpu.ops`, with the train
    step's gradients fenced by `flaxnets.cpu.tie_gradients`, as the trainer does on a CPU; "gpu":
    `flaxnets.gpu.ops`; "plain"); `None` takes the backend's, as the trainer does (``settings``).
    ``ops`` and ``tie_gradients`` replace either part (`benchmarks.cpu_kernels` takes them apart).
    ``settings`` (a `train.tuning.StepSettings`; default the backend's, as the trainer uses) adds its XLA
    options under ``compiler_options`` and traces under its matmul precision. ``donate=False`` keeps the
    old train state alive (the trainer always donates it).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import flaxnets
    from flaxnets.analysis import abstract_variables
    from train import step as steps
    from train.optim import after_fence
    from train.tuning import step_settings

    request = as_request(arch, size)
    if mode not in ("train", "infer"):
        raise BenchmarkError(f"--mode must be 'train' or 'infer', got {mode!r}.")
    if batch < 1:
        raise BenchmarkError(f"--batch must be a positive integer, got {batch}.")
    available = jax.device_count()
    if not 1 <= devices <= available:
        raise BenchmarkError(f"--devices {devices} asks for more devices than the {available} this machine has.")
    if batch % devices:
        raise BenchmarkError(f"--batch {batch} does not split evenly over {devices} devices.")
    request.checked()
    size, channels, num_classes = request.side, request.in_channels, request.classes
    jdtype = parse_dtype(dtype)
    settings = step_settings() if settings is None else settings
    compiler_options = {**settings.compiler_options, **(compiler_options or {})}
    kernels = settings.kernels if kernels is None else kernels
    if ops is None:
        ops = dataclasses.replace(settings, kernels=kernels).ops()
    tie_gradients = kernels == "cpu" if tie_gradients is None else tie_gradients
    model = model_for(request, jdtype, ops=ops)
    if variables is None:
        variables = synthetic_variables(abstract_variables(model, (1, size, size, channels)), seed)
    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    key = jax.random.key(seed)
    images = jax.random.randint(key, (batch, size, size, channels), 0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, num_classes, jnp.int32)
    preprocess = steps.Preprocess(mean=(0.45,) * channels, std=(0.225,) * channels, size=size, augment=False,
                                  dtype=jdtype)
    if mode == "train":
        tx = optax.sgd(1e-3, momentum=0.9)
        if tie_gradients:
            import flaxnets.cpu

            tx = after_fence(flaxnets.cpu.tie_gradients(), tx)
        params = variables["params"]
        state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                                 rng=jax.random.key_data(jax.random.key(seed + 1)))
        data = {"image": images, "label": labels, "index": jnp.arange(batch, dtype=jnp.int32)}
        fn = jax.jit(settings.traced(steps.bind(steps.train_step, model=model, tx=tx, preprocess=preprocess,
                                                num_classes=num_classes)), donate_argnums=0 if donate else ())
        args = [jax.device_put(state, replicated), jax.device_put(data, split)]
    else:
        def infer(variables, images):
            return model.apply(variables, preprocess(images, None, train=False), train=False)

        fn = jax.jit(settings.traced(infer))
        args = [jax.device_put(variables, replicated), jax.device_put(images, split)]
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    compile_s = time.perf_counter() - start
    return Step(request.name, mode, batch, size, dtype, devices, compiled, args, lower_s, compile_s, model, kernels)


# ------------------------------------------------------------------------------------------------------
# results


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``, where a benchmark writes its results; without it the benchmark only prints them."""
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder to write the results into (default: print "
                        "only; --out benchmarks/results replaces the committed ones)")
    # Printing only is the default now; the flag stays so that commands written before still run.
    parser.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)


def write_results(name: str, rows: Iterable[dict[str, Any]], conditions: dict[str, Any],
                  folder: Path | str) -> tuple[Path, Path]:
    """Write ``rows`` as ``<name>.json`` (with the conditions) and ``<name>.csv`` (one row per line,
    conditions repeated in each row) under ``folder`` (`add_out_option`'s); return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    json_path, csv_path = folder / f"{name}.json", folder / f"{name}.csv"
    _replace_whole(json_path, json.dumps({"conditions": conditions, "rows": rows}, indent=1, default=str) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns += [k for k in conditions if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**conditions, **row})
    _replace_whole(csv_path, buffer.getvalue())
    return json_path, csv_path


def _replace_whole(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place: an earlier result is replaced whole or kept."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` pairs a row key with its header."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
