"""Images per second of the streamed input pipeline alone (Grain workers decoding JPEGs, random-resized
crop, flip, batching), no model: how fast the host can feed an accelerator.

    python -m benchmarks.input_pipeline                       # 1,200 generated JPEGs, workers 0, 1, 2
    python -m benchmarks.input_pipeline --images 2000 --workers 1 2 4 --batch 128 --side 224

The images are generated once into a folder (``--folder``, default a temporary one): ImageNet-like
sizes (shorter side 300-500 pixels, aspect 3:4 to 4:3, the mean ImageNet training image is about
400x350), smooth random colour fields with noise so that JPEG sizes are realistic (~100 KB at quality
90). Each worker count reads the same folder: ``--skip`` batches untimed (worker start-up and the batches
read ahead meanwhile), then ``--batches`` timed; the worker counts alternate within each of ``--repeats``
rounds, and the median of the rounds is reported with the min-max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from train.cli import run_command
from train.config import ConfigError, CommandParser


def make_folder(folder: str, images: int, classes: int = 10, seed: int = 0) -> str:
    """``images`` JPEGs in ``classes`` sub-folders of ``folder`` (kept if already there)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = 0
    for i in range(images):
        path = os.path.join(folder, f"class_{i % classes:02d}", f"{i:06d}.jpg")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        short = int(rng.integers(300, 501))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        h, w = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        written += 1
    return folder


def measure(folder: str, workers: int, batch: int, batches: int, side: int, crop: str, skip: int) -> float:
    """Images per second of ``batches`` training batches with ``workers``, timed from the end of batch
    ``skip``: the first batches come from what the workers read ahead while starting up, so the clock
    starts once those buffers have drained and the rate is that of steady decoding."""
    from train.data import load_folder
    from train.data.stream import train_batches

    data = load_folder(folder, holdout=0.01)
    steps = data.train_size // batch
    if steps < batches + 1:
        raise ConfigError(f"{folder} has {data.train_size} training images: too few for {batches + 1} batches of "
                         f"{batch}; pass more --images or fewer --batches.")
    iterator = train_batches(data, side=side, seed=0, epoch=0, start=0, steps=batches + 1, batch=batch, crop=crop,
                             workers=workers)
    next(iterator)  # start-up: worker processes, first reads
    started = time.perf_counter()
    for _ in range(batches):
        out = next(iterator)
    elapsed = time.perf_counter() - started
    assert out["image"].shape == (batch, side, side, 3)
    return batches * batch / elapsed


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="folder of generated JPEGs (created or reused); default: a temporary one")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="batches timed")
    parser.add_argument("--skip", type=int, default=6, help="batches read before the clock starts")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--crop", choices=("inception", "alexnet"), default="inception")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    def body() -> int:
        for name in ("images", "batch", "batches", "side", "repeats"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name} must be positive.")
        if min(args.workers) < 0:
            raise ConfigError("--workers must be 0 or more.")
        holder = None
        folder = args.folder
        if folder is None:
            holder = tempfile.TemporaryDirectory(prefix="flaxnets-jpegs-")
            folder = holder.name
        started = time.perf_counter()
        make_folder(folder, args.images)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
                 if f.endswith(".jpg")]
        print(f"{len(sizes)} JPEGs in {folder}, mean {np.mean(sizes) / 1024:.0f} KiB "
              f"(generated in {time.perf_counter() - started:.1f} s)")
        # Worker counts alternate within each repeat, so a change in the machine's load hits all of them.
        rates: dict[int, list[float]] = {workers: [] for workers in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                rates[workers].append(measure(folder, workers, args.batch, args.batches, args.side, args.crop,
                                              args.skip))
        rows = []
        for workers, values in rates.items():
            row = {"workers": workers, "images_per_sec": statistics.median(values), "min": min(values),
                   "max": max(values), "batch": args.batch, "batches": args.batches, "side": args.side,
                   "crop": args.crop, "repeats": args.repeats}
            rows.append(row)
            print(f"workers {workers}: {row['images_per_sec']:,.0f} images/s (min {row['min']:,.0f}, max "
                  f"{row['max']:,.0f}; {args.repeats} repeats of {args.batches} batches of {args.batch})", flush=True)
        conditions = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(),
                      "python": platform.python_version(), "jpegs": len(sizes),
                      "mean_jpeg_kib": round(float(np.mean(sizes)) / 1024, 1)}
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"conditions": conditions, "rows": rows}, handle, indent=1)
        if holder is not None:
            holder.cleanup()
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
