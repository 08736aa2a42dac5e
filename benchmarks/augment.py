"""Where TrivialAugment Wide and RandAugment should run: on the device inside the compiled step (as the
trainer runs them, `flaxnets.autoaugment` under `jax.vmap`), or on the host in the input workers (what a
PyTorch user runs: torchvision's transforms on PIL images, one per worker process). Images per second of
each, in one process, on the same uint8 images.

    python -m benchmarks.augment                         # 32 and 224 pixels, both policies
    python -m benchmarks.augment --sides 28 --batch 512 --repeats 7

The device figure is a whole batch through ``jit(vmap(policy))`` (compiled once, untimed), waited for
with ``block_until_ready``; the host figure is torchvision's transform over the same images one by one in
this process (one core; a pool of workers multiplies it by at most the number of cores). torchvision is
the ``parity`` extra; without it the host rows are skipped and say why. Results go to
``DIR/augment_<device>.json`` and ``.csv`` with ``--out DIR``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.common import BenchmarkError, add_out_option, environment, markdown_table, measure, run_cli, write_results
from train.arguments import CommandParser

POLICIES = ("ta_wide", "ra")


def device_rate(policy: str, images: np.ndarray, repeats: int) -> dict:
    """Images/s of ``policy`` over the batch ``images`` on JAX's default device, per-image keys."""
    import jax
    import jax.numpy as jnp

    from flaxnets import autoaugment

    one = autoaugment.trivial_augment_wide if policy == "ta_wide" else autoaugment.rand_augment
    program = jax.jit(jax.vmap(one))
    batch = jax.device_put(jnp.asarray(images))
    keys = jax.random.split(jax.random.key(0), len(images))
    started = time.perf_counter()
    jax.block_until_ready(program(batch, keys))
    compile_s = time.perf_counter() - started
    timing = measure(lambda: jax.block_until_ready(program(batch, keys)), repeats)
    return {"where": f"device ({jax.devices()[0].platform}, whole batch)", "images_per_s": len(images) / timing.median,
            "min_max": f"{len(images) / timing.max:,.0f}-{len(images) / timing.min:,.0f}",
            "compile_s": round(compile_s, 1)}


def host_rate(policy: str, images: np.ndarray, repeats: int) -> dict:
    """Images/s of torchvision's transform over ``images`` as PIL images, one by one, in this process."""
    from benchmarks.vs_torch import load_torch

    _, torchvision, reason = load_torch()
    if torchvision is None:
        return {"where": "host (torchvision on PIL, 1 core)", "skipped": reason}
    transforms = torchvision.transforms
    from PIL import Image

    transform = transforms.TrivialAugmentWide() if policy == "ta_wide" else transforms.RandAugment()
    pictures = [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]

    def run():
        for picture in pictures:
            transform(picture)

    timing = measure(run, repeats)
    return {"where": "host (torchvision on PIL, 1 core)", "images_per_s": len(images) / timing.median,
            "min_max": f"{len(images) / timing.max:,.0f}-{len(images) / timing.min:,.0f}"}


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks.augment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 224], help="image sides (default: 32 224)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch", type=int, default=256, help="images per measurement (default: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    add_out_option(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        if args.batch < 1 or min(args.sides) < 3:
            raise BenchmarkError("--batch must be at least 1 and every side at least 3 pixels.")
        rows = []
        for side in args.sides:
            images = np.random.default_rng(side).integers(0, 256, (args.batch, side, side, args.channels), np.uint8)
            for policy in args.policies:
                for rate in (device_rate, host_rate):
                    row = {"policy": policy, "side": side, "batch": args.batch, **rate(policy, images, args.repeats)}
                    rows.append(row)
                    print(f"{policy} {side}x{side}: {row['where']}: "
                          + (row.get("skipped") or f"{row['images_per_s']:,.0f} images/s ({row['min_max']})"),
                          flush=True)
        conditions = {**environment(), "channels": args.channels, "repeats": args.repeats}
        print(markdown_table(rows, [("policy", "policy"), ("side", "side"), ("where", "where"),
                                    ("images_per_s", "images/s (median)"), ("min_max", "min-max"),
                                    ("compile_s", "compile s")]))
        if args.out:
            import jax

            paths = write_results(f"augment_{jax.devices()[0].platform}", rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
