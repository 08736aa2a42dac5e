"""A folder of generated ImageNet-like JPEGs for the input-pipeline benchmarks, and its resized copy.

Each image is a function of (seed, its number) alone: shorter side 300-500 pixels, aspect 3:4 to 4:3 (the
mean ImageNet training image is about 400x350), a smooth random colour field with noise, so that files are
of realistic size (~80 KiB at quality 90). Files already there are kept, so an interrupted run's folder is
reused.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np

__all__ = ["make_folder", "make_copy"]


def _generate(task: tuple[str, int, int]) -> None:
    from PIL import Image

    path, index, seed = task
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(300, 501))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    h, w = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path + ".tmp", format="JPEG", quality=90)
    os.replace(path + ".tmp", path)  # a file there is whole, so an interrupted run's folder is reusable


def make_folder(folder: str, images: int, classes: int = 10, seed: int = 0, workers: int | None = None) -> str:
    """``images`` JPEGs in ``classes`` sub-folders of ``folder`` (those already there kept), each a function
    of (seed, its number) alone, written by ``workers`` processes (default: one per core)."""
    from train.data.stream import default_workers

    tasks = [(os.path.join(folder, f"class_{i % classes:02d}", f"{i:06d}.jpg"), i, seed) for i in range(images)]
    tasks = [task for task in tasks if not os.path.exists(task[0])]
    workers = workers or default_workers()
    if len(tasks) < 50 or workers == 1:
        for task in tasks:
            _generate(task)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_generate, tasks, chunksize=16)
    return folder


def make_copy(folder: str, copy: str, side: int, workers: int | None = None) -> str:
    """The resized copy of ``folder`` at ``side`` in ``copy``, written unless a copy of the same images at
    that side is there already."""
    from train.data import resized

    if resized.is_copy(copy):
        index = resized.read_index(copy)
        images = sum(entry["images"] for entry in index["splits"].values())
        count = sum(len(files) for _, _, files in os.walk(folder))
        if index["shorter_side"] == side and index["source"] == os.path.abspath(folder) and images == count:
            return copy
    resized.write_copy(folder, copy, shorter_side=side, workers=workers, overwrite=True)
    return copy
