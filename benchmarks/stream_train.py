"""Whether the streamed input pipeline keeps the accelerator busy: the trainer's own train step, fed by its
own streamed feed (`train.feed.StreamFeed`: Grain workers, transfer to the devices two batches ahead),
against the same compiled step run on one batch already on the devices, in the same process.

    python -m benchmarks.stream_train --data-dir COPY --arch resnet50 --dtype bfloat16 --batch-size 256

``--data-dir`` is a folder dataset (`python -m train.data prepare folder` writes a resized copy); its
training images are cycled through as often as the measurement needs. The step is compiled and run once;
then steps on the resident batch are timed (the synthetic rate: the step alone), then streamed steps: the
read-ahead the workers may hold is consumed untimed, then segments of half of ``--steps`` steps are timed
until two in a row agree (`benchmarks.input_pipeline.steady_rate`: while the pipeline drains what it made
during the compilation, steps look faster than the pipeline can feed). Every segment ends with the
devices finished (``block_until_ready``). The streamed rate divided by the synthetic one is the share of
the step's speed the pipeline delivers. The normalisation is ImageNet's (given, so no statistics are
computed first) and the learning rate constant, so that ``python -m train`` with the same flags and
``--schedule constant --warmup-epochs 0`` compiles the same step (and finds it in the compilation cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from train.exits import run_command
from train.arguments import CommandParser
from train.config import Config, ConfigError


def measure(config: Config, steps: int, segments: int = 12) -> dict:
    """Synthetic and streamed images/s of ``config``'s train step (see the module docstring)."""
    import jax

    from benchmarks.input_pipeline import steady_rate
    from train.data import load_dataset
    from train.data.sources import Subset
    from train.data.stream import default_workers, read_ahead_batches
    from train.run import build_run

    data = load_dataset(config.dataset, config.data_dir)
    if data.in_memory:
        raise ConfigError(f"{config.dataset} is held in memory; give a folder dataset (--data-dir) to stream.")
    workers = default_workers() if config.workers is None else config.workers
    skip = read_ahead_batches(workers) + 2  # and the two the feed keeps on the devices
    segment = max(1, steps // 2)
    total = (skip + segments * segment + 1) * config.batch_size
    data = dataclasses.replace(data, train=Subset(data.train, np.resize(np.arange(data.train_size), total)))
    run = build_run(config, data=data)
    driver, feed = run.driver, run.feed()
    state = driver.put_replicated(run.init_state())
    batches = feed.batches(0, 0)
    resident = next(batches)
    started = time.perf_counter()
    state, metrics = jax.block_until_ready(feed.train(state, resident))
    compile_s = time.perf_counter() - started

    def train(inputs) -> None:
        nonlocal state
        state, _ = feed.train(state, inputs)

    def finish() -> None:
        jax.block_until_ready(state)

    synthetic = steady_rate(lambda: train(resident), batch=config.batch_size, segment=segment, segments=4,
                            finish=finish)
    for _ in range(skip):
        train(next(batches))
    finish()
    streamed = steady_rate(lambda: train(next(batches)), batch=config.batch_size, segment=segment,
                           segments=segments, finish=finish)
    rate, resident_rate = streamed["images_per_sec"], synthetic["images_per_sec"]
    return {"synthetic_images_per_sec": resident_rate, "streamed_images_per_sec": rate,
            "streamed_of_synthetic": rate / resident_rate, "steady": streamed["steady"] and synthetic["steady"],
            "streamed_segment_rates": streamed["segment_rates"], "synthetic_segment_rates": synthetic["segment_rates"],
            "compile_s": compile_s, "workers": workers, "decoder": feed.decoder,
            "skipped_steps": skip + streamed["drained_batches"], "timed_steps": streamed["timed_batches"],
            "train_images": data.train_size, "side": run.image_side, "devices": jax.device_count(),
            "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks.stream_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a folder dataset: images or a prepared copy")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, help="default: the architecture's native size")
    parser.add_argument("--workers", type=int, help="Grain workers (default: one per core)")
    parser.add_argument("--decoder", choices=("auto", "opencv", "pillow"), default="auto")
    parser.add_argument("--steps", type=int, default=40, help="steps timed, each way, once steady")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    def body() -> int:
        from train.tuning import enable_compilation_cache

        if args.steps < 1:
            raise ConfigError("--steps must be positive.")
        enable_compilation_cache()  # a later python -m train of the same step starts from it
        with tempfile.TemporaryDirectory(prefix="flaxnets-stream-") as workdir:
            config = Config(arch=args.arch, dataset="folder", data_dir=args.data_dir, batch_size=args.batch_size,
                            dtype=args.dtype, image_size=args.image_size, workers=args.workers, decoder=args.decoder,
                            pipeline="stream", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                            workdir=workdir, plots=False, epochs=1, warmup_epochs=0, schedule="constant").validate()
            result = measure(config, args.steps)
        result.update(arch=args.arch, dtype=args.dtype, batch=args.batch_size, cpus=os.cpu_count(),
                      load_average=os.getloadavg(), python=platform.python_version())
        print(f"{args.arch} {args.dtype} batch {args.batch_size} at {result['side']}: synthetic "
              f"{result['synthetic_images_per_sec']:,.0f} images/s, streamed {result['streamed_images_per_sec']:,.0f} "
              f"({result['streamed_of_synthetic']:.0%}; {result['workers']} workers, decoder {result['decoder']}, "
              f"{result['timed_steps']} steps each, compiled in {result['compile_s']:.1f} s)"
              + ("" if result["steady"] else " (NOT STEADY: no two segments in a row agreed within 10%)"), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as handle:
                json.dump(result, handle, indent=1)
            os.replace(args.json + ".tmp", args.json)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
