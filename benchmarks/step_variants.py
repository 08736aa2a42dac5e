"""``python -m benchmarks.step_variants --arch resnet50 --batch 256``: the trainer's step with each way of
writing BatchNorm and each kernel set, side by side, with a kernel-time profile of the step.

On a GPU a ResNet's training step spends much of its time in memory-bound BatchNorm and ReLU kernels around
the cuDNN convolutions, so how BatchNorm is written decides how many bytes each step moves. The
formulations (`FORMULATIONS`) differ in three choices:

* statistics in two passes (mean, then the mean of squared deviations) or in one (the mean and the mean
  square of ``x - shift`` together, ``shift`` the running mean with its gradient stopped);
* normalisation as ``(x - mean) * inv + bias`` or as one multiply-add ``x * inv + (bias - mean * inv)``,
  in float32 or in the input's dtype;
* whether the backward pass reads float32 copies of the activations saved by the forward pass, or
  recomputes them from the bfloat16 input (`jax.checkpoint` around the layer, saving only its per-channel
  statistics).

``flax.linen.BatchNorm`` and the library's own (``library``: `flaxnets.layers.BatchNorm` as it is now)
are measured too. Each replaces the ResNet family's BatchNorm for this process only. The kernel sets are
the library's plain layers, `flaxnets.gpu.ops`, and each of that set's two layers alone. The step, data
and timing are `benchmarks.peers`'. ``--profile DIR`` records three steps of the first and the fastest
variant (and of the plain Flax model with ``--plain-flax``) with `jax.profiler` and writes the device
time of each kernel (summed by name, grouped by kind) to ``DIR/kernels_<variant>.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from benchmarks.common import (BenchmarkError, add_out_option, check_batch, check_counts, environment, markdown_table,
                               run_cli)
from flaxnets.layers import BatchNorm
from train.arguments import CommandParser

__all__ = ["FORMULATIONS", "FormulatedBatchNorm", "kernel_profile", "main"]


def _two_pass(x, shift, axes, sync):
    xf = x.astype(jnp.float32)
    mean = checkpoint_name(sync(jnp.mean(xf, axes)), "bn_stats")
    return mean, checkpoint_name(sync(jnp.mean(jnp.square(xf - mean), axes)), "bn_stats")


def _one_pass(x, shift, axes, sync):
    d = x.astype(jnp.float32) - shift
    m1, m2 = (checkpoint_name(m, "bn_stats") for m in sync((jnp.mean(d, axes), jnp.mean(jnp.square(d), axes))))
    return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _centred(x, mean, inv, bias):
    return (x.astype(jnp.float32) - mean) * inv + bias


def _affine(x, mean, inv, bias):
    return x.astype(jnp.float32) * inv + (bias - mean * inv)


def _affine_low(x, mean, inv, bias):
    return x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Formulation:
    name: str
    stats: Callable
    normalise: Callable
    recompute: bool = False


FORMULATIONS = (
    Formulation("two-pass, centred (flaxnets 2026-12-04)", _two_pass, _centred),
    Formulation("two-pass, centred, recomputed", _two_pass, _centred, recompute=True),
    Formulation("one-pass, multiply-add", _one_pass, _affine),
    Formulation("one-pass, multiply-add, recomputed", _one_pass, _affine, recompute=True),
    Formulation("one-pass, multiply-add in bfloat16, recomputed", _one_pass, _affine_low, recompute=True),
    Formulation("flax.linen.BatchNorm", None, None),
)


class FormulatedBatchNorm(BatchNorm):
    """`flaxnets.layers.BatchNorm`'s fields, variables and running-statistics update around one `Formulation`."""

    formulation: Formulation | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        f = self.formulation
        features, axes = x.shape[-1], tuple(range(x.ndim - 1))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        out_dtype = self.dtype or x.dtype
        if nn.merge_param("use_running_average", self.use_running_average, use_running_average):
            inv = scale * lax.rsqrt(running_var.value + self.epsilon)
            return f.normalise(x, running_mean.value, inv, bias).astype(out_dtype)
        synced = self.axis_name is not None and not self.is_initializing()
        sync = (lambda v: lax.pmean(v, self.axis_name)) if synced else (lambda v: v)

        def layer(x, shift, scale, bias):
            mean, var = f.stats(x, shift, axes, sync)
            inv = scale * lax.rsqrt(var + self.epsilon)
            return f.normalise(x, mean, inv, bias).astype(out_dtype), mean, var

        if f.recompute:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names("bn_stats"))
        y, mean, var = layer(x, lax.stop_gradient(running_mean.value), scale, bias)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1])
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * lax.stop_gradient(mean)
            running_var.value = (self.momentum * running_var.value
                                 + (1 - self.momentum) * lax.stop_gradient(var) * count / max(count - 1, 1))
        return y


LIBRARY = Formulation("flaxnets.layers.BatchNorm", None, None)  # the library's own, as it is now
FLAX = FORMULATIONS[-1]


def _use(formulation: Formulation) -> None:
    """Build the ResNet family's BatchNorm from ``formulation`` in this process."""
    import flaxnets.layers
    import flaxnets.models.resnet as resnet

    resnet.BatchNorm = (flaxnets.layers.BatchNorm if formulation is LIBRARY else nn.BatchNorm if formulation is FLAX
                        else partial(FormulatedBatchNorm, formulation=formulation))


def kernel_sets() -> dict[str, Any]:
    """The kernel sets measured: the library's plain layers, `flaxnets.gpu.ops`, each of its two layers
    alone, the set with max pooling's taps read by stride phase (``gpu.max_pool(..., by_phase=True)``), and
    the set with 1x1 convolutions as matrix products (``gpu.conv_general_dilated(...,
    pointwise_as_product=True)``)."""
    from flaxnets import gpu
    from flaxnets.layers import PLAIN, MaxPool

    by_phase = partial(MaxPool, max_pool=partial(gpu.max_pool, by_phase=True))
    products = partial(nn.Conv, conv_general_dilated=partial(gpu.conv_general_dilated, pointwise_as_product=True))
    return {"plain": PLAIN, "gpu": gpu.ops(),
            "gpu max-pool only": dataclasses.replace(PLAIN, max_pool=gpu.ops().max_pool),
            "gpu folded stem only": dataclasses.replace(PLAIN, conv=gpu.ops().conv),
            "gpu, max-pool by phase": dataclasses.replace(gpu.ops(), max_pool=by_phase),
            "gpu, 1x1 as products": dataclasses.replace(gpu.ops(), conv=products),
            "gpu, max-pool by phase, 1x1 as products": dataclasses.replace(gpu.ops(), conv=products,
                                                                          max_pool=by_phase)}


# ------------------------------------------------------------------------------------------------------
# kernel profile

KINDS = (
    ("convolution and matrix (cuDNN, cuBLAS)", re.compile(r"xmma|cudnn|conv|implicit|fprop|dgrad|wgrad|gemm|cutlass|"
                                                           r"sm\d\d_|nvjet|kernel_mma", re.I)),
    ("max-pool backward", re.compile(r"select_and_scatter|scatter", re.I)),
    ("reductions", re.compile(r"reduc", re.I)),
    ("layout (transpose, copy)", re.compile(r"transpose|copy", re.I)),
    ("elementwise fusions", re.compile(r".")),
)


def kernel_profile(run_steps: Callable[[int], None], steps: int = 3) -> dict[str, Any]:
    """Device time per kernel name over ``steps`` steps (`jax.profiler`'s trace of the GPU streams), with
    the totals of each kind in `KINDS`, per step."""
    with tempfile.TemporaryDirectory(prefix="flaxnets-profile-") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            run_steps(steps)
        paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise BenchmarkError("jax.profiler wrote no trace")
        with gzip.open(paths[0], "rt") as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    threads_seen: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "GPU" not in processes.get(e.get("pid"), ""):
            continue
        thread = threads.get((e["pid"], e.get("tid")), "")
        threads_seen[thread] += e.get("dur", 0.0)
        if "stream" not in thread.lower():
            continue
        by_name[e["name"]][0] += e.get("dur", 0.0) / 1e3 / steps
        by_name[e["name"]][1] += 1
    kinds: dict[str, float] = collections.Counter()
    for name, (ms, _) in by_name.items():
        kind = next(label for label, pattern in KINDS if pattern.search(name))
        kinds[kind] += ms
    top = sorted(by_name.items(), key=lambda item: -item[1][0])
    return {"ms_per_step_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "kernels_per_step": sum(count for _, count in by_name.values()) / steps,
            "threads_ms": {k: round(v / 1e3 / steps, 3) for k, v in threads_seen.items()},
            "top": [{"name": n[:160], "ms_per_step": round(ms, 4), "calls_per_step": c / steps}
                    for n, (ms, c) in top[:150]]}


def _profile(prepared: Any, row: dict[str, Any], folder: Path) -> None:
    """Profile three steps of ``prepared`` into ``folder`` and ``row``; a failure is printed, not raised."""
    def run_steps(n):
        for _ in range(n):
            prepared.step()
        prepared.sync()

    try:
        profile = kernel_profile(run_steps)
    except Exception as error:  # noqa: BLE001 - a profile is extra; its failure is reported, not fatal
        print(f"{row['variant']}: no profile ({type(error).__name__}: {error})", flush=True)
        return
    row["profile_by_kind"] = profile["ms_per_step_by_kind"]
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", row["variant"].lower()).strip("_")[:48]
    (folder / f"kernels_{slug}.json").write_text(json.dumps(profile, indent=1))
    print(f"{row['variant']}: {profile['kernels_per_step']:.0f} kernels per step; ms per step by kind: "
          + ", ".join(f"{k} {v:.2f}" for k, v in profile["ms_per_step_by_kind"].items()), flush=True)
    for kernel in profile["top"][:12]:
        print(f"  {kernel['ms_per_step']:8.3f} ms x{kernel['calls_per_step']:.0f}  {kernel['name'][:110]}", flush=True)


def _variant(text: str) -> tuple[str, str]:
    formulation, _, kernels = text.partition(":")
    return formulation, kernels or "plain"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.step_variants``."""
    parser = CommandParser(prog="python -m benchmarks.step_variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", help="a member of the ResNet family")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", type=_variant, action="append", default=None, metavar="BATCHNORM[:KERNELS]",
                        help="BATCHNORM: 'library' or an index of FORMULATIONS; KERNELS: a name of kernel_sets() (plain, "
                             "gpu, 'gpu max-pool only', 'gpu folded stem only', 'gpu, max-pool by phase', 'gpu, 1x1 "
                             "as products', 'gpu, max-pool by phase, 1x1 as products'; repeatable; default: every "
                             "formulation, plain kernels)")
    parser.add_argument("--plain-flax", action="store_true", help="also time (and profile) benchmarks.plain_flax")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write kernel profiles of the first and the fastest variant here")
    add_out_option(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        import flaxnets
        from benchmarks.peers import prepare, time_peer

        check_batch(args.batch)
        check_counts(args, positive=("steps", "repeats", "size"))
        if flaxnets.get_spec(args.arch).family != "resnet":
            raise BenchmarkError(f"--arch must be a ResNet-family member, got {args.arch}.")
        sets = kernel_sets()
        variants = []
        for formulation, kernels in args.variant or [(str(i), "plain") for i in range(len(FORMULATIONS))]:
            if kernels not in sets:
                raise BenchmarkError(f"unknown kernel set {kernels!r}; choose from {', '.join(sets)}.")
            if formulation != "library" and not (formulation.isdigit() and int(formulation) < len(FORMULATIONS)):
                raise BenchmarkError(f"BatchNorm must be 'library' or 0-{len(FORMULATIONS) - 1}, got {formulation!r}.")
            variants.append((LIBRARY if formulation == "library" else FORMULATIONS[int(formulation)], kernels))
        size = args.size or flaxnets.get_spec(args.arch).input_size
        rows, prepared = [], []

        def timed(label, item):
            prepared.append(item)
            row = {"variant": label, **time_peer(item, args.batch, args.steps, args.repeats, 3)}
            print(f"{label}: {row['images_per_s']:,.0f} images/s ({row['images_per_s_min']:,.0f}-"
                  f"{row['images_per_s_max']:,.0f}), {row['ms_per_step']:.1f} ms/step, compiled in "
                  f"{row['compile_s']:.1f} s, {row['memory_mib']} MiB", flush=True)
            rows.append(row)

        for formulation, kernels in variants:
            _use(formulation)
            timed(f"{formulation.name} + {kernels} kernels",
                  prepare("flaxnets", args.arch, args.batch, size, args.dtype, ops=sets[kernels]))
        _use(LIBRARY)
        profiled = {0, max(range(len(rows)), key=lambda i: rows[i]["images_per_s"])}
        if args.plain_flax:
            timed("plain Flax model (benchmarks.plain_flax)", prepare("flax", args.arch, args.batch, size, args.dtype))
            profiled.add(len(rows) - 1)
        for index in sorted(profiled) if args.profile else ():
            _profile(prepared[index], rows[index], Path(args.profile))
        print(markdown_table(rows, (("variant", "BatchNorm + kernel set"), ("images_per_s", "images/s"),
                                    ("images_per_s_min", "min"), ("images_per_s_max", "max"),
                                    ("ms_per_step", "ms/step"), ("compile_s", "compile s"),
                                    ("memory_mib", "memory MiB"))))
        if args.out:
            folder = Path(args.out)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_variants_{args.arch}_b{args.batch}_{args.dtype}.json"
            path.write_text(json.dumps({"conditions": environment(), "rows": rows}, indent=1, default=str))
            print(f"wrote {path}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
