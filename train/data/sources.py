"""Random-access image sources: a tensorflow-datasets split read through `tfds.data_source` (ArrayRecord, no
TensorFlow at training time) and a folder of images with one sub-folder per class.

A source is a sequence: ``source[i]`` is ``(image, label)`` with ``image`` a uint8 ``(H, W, C)`` array of
the example's own size. Sources are picklable and open their files lazily, so Grain's worker processes
can each read them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import warnings
from typing import IO, Sequence

import numpy as np

from flaxnets.cli import error_phrase
from train.data.errors import DataError
from train.data.optional import no_stray_tfds_folders, require

__all__ = ["TfdsSource", "FolderSource", "Subset", "source_labels", "scan_folder", "decode_image",
           "IMAGE_EXTENSIONS"]

STATS_FOLDER = "flaxnets-stats"  # where `train.data.stats` keeps a folder dataset's statistics: not a class
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class TfdsSource:
    """One split of a prepared tensorflow-datasets dataset, as ``(image, label)`` pairs."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str = "image",
                 label_key: str = "label"):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            tfds = require("tensorflow_datasets", f"reading {self.name}")
            with no_stray_tfds_folders():
                self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._length

    def _pair(self, record: dict) -> tuple[np.ndarray, int]:
        image = np.asarray(record[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        return image.astype(np.uint8, copy=False), int(record[self.label_key])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self._pair(self._open()[int(index)])

    def labelled(self) -> bool:
        """Whether the split has labels: tensorflow-datasets gives every example of an unlabelled split
        (ImageNet's test split) the label -1, so its first example tells."""
        return len(self) == 0 or self[0][1] >= 0

    def labels(self) -> np.ndarray:
        """Every example's label, in order: read without decoding the images where tensorflow-datasets can
        (its records deserialised but not decoded), else by reading the examples."""
        import tensorflow_datasets as tfds

        def read_all(source, label):
            labels = np.empty(len(source), np.int32)
            chunk = 4096
            for start in range(0, len(source), chunk):
                keys = list(range(start, min(start + chunk, len(source))))
                try:
                    records = source.__getitems__(keys)
                except (AttributeError, TypeError):  # sources without batched reads (tfds' mock data)
                    records = [source[key] for key in keys]
                labels[start:start + len(keys)] = [label(record) for record in records]
            return labels

        try:
            with no_stray_tfds_folders():
                raw = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                       deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)
            return read_all(raw, lambda record: int(np.asarray(record[self.label_key])))
        except Exception:  # noqa: BLE001 - no undecoded path for this dataset here: decode as training does
            return read_all(self._open(), lambda record: int(record[self.label_key]))

    def read_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """Several examples in one read (ArrayRecord reads them in parallel)."""
        source, keys = self._open(), [int(i) for i in indices]
        try:
            records = source.__getitems__(keys)
        except (AttributeError, TypeError):  # a source without batched reads (tfds' mock data)
            records = [source[key] for key in keys]
        return [self._pair(record) for record in records]


def decode_image(path: str | IO[bytes], channels: int = 3) -> np.ndarray:
    """A file's (or an open binary file's) pixels as uint8 ``(H, W, channels)``: grey, palette, 16-bit, CMYK
    and alpha images are all brought to RGB (alpha composited over white, as a viewer shows it) or to one
    grey channel."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, np.float64)
            # 16-bit modes span 0-65535 whatever their values; mode "I" (32-bit) says nothing of its range.
            top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
        if image.mode == "P" or image.mode in ("LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, np.uint8)
    return array[..., None] if channels == 1 else array


def _readable(path: str) -> str | None:
    """None if ``path`` opens as an image, else why not (one phrase)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return error_phrase(error)


def scan_folder(root: str, check: bool = True, workers: int = 8) -> tuple[list[str], list[int], tuple[str, ...], list[str]]:
    """Image files under ``root`` (one sub-folder per class, sorted by name), their labels, the class names
    and the files that could not be read (each reported once, by name, on stderr)."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a folder.")
    classes = tuple(sorted(entry.name for entry in os.scandir(root)
                           if entry.is_dir() and not entry.name.startswith(".") and entry.name != STATS_FOLDER))
    if not classes:
        raise DataError(f"{root} has no class sub-folders: put each class's images in a folder named after it.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):  # as ImageFolder
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    paths.append(os.path.join(folder, file))
                    labels.append(label)
    broken = []
    if check and paths:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_readable, paths))
        broken = [path for path, reason in zip(paths, reasons) if reason]
        for path, reason in zip(paths, reasons):
            if reason:
                print(f"warning: skipping {path}: not a readable image ({reason}).", file=sys.stderr, flush=True)
        keep = [i for i, reason in enumerate(reasons) if not reason]
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if not paths:
        raise DataError(f"{root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths, labels, classes, broken


@dataclasses.dataclass
class FolderSource:
    """Image files with their labels, decoded on access. A file that fails to decode (truncated after its
    header) is reported once and replaced by the next readable file, so a batch never comes up short."""

    paths: Sequence[str]
    labels: Sequence[int]
    channels: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)
        for offset in range(min(len(self.paths), 100)):
            where = (index + offset) % len(self.paths)
            try:
                return decode_image(self.paths[where], self.channels), int(self.labels[where])
            except (OSError, SyntaxError, ValueError) as error:
                warnings.warn(f"skipping {self.paths[where]}: cannot decode it ({error}).", stacklevel=2)
        raise DataError(f"a hundred files in a row from {self.paths[index]} on cannot be decoded.")

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The file's bytes and its label, for decoding straight to a crop (`train.data.geometry.read_crop`)."""
        index = int(index)
        with open(self.paths[index], "rb") as handle:
            return handle.read(), int(self.labels[index])


@dataclasses.dataclass
class Subset:
    """The examples ``indices`` of ``source``, in that order: a split held out of another one."""

    source: Sequence
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.source[int(self.indices[int(index)])]

    @property
    def encoded(self):
        """The encoded form of example ``index`` (``encoded(index) -> (bytes, label)``) when the source has
        one, else None."""
        inner = getattr(self.source, "encoded", None)
        if inner is None:
            return None
        return lambda index: inner(int(self.indices[int(index)]))

    def read_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        keys = [int(self.indices[int(i)]) for i in indices]
        if hasattr(self.source, "read_many"):
            return self.source.read_many(keys)
        return [self.source[key] for key in keys]

    def labels(self) -> np.ndarray:
        return source_labels(self.source)[self.indices]


def source_labels(source: Sequence) -> np.ndarray:
    """Every label of a source, in order: from its ``labels`` (a list, or a method that reads them without
    decoding images), else by reading each example."""
    labels = getattr(source, "labels", None)
    if callable(labels):
        return np.asarray(labels(), np.int32)
    if labels is not None:
        return np.asarray(labels, np.int32)
    return np.asarray([source[i][1] for i in range(len(source))], np.int32)
