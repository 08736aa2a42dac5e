"""What every benchmark shares: the conditions of a measurement, timing, device peaks and MFU, the
compiled steps that are measured, and where results are written: only into a folder the user names
(``--out DIR``), so that a benchmark run to try something never replaces the committed figures of
``benchmarks/results/`` (``--out benchmarks/results`` does, when asked).

The compiled steps are defined in `benchmarks.steps` and the error in `benchmarks.errors`; both are
imported from here too, so a benchmark imports what it shares from one place.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from benchmarks.errors import BenchmarkError
from benchmarks.steps import (KERNEL_CHOICES, Step, add_kernels_option, as_request, build_step, kernels_argument,
                              model_for, parse_dtype, synthetic_variables)

__all__ = [
    "BenchmarkError",
    "Timing",
    "measure",
    "environment",
    "conditions_line",
    "PEAK_TFLOPS",
    "peak_tflops",
    "mfu",
    "peak_rss_bytes",
    "reset_peak_rss",
    "synthetic_variables",
    "Step",
    "build_step",
    "add_out_option",
    "arch_names",
    "check_batch",
    "check_counts",
    "write_results",
    "write_whole",
    "run_cli",
    "parse_dtype",
    "as_request",
    "model_for",
    "markdown_table",
    "KERNEL_CHOICES",
    "add_kernels_option",
    "kernels_argument",
]



def run_cli(body: Callable[[], int]) -> int:
    """Run a command's ``body``; a user error prints ``error: <sentence>`` on stderr and returns 2, a batch
    that does not fit in memory the same sentence-long report and 1.

    When JAX will run on the CPU, its CPU backend is first given Eigen's convolutions and YNNPACK's
    reductions, as the trainer does (`flaxnets.cpu.prefer_eigen`), so the benchmarks measure what training
    runs; ``XLA_FLAGS`` naming the option overrides it.
    """
    from flaxnets.cli import ModelRequestError, error_phrase, out_of_memory
    from flaxnets.cpu import cpu_backend_ahead, prefer_eigen
    from flaxnets.layers import BatchTooSmallError
    from flaxnets.registry import UnknownModelError

    if cpu_backend_ahead():  # an accelerator's run keeps XLA_FLAGS as it was
        prefer_eigen()

    try:
        return body()
    except (BenchmarkError, UnknownModelError, ModelRequestError, BatchTooSmallError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - out of memory is the batch asked for; anything else re-raised
        if not out_of_memory(error):
            raise
        print(f"error: out of memory ({error_phrase(error)}); a smaller --batch needs less.", file=sys.stderr)
        return 1


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


def conditions_line(env: dict[str, Any]) -> str:
    """The conditions of `environment` that a reader of the printed figures needs, as one line."""
    extra = "".join(f", {name} {env[name]}" for name in ("torch", "cpu_convolutions") if env.get(name))
    return (f"conditions: {env['device_count']} x {env['device']} ({env['platform']}), host {env['host_cpu']} with "
            f"{env['host_cores']} cores, load {env['load_average']}; python {env['python']}, jax {env['jax']}, "
            f"flax {env['flax']}{extra}" + (f"; XLA_FLAGS={env['xla_flags']}" if env["xla_flags"] else ""))


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``devices`` times the per-device ``peak`` (TFLOP/s)."""
    if not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12 * devices)


def reset_peak_rss() -> bool:
    """Start the peak resident set size afresh, so that a row's `peak_rss_bytes` is its own and not the peak
    of the rows before it: Linux resets it when ``5`` is written to ``/proc/self/clear_refs``. False where
    it cannot be reset (the peak then runs from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set size since `reset_peak_rss` (Linux's ``VmHWM``), else since it started
    (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as handle:
            match = re.search(r"^VmHWM:\s+(\d+) kB", handle.read(), re.M)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ------------------------------------------------------------------------------------------------------
# results


def _out_folder(text: str) -> Path:
    """``--out``'s folder, refused while the arguments are read (before anything is measured) where no results
    file could be written, so that a run's results are never lost at its end."""
    from flaxnets.cli import unwritable

    if not text.strip():
        raise argparse.ArgumentTypeError("name the folder to write the results into")
    problem = unwritable(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}, so the results could not be written there")
    return Path(text)


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``, where a benchmark writes its results; without it the benchmark only prints them. A folder
    where no file can be written is refused as the arguments are read."""
    parser.add_argument("--out", type=_out_folder, metavar="DIR", help="folder to write the results into (default: "
                        "print only; --out benchmarks/results replaces the committed ones)")
    # Printing only is the default now; the flag stays so that commands written before still run.
    parser.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)


# No device holds 2**24 images, and far past it XLA's compiler ends the process without an exception to report.
BATCH_LIMIT = 2**24


def check_batch(batch: int | None) -> None:
    """Refuse a ``--batch`` below 1 or past `BATCH_LIMIT` in one sentence (None: the benchmark's default)."""
    if batch is not None and not 1 <= batch <= BATCH_LIMIT:
        raise BenchmarkError(f"--batch must be a whole number from 1 to {BATCH_LIMIT:,} (2**24, more images than any "
                             f"device holds), got {batch}.")


def check_counts(args: argparse.Namespace, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Refuse in one sentence a count of ``args`` (``"repeats"``, ``"steps"``, ...) below 1 (``positive``) or
    below 0 (``non_negative``); None is a benchmark's default and passes."""
    for names, least, words in ((positive, 1, "a positive integer"), (non_negative, 0, "0 or more")):
        for name in names:
            value = getattr(args, name)
            if value is not None and value < least:
                raise BenchmarkError(f"--{name.replace('_', '-')} must be {words}, got {value}.")


def arch_names(text: str, flag: str = "--arch") -> list[str]:
    """The names of a comma-separated ``flag`` value; an empty item (``--arch ,``, ``a,,b``) is refused, as it
    would measure nothing or hide a missing name."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise BenchmarkError(f"{flag} takes comma-separated names, got {text!r}, which has an empty one.")
    return names


def write_whole(folder: Path | str, name: str, text: str) -> Path:
    """Write ``text`` to ``folder/name`` (the folder made if missing) beside the file, then rename it into place:
    an earlier result is replaced whole or kept. A failure is a `BenchmarkError` and leaves no partial file."""
    path = Path(folder) / name
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as error:  # the folder changed after --out was checked, or the disk is full
        partial.unlink(missing_ok=True)
        raise BenchmarkError(f"cannot write {path} ({error.strerror or error}).") from None
    return path


def write_results(name: str, rows: Iterable[dict[str, Any]], conditions: dict[str, Any],
                  folder: Path | str) -> tuple[Path, Path]:
    """Write ``rows`` as ``<name>.json`` (with the conditions) and ``<name>.csv`` (one row per line,
    conditions repeated in each row) under ``folder`` (`add_out_option`'s); return both paths."""
    rows = [dict(r) for r in rows]
    json_path = write_whole(folder, f"{name}.json",
                            json.dumps({"conditions": conditions, "rows": rows}, indent=1, default=str) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns += [k for k in conditions if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**conditions, **row})
    return json_path, write_whole(folder, f"{name}.csv", buffer.getvalue())


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
