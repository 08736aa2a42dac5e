"""Datasets by name: the embedded digits, the original files of MNIST, Fashion-MNIST and CIFAR, any
tensorflow-datasets image-classification dataset, and folders of images (`load_dataset`, `load_split`).

`load_dataset` returns a `Dataset` (uint8 arrays in memory) or a `Streamed` dataset (random-access sources
read through Grain); `fit_in_memory` decides, for a given input side, whether a streamed one is small
enough to hold in memory, where it is shuffled and augmented on the devices.

Names:

- ``digits``: scikit-learn's bundled 8x8 digits, always available offline.
- ``mnist``, ``fashion_mnist``: the four IDX .gz files in ``--data-dir`` when it holds them (checked
  against tensorflow-datasets' SHA-256), else the tensorflow-datasets copy.
- ``cifar10``, ``cifar100``: the original tarballs or batches in ``--data-dir`` when it holds them, else the
  tensorflow-datasets copy.
- ``folder``: ``--data-dir`` holds one sub-folder per class (like torchvision's ImageFolder), or ``train/``
  and ``val/`` (or ``validation/``, ``test/``) folders that each do; or it holds a resized copy of such a
  folder that ``python -m train.data prepare folder`` wrote (`train.data.resized`), read the same way.
- any other name (``imagenet2012``, ``imagenette``, ...): a tensorflow-datasets dataset prepared in
  ``--data-dir`` (default: tensorflow-datasets' own, ``~/tensorflow_datasets``) in the ArrayRecord format;
  ``python -m train.data prepare NAME`` prepares one.

A validation split (``--val-split``) is either a fraction of the training split held out per class with a
fixed seed (every source), or the name of a split the dataset has of its own (tensorflow-datasets' splits,
a folder's ``val/``); `train.data.splits` says how.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from train.data.cifar import CIFAR, load_cifar
from train.data.errors import DataError
from train.data.folder import load_folder, load_folder_split
from train.data.memory import IDX_FILES, Dataset, checked, load_digits, load_idx, with_statistics
from train.data.names import BUILTIN
from train.data.splits import parse_val_split, with_validation
from train.data.stats import pixel_statistics, read_stats, streamed_stats_path, write_stats
from train.data.stream import Streamed, materialize
from train.data.tfds_sets import load_tfds, load_tfds_split

__all__ = ["dataset_names", "load_dataset", "load_split", "fit_in_memory", "ensure_statistics", "sample_in_memory",
           "MEMORY_LIMIT_BYTES"]

# A dataset whose training images take more than this (at the side the model sees) streams instead.
MEMORY_LIMIT_BYTES = 2 << 30

def dataset_names() -> list[str]:
    """The names this module reads without tensorflow-datasets' catalogue (which adds hundreds more)."""
    return list(BUILTIN)


def _has_files(data_dir: str | None, name: str) -> bool:
    if not data_dir or not os.path.isdir(data_dir):
        return False
    present = set(os.listdir(data_dir))
    if name in ("mnist", "fashion_mnist"):
        return bool(present & set(IDX_FILES))
    info = CIFAR[name]
    markers = {info["tarball"][0], info["folder"], info["binary"][0], info["binary"][1]}
    markers |= {f for f, _ in info["train"]}
    return bool(present & markers)


def load_dataset(name: str, data_dir: str | None = None, val_split: str | None = None,
                 seed: int = 0) -> Dataset | Streamed:
    """The dataset called ``name`` (see the module docstring), checked, with its pixel statistics, and with
    the validation split ``val_split`` (`parse_val_split`) when one is asked for."""
    val = parse_val_split(val_split)
    named = val if isinstance(val, str) else None
    if name == "digits":
        if data_dir:
            raise DataError("--dataset digits ships with the install and reads no files; leave out --data-dir "
                            f"({data_dir}).")
        data = checked(with_statistics(load_digits()))
    elif name in ("mnist", "fashion_mnist") and (_has_files(data_dir, name) or (data_dir and not _tfds_dir(data_dir))):
        data = checked(with_statistics(load_idx(name, data_dir)))
    elif name in CIFAR and (_has_files(data_dir, name) or (data_dir and not _tfds_dir(data_dir))):
        if not os.path.isdir(data_dir):
            raise DataError(f"--data-dir {data_dir} is not a folder.")
        data = checked(with_statistics(load_cifar(name, data_dir)))
    elif name == "folder":
        return with_validation(load_folder(data_dir, val_name=named), val, seed, data_dir)
    else:
        return with_validation(load_tfds(name, data_dir, val_name=named), val, seed, data_dir)
    if named is not None:
        raise DataError(f"{data.name} as read here has only a train and a test split, no {named!r} split: hold out a "
                        "fraction of the training split instead, e.g. --val-split 0.1.")
    return with_validation(data, val, seed, data_dir)


def load_split(name: str, data_dir: str | None, split: str | None = None) -> Streamed:
    """One labelled split of a dataset alone, as the test split of a `Streamed` dataset with no training
    examples: what scoring published weights reads (``python -m train.evaluate --weights``), so a dataset
    prepared without its training split (ImageNet from its validation archive alone) is enough.

    ``name`` is a tensorflow-datasets name prepared in ``data_dir`` or ``folder`` (``data_dir`` holding one
    sub-folder per class, or such a folder named ``split``). ``split`` defaults to the first of
    validation, val and test that exists; for a folder without those, the whole folder.
    """
    if name == "folder":
        return load_folder_split(data_dir, split)
    return load_tfds_split(name, data_dir, split)


def _tfds_dir(data_dir: str) -> bool:
    """Whether ``data_dir`` looks like a tensorflow-datasets data folder (NAME/VERSION/dataset_info.json)."""
    if not os.path.isdir(data_dir):
        return False
    for entry in os.scandir(data_dir):
        if entry.is_dir():
            for version in os.scandir(entry.path):
                if version.is_dir() and os.path.exists(os.path.join(version.path, "dataset_info.json")):
                    return True
    return False


def fit_in_memory(data: Dataset | Streamed, side: int, pipeline: str = "auto") -> Dataset | Streamed:
    """``data`` in memory when ``pipeline`` is "memory", or "auto" and its training images at ``side`` take
    at most `MEMORY_LIMIT_BYTES`; else the streamed dataset with its statistics (see `ensure_statistics`)."""
    if data.in_memory:
        if pipeline == "stream":
            raise DataError(f"{data.name} is read into memory; --pipeline stream applies to tensorflow-datasets "
                            "datasets and folders.")
        return data
    channels = data.image_shape[-1]
    stored = data.image_shape[:2] if data.fixed_size else (side, side)
    size = data.train_size * stored[0] * stored[1] * channels
    if pipeline == "memory" or (pipeline == "auto" and size <= MEMORY_LIMIT_BYTES):
        print(f"reading {data.train_size + data.test_size:,} images of {data.name} into memory "
              f"({size / 2**20:,.0f} MiB of training images)...", file=sys.stderr, flush=True)
        return checked(materialize(data, None if data.fixed_size else side))
    return data


def ensure_statistics(data: Streamed, data_dir: str | None, sample: int = 2000, seed: int = 0) -> Streamed:
    """``data`` with mean, std and colour PCA: read from its stats file, or computed over ``sample`` random
    training images (at most 256 pixels on the shorter side) and stored for the next run."""
    from flaxnets.images import resize_shorter

    path = streamed_stats_path(data.name, data_dir)
    stats = read_stats(path)
    if stats is None:
        count = min(sample, data.train_size)
        indices = np.random.default_rng(seed).choice(data.train_size, count, replace=False)
        print(f"computing the pixel statistics of {data.name} over {count:,} training images "
              f"(stored in {path})...", file=sys.stderr, flush=True)

        def image(index: int) -> np.ndarray:
            pixels = data.train[index][0]
            return resize_shorter(pixels, 256) if min(pixels.shape[:2]) > 256 else pixels
        stats = pixel_statistics(image(int(i)) for i in indices)
        try:
            write_stats(path, stats, dataset=data.name, sample=count, seed=seed)
        except OSError as error:
            print(f"warning: cannot store the statistics in {path} ({error}); they will be computed again.",
                  file=sys.stderr, flush=True)
    return dataclasses.replace(data, **stats)


def sample_in_memory(data: Dataset | Streamed, side: int, *, test_limit: int = 1000, per_class: int = 1,
                     scan_limit: int = 50) -> Dataset:
    """A small in-memory `Dataset` for looking at a streamed one (plots): up to ``per_class`` training images
    of each class (found among the first ``scan_limit`` x classes training examples) and the first
    ``test_limit`` test images, all prepared as evaluation prepares them (centre crop at ``side``).
    A `Dataset` already in memory is returned as it is."""
    if data.in_memory:
        return data
    from train.data.stream import EvalTransform

    def prepared(source, index):
        if data.fixed_size:  # already the size the model sees
            return source[index]
        example = EvalTransform(source, side)(index)
        return example["image"], int(example["label"])

    train_images, train_labels, found = [], [], {}
    for index in range(min(data.train_size, scan_limit * data.num_classes) if per_class > 0 else 0):
        _, label = data.train[index]
        if found.get(label, 0) >= per_class:
            continue
        image, label = prepared(data.train, index)
        train_images.append(image)
        train_labels.append(label)
        found[label] = found.get(label, 0) + 1
        if len(found) == data.num_classes and min(found.values()) >= per_class:
            break
    test = [prepared(data.test, i) for i in range(min(test_limit, data.test_size))]
    shape = (side, side, data.image_shape[-1]) if not data.fixed_size else tuple(data.image_shape)
    train_x = np.stack(train_images) if train_images else np.zeros((0,) + shape, np.uint8)
    test_x = np.stack([t[0] for t in test]) if test else np.zeros((0,) + shape, np.uint8)
    return dataclasses.replace(Dataset(data.name, train_x, np.asarray(train_labels, np.int32), test_x,
                                   np.asarray([t[1] for t in test], np.int32), data.class_names, flip=data.flip,
                                   crop_padding=data.crop_padding), mean=data.mean, std=data.std)
