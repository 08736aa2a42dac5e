"""Images per second of the streamed input pipeline alone (Grain workers decoding JPEGs to random-resized
crops, flipping and batching them), no model: how fast the host can feed an accelerator. Beside each
figure, the same per-image work in a plain multiprocessing Pool of as many processes (no batching, nothing
sent back): what the cores decode, the ceiling the pipeline is checked against.

    python -m benchmarks.input_pipeline                                  # 1,200 JPEGs and their copy, all cores
    python -m benchmarks.input_pipeline --images 4000 --workers 16 --batch 64 --json out.json
    python -m benchmarks.input_pipeline --workers 0 --decoder whole pillow opencv       # the decoders' costs

Data: ``--images`` generated ImageNet-like JPEGs (shorter side 300-500 pixels, aspect 3:4 to 4:3; the mean
ImageNet training image is about 400x350; smooth random colour fields with noise, so that files are of
realistic size, ~80 KiB at quality 90), in ``--folder`` (default: a temporary one), and the resized copy
of them that ``python -m train.data prepare folder`` writes (``--copy-side``, 0: none), read through the
same pipeline. A measurement cycles through the images as often as it needs; the files sit in the page
cache, so disk reads are not measured.

Timing, steady state only: the pipeline reads untimed as many batches as its workers can hold ahead
(`train.data.stream.read_ahead_batches`) or ``--skip`` if more. That is not enough by itself: while the
consumer drains what was made ahead, the workers make more. So segments of half of ``--batches`` batches
(at least half the read-ahead, in whole rounds of the workers, which deliver in turn) are timed one after
another, the first never counted, until two in a row agree within 10% (`steady_rate`); the rate is that of
those two. A measurement where none agreed within ``--segments`` is flagged as not steady, and one faster
than the plain loop by more than 10% as suspect: the plain loop is the ceiling. The plain Pool starts its processes,
waits until every one has decoded an image, then times as many images as the pipeline did. Worker counts
(default: one per core) alternate within each of ``--repeats`` rounds, medians reported with the min-max.

On a machine shared with other work, images/s follow each side's share of the cores, and a pipeline with
more threads than the Pool has processes gets the larger share: the CPU time this process and its children
spend per image in the timed window (with psutil installed) is the figure that load does not move.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from typing import Callable

import numpy as np

from benchmarks.jpeg_folder import make_copy, make_folder
from train.arguments import CommandParser
from train.config import ConfigError


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its children so far (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # ended meanwhile
            pass
    return total


def _cpu_ms(before: float | None, images: int) -> float | None:
    after = _cpu_seconds()
    return None if before is None or after is None else (after - before) * 1000 / images


def steady_rate(step: Callable[[], object], *, batch: int, segment: int, segments: int,
                finish: Callable[[], object] | None = None, tolerance: float = 0.1) -> dict:
    """Images per second of ``step`` (one batch a call) once steady: segments of ``segment`` calls are timed
    one after another, the first never counted, until two in a row agree within ``tolerance`` or
    ``segments`` were timed; the rate is that of the last two. Batches made ahead before the clock started
    make the first segments faster than the rest: what the producer did earlier, not its speed. ``finish``
    (waiting for a device) runs before each reading of the clock.

    Returns ``images_per_sec``, ``segment_rates``, ``steady`` (whether two agreed), ``drained_batches`` (the
    calls before the last two segments), ``timed_batches`` and ``cpu_ms_per_image`` over the last two."""
    stamps, cpu, rates = [time.perf_counter()], [_cpu_seconds()], []
    for _ in range(max(segments, 3)):
        for _ in range(segment):
            step()
        if finish is not None:
            finish()
        stamps.append(time.perf_counter())
        cpu.append(_cpu_seconds())
        rates.append(segment * batch / (stamps[-1] - stamps[-2]))
        if len(rates) >= 3 and abs(rates[-1] / rates[-2] - 1) <= tolerance:
            break
    images = 2 * segment * batch
    cpu_ms = None if None in (cpu[-3], cpu[-1]) else (cpu[-1] - cpu[-3]) * 1000 / images
    return {"images_per_sec": images / (stamps[-1] - stamps[-3]), "segment_rates": rates,
            "steady": abs(rates[-1] / rates[-2] - 1) <= tolerance, "drained_batches": segment * (len(rates) - 2),
            "timed_batches": 2 * segment, "cpu_ms_per_image": cpu_ms}


def pipeline_rate(data, *, workers: int, batch: int, batches: int, side: int, crop: str, decoder: str | None,
                  skip: int = 0, segments: int = 8) -> dict:
    """The pipeline's steady rate (see the module docstring) over the training split of ``data``."""
    from train.data.sources import Subset
    from train.data.stream import read_ahead_batches, train_batches

    processes = max(workers, 1)
    skip = max(skip, read_ahead_batches(workers))
    # Whole rounds of the workers, and at least half of what they can hold ahead: two segments that agree
    # cannot then both have been served from it.
    segment = math.ceil(max(batches, read_ahead_batches(workers)) / 2 / processes) * processes
    steps = skip + max(segments, 3) * segment
    cycled = dataclasses.replace(data, train=Subset(data.train, np.resize(np.arange(data.train_size), steps * batch)))
    iterator = train_batches(cycled, side=side, seed=0, epoch=0, start=0, steps=steps, batch=batch, crop=crop,
                             workers=workers, decoder=decoder)
    shapes = set()
    try:
        for _ in range(skip):
            next(iterator)
        measured = steady_rate(lambda: shapes.add(next(iterator)["image"].shape), batch=batch, segment=segment,
                               segments=segments)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    assert shapes == {(batch, side, side, 3)}, shapes
    return {**measured, "skipped_batches": skip + measured["drained_batches"]}


_TRANSFORM = None


def _start(transform, barrier) -> None:
    global _TRANSFORM
    _TRANSFORM = transform
    transform(0)  # imports and first decode done before the clock
    barrier.wait()  # no process takes work until every one is ready


def _work(index: int) -> int:
    return int(_TRANSFORM(index)["image"][0, 0, 0])


def plain_rate(source, *, workers: int, images: int, side: int, crop: str, decoder: str | None) -> dict:
    """Images per second (and CPU ms per image) of the pipeline's per-image work (read, decode, crop, flip) on
    ``images`` examples in a plain Pool of ``workers`` processes (0: a loop in this process), started and
    warm before timing."""
    from train.data.stream import TrainTransform

    transform = TrainTransform(source, side, seed=0, epoch=0, crop=crop, decoder=decoder)
    indices = np.resize(np.arange(len(source)), images).tolist()
    def timed(run) -> dict:
        cpu, started = _cpu_seconds(), time.perf_counter()
        run()
        elapsed = time.perf_counter() - started
        return {"images_per_sec": images / elapsed, "cpu_ms_per_image": _cpu_ms(cpu, images)}

    if workers == 0:
        transform(0)
        return timed(lambda: [transform(index) for index in indices])
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start, initargs=(transform, context.Barrier(workers))) as pool:
        pool.map(_work, range(workers), chunksize=1)
        return timed(lambda: pool.map(_work, indices, chunksize=max(1, images // (workers * 8))))


def decoding_differences(source, side: int, count: int = 200) -> dict:
    """How far decoding at reduced size moves the pixels, over ``count`` images of ``source``: per back end,
    the share of training crops (random-resized, to ``side``) decoded reduced and their mean absolute
    difference from the whole-image path, and the same for evaluation's resize of the shorter side to
    256/224 of ``side`` (which the pipeline keeps exact: published weights are scored on those pixels)."""
    from PIL import Image

    from train.data import jpeg
    from flaxnets.images import resize_shorter, shorter_size
    from train.data.geometry import crop_box, eval_side

    backends = [name for name in ("pillow", "opencv") if name == "pillow" or jpeg.importlib.util.find_spec("cv2")]
    found: dict[str, dict[str, list]] = {name: {"train": [], "train_reduced": [], "eval": [], "eval_reduced": []}
                                         for name in backends}
    for index in np.linspace(0, len(source) - 1, min(count, len(source))).astype(int):
        data, _ = source.encoded(int(index))
        whole = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        h, w = whole.shape[:2]
        top, left, ch, cw = crop_box(h, w, np.random.default_rng(int(index)))
        exact_crop = np.asarray(Image.fromarray(whole[top:top + ch, left:left + cw]).resize(
            (side, side), Image.BILINEAR, reducing_gap=None), np.int16)
        eval_size = shorter_size(h, w, eval_side(side))
        exact_eval = resize_shorter(whole, eval_side(side)).astype(np.int16)
        for name in backends:
            for kind, crop, exact in (("train", jpeg.Crop(top, left, ch, cw, side, side), exact_crop),
                                      ("eval", jpeg.Crop(0, 0, h, w, *eval_size), exact_eval)):
                difference = float(np.abs(jpeg.decode_crop(data, crop, name) - exact).mean())
                found[name][kind + ("_reduced" if jpeg.dct_scale(crop) > 1 else "")].append(difference)
    summary = {}
    for name, lists in found.items():
        for kind in ("train", "eval"):
            everything = lists[kind] + lists[kind + "_reduced"]
            summary[f"{name} {kind}"] = {
                "reduced_share": len(lists[kind + "_reduced"]) / len(everything),
                "mad_reduced": float(np.mean(lists[kind + "_reduced"])) if lists[kind + "_reduced"] else None,
                "mad_full_size": float(np.mean(lists[kind])) if lists[kind] else None}
    return summary


def _summary(measured: list[dict]) -> dict:
    """Median and min-max of the images/s of several measurements, and their median CPU ms per image."""
    rates = [m["images_per_sec"] for m in measured]
    cpu = [m["cpu_ms_per_image"] for m in measured if m["cpu_ms_per_image"] is not None]
    return {"images_per_sec": statistics.median(rates), "min": min(rates), "max": max(rates),
            "cpu_ms_per_image": statistics.median(cpu) if cpu else None}


def _describe(summary: dict) -> str:
    text = f"{summary['images_per_sec']:,.0f} images/s (min {summary['min']:,.0f}, max {summary['max']:,.0f})"
    if summary["cpu_ms_per_image"] is not None:
        text += f", {summary['cpu_ms_per_image']:.2f} CPU ms/image"
    return text


def _mean_kib(source, count: int = 200) -> float:
    picks = np.linspace(0, len(source) - 1, min(count, len(source))).astype(int)
    return float(np.mean([len(source.encoded(int(i))[0]) for i in picks])) / 1024


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    # Imported here, not above: the plain loop's processes import this module, and need no JAX.
    from train.exits import run_command
    from train.data.stream import default_workers

    parser = CommandParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="folder of generated JPEGs (created or reused); default: a temporary one")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--copy-side", type=int, default=256, help="shorter side of the resized copy also "
                        "measured (0: none); it is kept beside --folder as FOLDER-sSIDE")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default: one per core)")
    parser.add_argument("--decoder", choices=("auto", "opencv", "pillow", "whole"), nargs="+", default=["auto"],
                        help="as the trainer's --decoder (several: they alternate like the worker counts); whole: "
                        "every image decoded whole, then cropped")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=32, help="batches timed once steady (rounded up to whole "
                        "rounds of the workers)")
    parser.add_argument("--segments", type=int, default=8, help="most half-windows timed while waiting for two "
                        "that agree")
    parser.add_argument("--skip", type=int, default=0, help="batches read before the clock starts, if more than "
                        "the read-ahead the workers can hold")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--crop", choices=("inception", "alexnet"), default="inception")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="leave out the plain Pool loop")
    parser.add_argument("--differences", action="store_true", help="also measure how far reduced decoding moves "
                        "the pixels (`decoding_differences`, on the originals)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    def body() -> int:
        from train.data import load_folder
        from train.data.jpeg import resolve_backend

        for name in ("images", "batch", "batches", "side", "repeats", "segments"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name} must be positive.")
        if args.copy_side < 0 or args.skip < 0:
            raise ConfigError("--copy-side and --skip cannot be negative.")
        workers = args.workers or [default_workers()]
        if min(workers) < 0:
            raise ConfigError("--workers must be 0 or more.")
        decoders = [None if name == "whole" else resolve_backend(name) for name in args.decoder]
        load_before = os.getloadavg()
        holder = None
        folder = args.folder
        if folder is None:
            holder = tempfile.TemporaryDirectory(prefix="flaxnets-jpegs-")
            folder = os.path.join(holder.name, "originals")
        started = time.perf_counter()
        make_folder(folder, args.images)
        generated = time.perf_counter() - started
        kinds = {"originals": folder}
        prepared = None
        if args.copy_side:
            started = time.perf_counter()
            kinds[f"copy-{args.copy_side}"] = make_copy(folder, f"{folder.rstrip(os.sep)}-s{args.copy_side}",
                                                        args.copy_side)
            prepared = time.perf_counter() - started
        datasets = {kind: load_folder(path, holdout=0.01) for kind, path in kinds.items()}
        sizes = {kind: round(_mean_kib(data.train), 1) for kind, data in datasets.items()}
        print(f"{args.images} JPEGs in {folder} (generated in {generated:.1f} s), mean {sizes['originals']:.0f} KiB"
              + (f"; copy at shorter side {args.copy_side} in {kinds[f'copy-{args.copy_side}']} (prepared in "
                 f"{prepared:.1f} s), mean {sizes[f'copy-{args.copy_side}']:.0f} KiB" if prepared is not None else ""),
              flush=True)
        differences = decoding_differences(datasets["originals"].train, args.side) if args.differences else None
        for name, found in (differences or {}).items():
            text = ", ".join(f"{key.replace('_', ' ')} {value:.2f}" for key, value in found.items() if value is not None)
            print(f"{name}: {text} (mean absolute difference from the whole-image path, in levels of 255)", flush=True)
        # Worker counts and decoders alternate within each repeat, so a change in the machine's load hits all.
        results: dict[tuple[str, int, str | None], dict[str, list]] = {}
        for _ in range(args.repeats):
            for kind, data in datasets.items():
                for count, decoder in itertools.product(workers, decoders):
                    row = results.setdefault((kind, count, decoder), {"pipeline": [], "plain": []})
                    measured = pipeline_rate(data, workers=count, batch=args.batch, batches=args.batches,
                                             side=args.side, crop=args.crop, decoder=decoder, skip=args.skip,
                                             segments=args.segments)
                    row["pipeline"].append(measured)
                    if args.plain:
                        row["plain"].append(plain_rate(data.train, workers=count, side=args.side, crop=args.crop,
                                                       decoder=decoder, images=measured["timed_batches"] * args.batch))
        rows = []
        for (kind, count, decoder), values in results.items():
            row = {"data": kind, "workers": count, **_summary(values["pipeline"]),
                   "segment_rates": [m["segment_rates"] for m in values["pipeline"]],
                   "steady": all(m["steady"] for m in values["pipeline"]),
                   "skipped_batches": max(m["skipped_batches"] for m in values["pipeline"]),
                   "timed_batches": values["pipeline"][0]["timed_batches"], "batch": args.batch, "side": args.side,
                   "crop": args.crop, "decoder": decoder or "whole", "repeats": args.repeats,
                   "mean_jpeg_kib": sizes[kind]}
            text = f"{kind}, workers {count}: {_describe(row)}"
            if values["plain"]:
                plain = _summary(values["plain"])
                row.update({f"plain_{key}": value for key, value in plain.items()},
                           of_plain=row["images_per_sec"] / plain["images_per_sec"])
                text += f"; plain Pool {_describe(plain)}; pipeline/plain {row['of_plain']:.2f}"
                if count == 0:  # Grain reads with threads in this process; the plain loop is one thread
                    text += " (Grain's reading threads against one)"
                elif row["of_plain"] > 1.1:
                    text += " (SUSPECT: faster than the plain loop)"
            rows.append(row)
            print(text + f"; {args.repeats} repeats of {row['timed_batches']} batches of {args.batch} after up to "
                  f"{row['skipped_batches']}, decoder {row['decoder']}"
                  + ("" if row["steady"] else " (NOT STEADY: no two segments in a row agreed within 10%; time more "
                     "--batches or --segments)"), flush=True)
        conditions = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "cores_usable": default_workers(), "load_average_before": load_before,
                      "load_average_after": os.getloadavg(), "python": platform.python_version(),
                      "versions": {name: _version(name) for name in ("grain", "array-record", "pillow",
                                                                     "opencv-python-headless", "numpy")},
                      "jpegs": args.images, "copy_side": args.copy_side or None,
                      "generate_s": round(generated, 1), "prepare_s": round(prepared, 1) if prepared else None}
        if args.json:
            with open(args.json + ".tmp", "w") as handle:
                json.dump({"conditions": conditions, "rows": rows, "differences": differences}, handle, indent=1)
            os.replace(args.json + ".tmp", args.json)
        if holder is not None:
            holder.cleanup()
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
