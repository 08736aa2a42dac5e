"""Step ``environment``: the device, the versions (CUDA and driver where JAX reports them) and two measured
ceilings, a bfloat16 matrix product (TFLOP/s) and a read-and-write of a large array (GB/s), against which
the other steps state their MFU."""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "run", "matmul_ceiling", "copy_ceiling"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul_side: int  # the square bfloat16 product of the ceiling
    copy_mib: int  # the array read and written for the bandwidth ceiling
    repeats: int


REAL = Sizes(matmul_side=8192, copy_mib=2048, repeats=10)
DRY = Sizes(matmul_side=256, copy_mib=16, repeats=3)
LIMIT_S, DRY_LIMIT_S = 40, 60  # 6 s on the H200 (2026-11-30)


def _versions() -> dict[str, str | None]:
    """Installed versions, read from the package metadata (importing torch would cost seconds)."""
    import platform
    from importlib import metadata

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch", "torchvision",
             "tensorflow-datasets", "grain")
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    for dist in metadata.distributions():  # JAX's CUDA plugin and the NVIDIA libraries it runs on
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime")):
            versions[name] = dist.version
    return versions


def _driver_and_cuda(report: str) -> dict[str, str]:
    """The driver and CUDA versions from the nvidia-smi table in `jax.print_environment_info`'s report."""
    found = {}
    for line in report.splitlines():
        for key, label in (("driver", "Driver Version:"), ("cuda", "CUDA Version:")):
            if label in line:
                found[key] = line.split(label, 1)[1].split()[0]
    return found


def matmul_ceiling(side: int, repeats: int) -> dict[str, float]:
    """TFLOP/s of a bfloat16 ``side``³ matrix product (float32 accumulation), ten products per timed
    repeat: the median and the best repeat."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import measure

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (side, side), jnp.bfloat16) for k in keys)
    product = jax.jit(jnp.matmul)
    calls = 10

    def call():
        for _ in range(calls):
            out = product(a, b)
        jax.block_until_ready(out)

    timing = measure(call, repeats, warmup=1)
    flops = 2.0 * side ** 3 * calls
    return {"matmul_side": side, "matmul_tflops_median": round(flops / timing.median / 1e12, 2),
            "matmul_tflops_best": round(flops / timing.min / 1e12, 2)}


def copy_ceiling(mib: int, repeats: int) -> dict[str, float]:
    """GB/s of device memory: an array of ``mib`` MiB read and written once (``x + 1`` in bfloat16, which
    does nothing else; JAX would hand back a plain copy's input unchanged), counted as twice its size."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import measure

    x = jnp.zeros((mib * 2 ** 20 // 2,), jnp.bfloat16)
    bump = jax.jit(lambda v: v + 1)
    calls = 10

    def call():
        for _ in range(calls):
            out = bump(x)
        jax.block_until_ready(out)

    timing = measure(call, repeats, warmup=1)
    moved = 2.0 * x.nbytes * calls
    return {"copy_mib": mib, "copy_gbs_median": round(moved / timing.median / 1e9, 1),
            "copy_gbs_best": round(moved / timing.min / 1e9, 1)}


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """Device, versions and the two ceilings."""
    import jax

    from benchmarks.common import environment as conditions

    record.data["conditions"] = conditions()
    record.data["versions"] = _versions()
    report = jax.print_environment_info(return_string=True)
    record.data["jax_report"] = report
    record.data.update(_driver_and_cuda(report))
    device = jax.devices()[0]
    record.data["memory_limit_bytes"] = (device.memory_stats() or {}).get("bytes_limit")
    say(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); driver "
        f"{record.data.get('driver', '-')}, CUDA {record.data.get('cuda', '-')}")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in record.data["versions"].items() if v))
    record.save()
    record.data["ceilings"] = {**matmul_ceiling(sizes.matmul_side, sizes.repeats),
                               **copy_ceiling(sizes.copy_mib, sizes.repeats)}
    c = record.data["ceilings"]
    line = (f"{device.device_kind}: bf16 {sizes.matmul_side}³ product {c['matmul_tflops_best']} TFLOP/s (median "
            f"{c['matmul_tflops_median']}), memory {c['copy_gbs_best']} GB/s (median {c['copy_gbs_median']})")
    say(line)
    return True, line
