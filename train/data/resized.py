"""A resized copy of an image folder in ArrayRecord files (``python -m train.data prepare folder``).

Decoding is what limits a streamed pipeline, and its cost grows with the pixels decoded: the average
ImageNet training image is about 400x350, and a copy at shorter side 256 decodes in about half the time
(benchmarks/RESULTS.md). Training at 224 from such a copy is the usual recipe (Goyal et al. 2017, "Accurate,
Large Minibatch SGD", and FFCV store ImageNet this way); evaluation's resize to 256 then crop to 224 becomes
a crop alone.

A copy is a folder:

- ``flaxnets-copy.json``, the index: classes, the splits (file, images per class), the shorter side, the
  JPEG quality and the folder it was made from;
- ``SPLIT.array_record`` for each split (``train``, ``val``, ``validation``, ``test`` as the source has them;
  ``all`` for a source of class folders alone): one record per image, in the order `scan_folder` lists the
  source (by class, then by path), each the label as a 4-byte little-endian integer followed by the JPEG.

Images whose shorter side exceeds the chosen side are resized as torchvision's ``Resize(side)`` resizes
(`flaxnets.images.resize_shorter`) and stored as JPEG at the stated quality; smaller JPEGs are stored as
they are, byte for byte, and other formats re-encoded at full size. Files that do not decode are skipped
and named in the index. A copy is written under a temporary name beside its destination and renamed into
place when whole, so an interrupted prepare leaves no partial copy where a whole one would be expected;
an existing copy is replaced only when asked (``--overwrite``), and a folder that is not a copy never.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
from typing import Sequence, TextIO

import numpy as np

from flaxnets.cli import error_phrase
from train.data.errors import DataError
from train.data.optional import require
from train.data.sources import decode_image, scan_folder

__all__ = ["INDEX", "RecordSource", "is_copy", "read_index", "copy_splits", "open_split", "write_copy", "SPLITS"]

INDEX = "flaxnets-copy.json"
FORMAT = "flaxnets resized image copy"
VERSION = 1
WHOLE = "all"  # the split name of a source without train/test folders
SPLITS = ("train", "val", "validation", "test")  # the sub-folders copied as splits, when the source has them
_LABEL = struct.Struct("<i")


def is_copy(folder: str | None) -> bool:
    """Whether ``folder`` holds a resized copy (its index file)."""
    return bool(folder) and os.path.isfile(os.path.join(folder, INDEX))


def read_index(folder: str) -> dict:
    """The index of the copy in ``folder``, checked, or a `DataError` saying what is wrong with it."""
    path = os.path.join(folder, INDEX)
    try:
        with open(path) as handle:
            index = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read as a copy's index ({error}); prepare the copy again.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path} is not the index of a copy this version reads (format {FORMAT!r}, version "
                        f"{VERSION}); prepare the copy again.")
    return index


def copy_splits(folder: str) -> tuple[str, ...]:
    """The splits a copy holds (``all`` for one made from class folders alone)."""
    return tuple(read_index(folder)["splits"])


def open_split(folder: str, split: str | None) -> tuple["RecordSource", tuple[str, ...]]:
    """The examples of ``split`` of the copy in ``folder`` (None: its only split ``all``) and the class names."""
    index = read_index(folder)
    split = WHOLE if split is None else split
    if split not in index["splits"]:
        raise DataError(f"the copy in {folder} has no split {split!r} (it has {', '.join(index['splits'])}).")
    entry = index["splits"][split]
    path = os.path.join(folder, entry["file"])
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing from the copy in {folder}; prepare the copy again.")
    return RecordSource(path, tuple(entry["per_class"])), tuple(index["classes"])


@dataclasses.dataclass
class RecordSource:
    """The images of one split of a copy: ``source[i]`` is ``(uint8 (H, W, 3), label)``, ``encoded(i)`` the
    JPEG's bytes and the label. The file opens lazily, so the source pickles into worker processes."""

    path: str
    per_class: tuple[int, ...]

    def __post_init__(self):
        self._records = None

    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def _open(self):
        if self._records is None:
            require("array_record", "reading a resized copy")
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._records = ArrayRecordDataSource([self.path])
        return self._records

    def __len__(self) -> int:
        return int(sum(self.per_class))

    @staticmethod
    def _split(record: bytes) -> tuple[bytes, int]:
        return record[_LABEL.size:], _LABEL.unpack_from(record)[0]

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The stored JPEG and its label."""
        return self._split(self._open()[int(index)])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        data, label = self.encoded(index)
        return decode_image(io.BytesIO(data)), label

    def read_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """Several examples in one read (ArrayRecord reads them in parallel)."""
        records = self._open().__getitems__([int(i) for i in indices])
        return [(decode_image(io.BytesIO(data)), label) for data, label in map(self._split, records)]

    def labels(self) -> np.ndarray:
        """Every label, in order, from the index alone (the records are in class order)."""
        return np.repeat(np.arange(len(self.per_class), dtype=np.int32), self.per_class)


def _source_splits(source: str) -> dict[str, str]:
    """split name -> folder to copy: the source's train/val/validation/test folders when it has train/ and one
    of the others (as `train.data.load_folder` reads it), else the whole source as ``all``."""
    present = {name: os.path.join(source, name) for name in SPLITS if os.path.isdir(os.path.join(source, name))}
    if "train" in present and len(present) > 1:
        return present
    return {WHOLE: source}


def _shrink(path: str, side: int, quality: int) -> tuple[bytes | None, str]:
    """The file at ``path`` as the copy stores it: ``(JPEG bytes, "resized"|"kept"|"re-encoded")``, or
    ``(None, why)`` when it does not decode."""
    from PIL import Image

    from train.data.jpeg import jpeg_shape
    from flaxnets.images import resize_shorter

    try:
        with open(path, "rb") as handle:
            data = handle.read()
        shape = jpeg_shape(data)
        if shape is not None and min(shape) <= side:
            Image.open(io.BytesIO(data)).load()  # stored as it is, so it must decode whole
            return data, "kept"
        image = decode_image(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as error:
        return None, error_phrase(error)
    resized = min(image.shape[:2]) > side
    if resized:
        image = resize_shorter(image, side)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue(), "resized" if resized else "re-encoded"


def _check_destination(source: str, output: str, overwrite: bool) -> None:
    real_source, real_output = os.path.realpath(source), os.path.realpath(output)
    if real_output == real_source or real_output.startswith(real_source + os.sep):
        raise DataError(f"--output {output} lies inside the source folder {source}, where it would be read as a "
                        "class; choose a folder outside it.")
    if real_source.startswith(real_output + os.sep):
        raise DataError(f"--output {output} holds the source folder {source}; choose another folder.")
    if os.path.lexists(output):
        if is_copy(output):
            if not overwrite:
                raise DataError(f"{output} already holds a prepared copy; pass --overwrite to replace it, or choose "
                                "another --output.")
        elif not os.path.isdir(output) or os.listdir(output):
            raise DataError(f"{output} exists and is not a prepared copy; choose another --output (nothing there is "
                            "ever replaced).")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise DataError(f"--output {output} cannot be made: {parent} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--output {output} cannot be written: {parent} is read-only here.")


def write_copy(source: str, output: str, *, shorter_side: int, quality: int = 90, workers: int | None = None,
               overwrite: bool = False, log: TextIO | None = None) -> dict:
    """Write the copy of the image folder ``source`` into ``output`` (see the module docstring) with
    ``workers`` processes (default: one per core); returns its index."""
    from train.data.stream import default_workers

    log = log or sys.stderr
    if not isinstance(shorter_side, int) or shorter_side < 1:
        raise DataError(f"--shorter-side must be a positive number of pixels, got {shorter_side!r}.")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise DataError(f"--quality must be a JPEG quality from 1 to 100, got {quality!r}.")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    if not source or not os.path.isdir(source):
        raise DataError(f"--data-dir {source} is not a folder of images.")
    if is_copy(source):
        raise DataError(f"{source} is itself a prepared copy; prepare from the original images.")
    _check_destination(source, output, overwrite)
    require("array_record", "writing a resized copy")
    from array_record.python.array_record_module import ArrayRecordWriter

    # Unreadable files are found (and named) by the workers that decode them, in the same pass.
    splits = {name: scan_folder(folder, check=False) for name, folder in _source_splits(source).items()}
    classes = next(iter(splits.values()))[2]
    for name, (_, _, split_classes, _) in splits.items():
        if split_classes != classes:
            raise DataError(f"{source}/{name} has classes {', '.join(split_classes)}, unlike the other splits' "
                            f"{', '.join(classes)}.")
    total = sum(len(paths) for paths, _, _, _ in splits.values())
    temporary = _sibling(output, "partial")
    index = {"format": FORMAT, "version": VERSION, "classes": list(classes), "shorter_side": shorter_side,
             "quality": quality, "record": "the label as a 4-byte little-endian integer, then the JPEG file",
             "splits": {}, "kept": 0, "resized": 0, "re-encoded": 0, "skipped": [],
             "source": os.path.abspath(source), "created": datetime.datetime.now().isoformat(timespec="seconds")}
    done, started, shown = 0, time.perf_counter(), time.perf_counter()
    shrink = functools.partial(_shrink, side=shorter_side, quality=quality)
    workers = workers or default_workers()
    try:
        # Spawned, not forked: the parent may hold threads (JAX's, absl's) that a fork would copy mid-state.
        # One worker, or a few images, are done here: starting a process costs more than they do.
        with (multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and total > 64
              else contextlib.nullcontext()) as pool:
            for name, (paths, labels, _, _) in splits.items():
                per_class = [0] * len(classes)
                writer = ArrayRecordWriter(os.path.join(temporary, f"{name}.array_record"), "group_size:1")
                stored = pool.imap(shrink, paths, chunksize=16) if pool else map(shrink, paths)
                for path, label, (data, how) in zip(paths, labels, stored):
                    done += 1
                    if data is None:
                        print(f"warning: skipping {path}: it does not decode ({how}).", file=log, flush=True)
                        index["skipped"].append(os.path.relpath(path, source))
                        continue
                    writer.write(_LABEL.pack(label) + data)
                    per_class[label] += 1
                    index[how] += 1
                    if time.perf_counter() - shown > 10:
                        shown = time.perf_counter()
                        print(f"{done:,} of {total:,} images ({done / (shown - started):,.0f}/s)", file=log, flush=True)
                writer.close()
                if not sum(per_class):
                    raise DataError(f"no image of {source}/{name} decodes; nothing to copy.")
                index["splits"][name] = {"file": f"{name}.array_record", "images": sum(per_class),
                                         "per_class": per_class}
        with open(os.path.join(temporary, INDEX), "w") as handle:
            json.dump(index, handle, indent=1)
        _check_destination(source, output, overwrite)  # again: the folder may have changed meanwhile
        _move_into_place(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # gone already when the copy was moved into place
    return index


def _sibling(output: str, kind: str) -> str:
    """A new hidden folder beside ``output`` (same file system, so renames are atomic), made with the
    permissions a plain mkdir gives."""
    path = os.path.abspath(output)
    sibling = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{os.getpid()}-{time.time_ns()}")
    os.mkdir(sibling)
    return sibling


def _move_into_place(temporary: str, output: str) -> None:
    """Rename the whole copy to ``output``, replacing an earlier copy there only once the new one is whole."""
    if os.path.isdir(output) and os.listdir(output):  # an earlier copy (checked before writing)
        previous = _sibling(output, "replaced")
        os.replace(output, os.path.join(previous, "copy"))
        try:
            os.rename(temporary, output)
        except OSError:
            os.replace(os.path.join(previous, "copy"), output)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(temporary, output)  # over an empty folder, if one is there
