"""A folder of images as a dataset (``--dataset folder``): one sub-folder per class (like torchvision's
ImageFolder), or ``train/`` and ``val/`` (or ``validation/``, ``test/``) folders that each hold one; or a
resized copy of such a folder that ``python -m train.data prepare folder`` wrote (`train.data.resized`),
read the same way.
"""

from __future__ import annotations

import os

import numpy as np

from train.data import resized
from train.data.errors import DataError
from train.data.names import EVAL_SPLITS, TEST_SPLITS
from train.data.sources import FolderSource, Subset, scan_folder, source_labels
from train.data.stream import Streamed

__all__ = ["load_folder", "load_folder_split", "has_split", "open_split"]


def load_folder(data_dir: str | None, holdout: float = 0.1, seed: int = 0, val_name: str | None = None) -> Streamed:
    """A folder of images: ``train/`` + ``val/``-style sub-folders, or one folder of classes split with a
    fixed seed (``holdout`` of each class, at least one image, for testing). With ``val_name``, the
    sub-folder of that name is the validation split (and another one the test split)."""
    if not data_dir:
        raise DataError("--dataset folder needs --data-dir FOLDER with one sub-folder of images per class.")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a folder.")
    test_split = next((s for s in TEST_SPLITS if s != val_name and has_split(data_dir, s)), None)
    val = None
    if val_name:
        if val_name == "train" or not has_split(data_dir, val_name) or not has_split(data_dir, "train"):
            raise DataError(f"--val-split {val_name} names a split, but {data_dir} has no train/ and {val_name}/ "
                            "sub-folders: give a fraction instead, e.g. --val-split 0.1.")
        if test_split is None:
            raise DataError(f"{data_dir} has train/ and {val_name}/ but no other split to test on (test/, "
                            "validation/ or val/): give a fraction instead, e.g. --val-split 0.1.")
    split_layout = has_split(data_dir, "train") and test_split is not None
    if split_layout:
        train, classes = open_split(data_dir, "train")
        _require_two_classes(classes, os.path.join(data_dir, "train"))
        splits = {}
        for role, split in (("test", test_split), ("val", val_name)):
            if split is None:
                continue
            splits[role], split_classes = open_split(data_dir, split)
            if split_classes != classes:
                raise DataError(f"{os.path.join(data_dir, split)} has classes {', '.join(split_classes)}, but "
                                f"{data_dir}/train has {', '.join(classes)}.")
        test, val = splits["test"], splits.get("val")
    else:
        whole, classes = open_split(data_dir, None)
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


def has_split(data_dir: str, split: str) -> bool:
    """Whether the folder dataset in ``data_dir`` (images or a resized copy) has the split ``split``."""
    if resized.is_copy(data_dir):
        return split in resized.copy_splits(data_dir)
    return os.path.isdir(os.path.join(data_dir, split))


def open_split(data_dir: str, split: str | None) -> tuple[FolderSource | resized.RecordSource, tuple[str, ...]]:
    """The examples and class names of ``split`` of the folder dataset in ``data_dir`` (None: all of it)."""
    if resized.is_copy(data_dir):
        return resized.open_split(data_dir, split)
    paths, labels, classes, _ = scan_folder(data_dir if split is None else os.path.join(data_dir, split))
    return FolderSource(paths, labels), classes


def _require_two_classes(classes: tuple[str, ...], folder: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class folder ({', '.join(classes)}): a classifier needs at "
                        "least two classes, each in a sub-folder of its own.")


def load_folder_split(data_dir: str | None, split: str | None = None) -> Streamed:
    """One split of the folder dataset in ``data_dir`` alone (`train.data.load_split`): the sub-folder
    ``split``, else the first of validation, val and test that exists, else the whole folder."""
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"--dataset folder needs --data-dir FOLDER with one sub-folder of images per class; got "
                        f"{data_dir}.")
    names = (split,) if split else EVAL_SPLITS
    found = next((s for s in names if has_split(data_dir, s)), None)
    if found is None and split:
        raise DataError(f"{data_dir} has no {split}/ sub-folder.")
    source, classes = open_split(data_dir, found)
    return Streamed("folder", [], source, classes, (None, None, 3), test_split=found or ".")
