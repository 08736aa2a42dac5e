"""Datasets by name: the embedded digits, the original files of MNIST, Fashion-MNIST and CIFAR, any
tensorflow-datasets image-classification dataset, and folders of images.

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
a folder's ``val/``); it is what the trainer chooses its best checkpoint on, so the test split is never
used for a decision.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys

import numpy as np

from train.data.cifar import CIFAR, load_cifar
from train.data.memory import (FASHION_CLASSES, IDX_FILES, DataError, Dataset, load_digits, load_idx, read_idx,
                               recorded_checksums, verify_file, with_statistics)
from train.data import resized
from train.data.optional import require
from train.data.sources import FolderSource, Subset, TfdsSource, scan_folder, source_labels
from train.data.stats import pixel_statistics, read_stats, stats_path, write_stats
from train.data.stream import Streamed, epoch_order, materialize

__all__ = ["DataError", "Dataset", "Streamed", "load_dataset", "load_split", "dataset_names", "fit_in_memory",
           "with_validation", "stratified_holdout", "parse_val_split",
           "ensure_statistics", "epoch_order", "load_digits", "load_idx", "read_idx", "load_cifar", "load_tfds",
           "load_folder", "recorded_checksums", "verify_file", "sample_in_memory", "FASHION_CLASSES",
           "MEMORY_LIMIT_BYTES"]

BUILTIN = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "folder")
# A dataset whose training images take more than this (at the side the model sees) streams instead.
MEMORY_LIMIT_BYTES = 2 << 30
TEST_SPLITS = ("test", "validation", "val")
# The splits `load_split` scores by default, in order: ImageNet's labelled held-out images are its
# validation split (its test split has no labels).
EVAL_SPLITS = ("validation", "val", "test")


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


def parse_val_split(value: str | None) -> float | str | None:
    """``--val-split``: a fraction in (0, 1) of the training split, a split name, or None (no validation)."""
    if value is None or value == "":
        return None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        name = str(value)
        if not name.replace("_", "").replace("-", "").isalnum():
            raise DataError(f"--val-split takes a fraction such as 0.1 or a split name such as validation; "
                            f"got {value!r}.") from None
        return name
    if not 0 < fraction < 1:
        raise DataError(f"--val-split as a fraction must lie strictly between 0 and 1, got {value}.")
    return fraction


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
        data = _checked(with_statistics(load_digits()))
    elif name in ("mnist", "fashion_mnist") and (_has_files(data_dir, name) or (data_dir and not _tfds_dir(data_dir))):
        data = _checked(with_statistics(load_idx(name, data_dir)))
    elif name in CIFAR and (_has_files(data_dir, name) or (data_dir and not _tfds_dir(data_dir))):
        if not os.path.isdir(data_dir):
            raise DataError(f"--data-dir {data_dir} is not a folder.")
        data = _checked(with_statistics(load_cifar(name, data_dir)))
    elif name == "folder":
        return with_validation(load_folder(data_dir, val_name=named), val, seed, data_dir)
    else:
        return with_validation(load_tfds(name, data_dir, val_name=named), val, seed, data_dir)
    if named is not None:
        raise DataError(f"{data.name} as read here has only a train and a test split, no {named!r} split: hold out a "
                        "fraction of the training split instead, e.g. --val-split 0.1.")
    return with_validation(data, val, seed, data_dir)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices held out for validation: ``round(fraction * n)`` examples of each class of ``n``
    (at least one, and at least one left to train on), drawn with a generator seeded by ``seed`` alone,
    so that every process and every resume holds out the same examples."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5A1])
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue  # a single example of a class stays in training
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)


def with_validation(data: Dataset | Streamed, val: float | str | None, seed: int,
                    data_dir: str | None = None) -> Dataset | Streamed:
    """``data`` with a validation split held out of its training split when ``val`` is a fraction (see
    `stratified_holdout`); unchanged otherwise (a named split is opened by the loader)."""
    if not isinstance(val, float):
        return data
    labels = data.train_labels if data.in_memory else _training_labels(data, data_dir)
    held = stratified_holdout(labels, val, seed)
    if len(held) == 0:
        raise DataError(f"--val-split {val} holds out nothing from {data.train_size} training examples: no class "
                        "has two examples to share between training and validation.")
    keep = np.setdiff1d(np.arange(len(labels)), held)
    where = f"{val:g} of the training split, per class, seed {seed}"
    if data.in_memory:
        # The statistics are recomputed on what is left to train on: nothing of the validation images leaks in.
        return _checked(with_statistics(dataclasses.replace(
            data, train_images=data.train_images[keep], train_labels=data.train_labels[keep],
            val_images=data.train_images[held], val_labels=data.train_labels[held], val_from=where)))
    return dataclasses.replace(data, train=Subset(data.train, keep), val=Subset(data.train, held), val_from=where)


def _training_labels(data: Streamed, data_dir: str | None) -> np.ndarray:
    """The labels of a streamed training split, kept beside the data's statistics after the first read
    (for tensorflow-datasets this reads every record once, without decoding the images)."""
    if data.name == "folder" or isinstance(data.train, (FolderSource, Subset)):
        return source_labels(data.train)
    folder = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    path = stats_path(folder, data.name)[:-len(".json")] + "-train-labels.npy"
    try:
        labels = np.load(path)
        if len(labels) == data.train_size:
            return labels
    except (OSError, ValueError):
        pass
    print(f"reading the {data.train_size:,} training labels of {data.name} to stratify --val-split (kept in "
          f"{path})...", file=sys.stderr, flush=True)
    labels = source_labels(data.train)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, labels)
    except OSError as error:
        print(f"warning: cannot keep the labels in {path} ({error}); they will be read again.", file=sys.stderr,
              flush=True)
    return labels


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


def _checked(data: Dataset) -> Dataset:
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{data.name}: {split} images must be uint8 NHWC, got {images.dtype} {images.shape}.")
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= data.num_classes:
            raise DataError(f"{data.name}: {split} labels must lie in 0..{data.num_classes - 1}.")
    return data


def _tfds_builder(name: str, data_dir: str | None) -> tuple[object, str, str]:
    """``(builder, image key, label key)`` of a tensorflow-datasets image-classification dataset."""
    tfds = require("tensorflow_datasets", f"--dataset {name}")
    require("array_record", f"--dataset {name}")  # tfds.data_source reads ArrayRecord files through it
    from tensorflow_datasets.core import registered
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (registered.DatasetNotFoundError, ValueError):  # ValueError: not even a well-formed name
        known = sorted(set(BUILTIN) | set(registered.list_imported_builders()))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise DataError(f"unknown dataset {name!r}: neither built in ({', '.join(BUILTIN)}) nor in "
                        f"tensorflow-datasets' catalogue.{hint}") from None
    features = builder.info.features
    image_key = next((k for k in ("image", "img") if k in features), None)
    label_key = next((k for k in ("label", "labels") if k in features), None)
    if image_key is None or label_key is None or not hasattr(features[label_key], "names"):
        raise DataError(f"{name} is not an image-classification dataset (features: {', '.join(features)}).")
    return builder, image_key, label_key


def load_tfds(name: str, data_dir: str | None, val_name: str | None = None) -> Streamed:
    """A dataset prepared by tensorflow-datasets, read through `tfds.data_source` (no TensorFlow); with
    ``val_name``, that split of it is the validation split."""
    builder, image_key, label_key = _tfds_builder(name, data_dir)
    features = builder.info.features
    where = data_dir or "tensorflow-datasets' default folder (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    try:
        train = TfdsSource(name, "train", data_dir, image_key, label_key)
    except Exception:  # tfds raises several types for "not prepared"; all mean the same to the user
        files = {"mnist": "its four IDX .gz files", "fashion_mnist": "its four IDX .gz files",
                 "cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}.get(name)
        direct = f"pass --data-dir FOLDER holding {files}, or " if files and not data_dir else ""
        raise DataError(f"{name} is not prepared in {where}: {direct}run `python -m train.data prepare {name}"
                        f"{' --data-dir ' + data_dir if data_dir else ''}` (needs the network, or --manual-dir with "
                        "the original files, and `pip install -e \".[prepare]\"`).") from None
    test, test_split, unlabelled = None, None, []
    for split in TEST_SPLITS:
        if split == val_name:
            continue
        try:
            candidate = TfdsSource(name, split, data_dir, image_key, label_key)
        except Exception:  # noqa: BLE001 - the split does not exist; try the next name
            continue
        if not candidate.labelled():  # ImageNet's test split: nothing to score against
            unlabelled.append(split)
            continue
        test, test_split = candidate, split
        break
    if test is None:
        other = f" other than {val_name!r}" if val_name else ""
        skipped = f" (unlabelled: {', '.join(unlabelled)})" if unlabelled else ""
        raise DataError(f"{name} in {where} has no labelled test or validation split{other} to evaluate on{skipped}"
                        + ("; hold out a fraction instead, e.g. --val-split 0.05." if val_name else "."))
    val = None
    if val_name:
        if val_name == "train":
            raise DataError("--val-split train would validate on the training examples themselves; name another "
                            "split or give a fraction.")
        try:
            val = TfdsSource(name, val_name, data_dir, image_key, label_key)
        except Exception:  # noqa: BLE001 - tfds raises several types for an unknown split
            splits = ", ".join(sorted(builder.info.splits)) or "none recorded"
            raise DataError(f"{name} has no split {val_name!r} (its splits: {splits}).") from None
    shape = tuple(features[image_key].shape)
    channels = shape[-1] if len(shape) == 3 and shape[-1] else 3
    data = Streamed(name, train, test, tuple(features[label_key].names), (shape[0], shape[1], channels),
                    flip=name not in ("mnist", "digits", "svhn_cropped", "emnist"),
                    crop_padding={"cifar10": 4, "cifar100": 4, "mnist": 2, "fashion_mnist": 2}.get(name, 0),
                    test_split=test_split, val=val, val_from=f"the dataset's {val_name!r} split" if val else "")
    return data


def load_split(name: str, data_dir: str | None, split: str | None = None) -> Streamed:
    """One labelled split of a dataset alone, as the test split of a `Streamed` dataset with no training
    examples: what scoring published weights reads (``python -m train.evaluate --weights``), so a dataset
    prepared without its training split (ImageNet from its validation archive alone) is enough.

    ``name`` is a tensorflow-datasets name prepared in ``data_dir`` or ``folder`` (``data_dir`` holding one
    sub-folder per class, or such a folder named ``split``). ``split`` defaults to the first of
    validation, val and test that exists; for a folder without those, the whole folder.
    """
    if name == "folder":
        if not data_dir or not os.path.isdir(data_dir):
            raise DataError(f"--dataset folder needs --data-dir FOLDER with one sub-folder of images per class; got "
                            f"{data_dir}.")
        names = (split,) if split else EVAL_SPLITS
        found = next((s for s in names if _has_split(data_dir, s)), None)
        if found is None and split:
            raise DataError(f"{data_dir} has no {split}/ sub-folder.")
        source, classes = _open_split(data_dir, found)
        return Streamed("folder", [], source, classes, (None, None, 3), test_split=found or ".")
    builder, image_key, label_key = _tfds_builder(name, data_dir)
    where = data_dir or "tensorflow-datasets' default folder (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    for candidate in (split,) if split else EVAL_SPLITS:
        try:
            source = TfdsSource(name, candidate, data_dir, image_key, label_key)
        except Exception:  # noqa: BLE001 - tfds raises several types for a split that is not prepared
            continue
        features = builder.info.features
        shape = tuple(features[image_key].shape)
        channels = shape[-1] if len(shape) == 3 and shape[-1] else 3
        return Streamed(name, [], source, tuple(features[label_key].names), (shape[0], shape[1], channels),
                        test_split=candidate)
    splits = ", ".join(sorted(builder.info.splits)) or "none prepared"
    raise DataError(f"{name} in {where} has no prepared {split or ' or '.join(EVAL_SPLITS)} split (its splits: "
                    f"{splits}); `python -m train.data prepare {name}` prepares it.")


def load_folder(data_dir: str | None, holdout: float = 0.1, seed: int = 0, val_name: str | None = None) -> Streamed:
    """A folder of images: ``train/`` + ``val/``-style sub-folders, or one folder of classes split with a
    fixed seed (``holdout`` of each class, at least one image, for testing). With ``val_name``, the
    sub-folder of that name is the validation split (and another one the test split)."""
    if not data_dir:
        raise DataError("--dataset folder needs --data-dir FOLDER with one sub-folder of images per class.")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a folder.")
    test_split = next((s for s in TEST_SPLITS if s != val_name and _has_split(data_dir, s)), None)
    val = None
    if val_name:
        if val_name == "train" or not _has_split(data_dir, val_name) or not _has_split(data_dir, "train"):
            raise DataError(f"--val-split {val_name} names a split, but {data_dir} has no train/ and {val_name}/ "
                            "sub-folders: give a fraction instead, e.g. --val-split 0.1.")
        if test_split is None:
            raise DataError(f"{data_dir} has train/ and {val_name}/ but no other split to test on (test/, "
                            "validation/ or val/): give a fraction instead, e.g. --val-split 0.1.")
    split_layout = _has_split(data_dir, "train") and test_split is not None
    if split_layout:
        train, classes = _open_split(data_dir, "train")
        _require_two_classes(classes, os.path.join(data_dir, "train"))
        splits = {}
        for role, split in (("test", test_split), ("val", val_name)):
            if split is None:
                continue
            splits[role], split_classes = _open_split(data_dir, split)
            if split_classes != classes:
                raise DataError(f"{os.path.join(data_dir, split)} has classes {', '.join(split_classes)}, but "
                                f"{data_dir}/train has {', '.join(classes)}.")
        test, val = splits["test"], splits.get("val")
    else:
        whole, classes = _open_split(data_dir, None)
        _require_two_classes(classes, data_dir)
        labels_array = source_labels(whole)
        rng = np.random.default_rng(seed)
        held = []
        for label in range(len(classes)):
            members = np.flatnonzero(labels_array == label)
            if len(members) < 2:
                raise DataError(f"class {classes[label]!r} of {data_dir} has {len(members)} readable image(s); "
                                "each class needs at least two (one to train on, one to test).")
            held.extend(rng.permutation(members)[:max(1, round(holdout * len(members)))])
        held = np.sort(np.asarray(held, np.int64))
        train, test = Subset(whole, np.setdiff1d(np.arange(len(whole)), held)), Subset(whole, held)
    return Streamed("folder", train, test, classes, (None, None, 3), flip=True,
                    test_split=test_split if split_layout else "held-out",
                    val=val, val_from=f"the folder's {val_name}/ split" if val is not None else "")


def _has_split(data_dir: str, split: str) -> bool:
    """Whether the folder dataset in ``data_dir`` (images or a resized copy) has the split ``split``."""
    if resized.is_copy(data_dir):
        return split in resized.copy_splits(data_dir)
    return os.path.isdir(os.path.join(data_dir, split))


def _open_split(data_dir: str, split: str | None) -> tuple[FolderSource | resized.RecordSource, tuple[str, ...]]:
    """The examples and class names of ``split`` of the folder dataset in ``data_dir`` (None: all of it)."""
    if resized.is_copy(data_dir):
        return resized.open_split(data_dir, split)
    paths, labels, classes, _ = scan_folder(data_dir if split is None else os.path.join(data_dir, split))
    return FolderSource(paths, labels), classes


def _require_two_classes(classes: tuple[str, ...], folder: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class folder ({', '.join(classes)}): a classifier needs at "
                        "least two classes, each in a sub-folder of its own.")


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
        return _checked(materialize(data, None if data.fixed_size else side))
    return data


def ensure_statistics(data: Streamed, data_dir: str | None, sample: int = 2000, seed: int = 0) -> Streamed:
    """``data`` with mean, std and colour PCA: read from its stats file, or computed over ``sample`` random
    training images (at most 256 pixels on the shorter side) and stored for the next run."""
    from train.data.stream import resize_shorter

    folder = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    path = stats_path(folder if data.name != "folder" else data_dir, data.name)
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
