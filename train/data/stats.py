"""Per-channel statistics of a dataset's training images: mean, std and the colour PCA.

Krizhevsky et al. 2012 (section 4.1) add to every training image multiples of the principal components of
the RGB pixel values over the training set, with magnitudes proportional to the eigenvalues times a
Gaussian of standard deviation 0.1 ("PCA colour augmentation", often called "lighting" noise). The
eigenvectors and eigenvalues come from the 3x3 covariance of all pixels, computed here on pixel values
scaled to [0, 1], the scale at which the trainer adds the noise.

Datasets held in memory get their statistics when loaded (a second or two for CIFAR-10). Streamed ones
(ImageNet, large folders) get them from ``python -m train.data stats`` over a seeded sample of training
images, stored as JSON beside the data and read back by every later run.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

__all__ = ["pixel_statistics", "StatsAccumulator", "stats_path", "streamed_stats_path", "read_stats", "write_stats"]

STATS_VERSION = 1


class StatsAccumulator:
    """Running float64 sums of pixels and of their outer products, fed one uint8 batch at a time."""

    def __init__(self):
        self.count = 0
        self.sum = None
        self.outer = None

    def add(self, images: np.ndarray) -> None:
        """Add uint8 images of shape (..., C): every pixel counts once."""
        pixels = np.asarray(images).reshape(-1, np.shape(images)[-1]).astype(np.float64) / 255.0
        if self.sum is None:
            self.sum = np.zeros(pixels.shape[1])
            self.outer = np.zeros((pixels.shape[1],) * 2)
        self.count += len(pixels)
        self.sum += pixels.sum(axis=0)
        self.outer += pixels.T @ pixels

    def result(self) -> dict:
        """Mean, std (floored at 1e-3 so a constant channel cannot divide by zero), eigenvalues (descending)
        and eigenvectors (one per column) of the pixel covariance."""
        if not self.count:
            raise ValueError("no pixels were added.")
        mean = self.sum / self.count
        covariance = self.outer / self.count - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(covariance)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        # eigh's signs are arbitrary; make each vector's largest component positive so files are stable.
        eigvec = eigvec * np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(len(order))])
        std = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        return {
            "mean": tuple(float(m) for m in mean),
            "std": tuple(float(max(s, 1e-3)) for s in std),
            "eigval": tuple(float(v) for v in eigval),
            "eigvec": tuple(tuple(float(v) for v in row) for row in eigvec),
        }


def pixel_statistics(images: np.ndarray | Iterable[np.ndarray], chunk: int = 4096) -> dict:
    """Mean, std, eigval and eigvec of uint8 images (an (N, H, W, C) array or an iterable of images)."""
    accumulator = StatsAccumulator()
    if isinstance(images, np.ndarray):
        for start in range(0, len(images), chunk):
            accumulator.add(images[start:start + chunk])
    else:
        for image in images:
            accumulator.add(image)
    return accumulator.result()


def stats_path(data_dir: str, name: str) -> str:
    """Where the statistics of ``name`` live: ``DATA_DIR/flaxnets-stats/NAME.json``."""
    return os.path.join(data_dir, "flaxnets-stats", name.replace("/", "_").replace(":", "_") + ".json")


def streamed_stats_path(name: str, data_dir: str | None) -> str:
    """Where the statistics of the streamed dataset ``name`` live: in ``data_dir`` for a folder of images,
    else in tensorflow-datasets' folder (``data_dir``, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    if name == "folder":
        return stats_path(data_dir, name)
    return stats_path(data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                                                   "tensorflow_datasets"), name)


def read_stats(path: str) -> dict | None:
    """The statistics stored at ``path``, or None when there are none (or they are from another version)."""
    try:
        with open(path) as handle:
            values = json.load(handle)
    except (OSError, ValueError):
        return None
    if values.get("version") != STATS_VERSION:
        return None
    return {key: tuple(tuple(v) if isinstance(v, list) else v for v in values[key])
            for key in ("mean", "std", "eigval", "eigvec")}


def write_stats(path: str, stats: dict, **facts) -> None:
    """Store ``stats`` (and facts such as the sample size) at ``path``, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = {"version": STATS_VERSION, **facts,
              **{key: [list(v) if isinstance(v, tuple) else v for v in stats[key]]
                 for key in ("mean", "std", "eigval", "eigvec")}}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(values, handle, indent=2)
    os.replace(tmp, path)
