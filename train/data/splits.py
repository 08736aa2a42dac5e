"""The validation split: ``--val-split`` read (`parse_val_split`), and a fraction of the training split held
out per class with a fixed seed (`stratified_holdout`, `with_validation`). A named split is opened by the
loader of its dataset (`train.data.tfds_sets`, `train.data.folder`).

The validation split is what the trainer chooses its best checkpoint on, so the test split is never used
for a decision.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from train.data.errors import DataError
from train.data.memory import Dataset, checked, with_statistics
from train.data.sources import FolderSource, Subset, source_labels
from train.data.stats import streamed_stats_path
from train.data.stream import Streamed

__all__ = ["parse_val_split", "stratified_holdout", "with_validation"]


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
        return checked(with_statistics(dataclasses.replace(
            data, train_images=data.train_images[keep], train_labels=data.train_labels[keep],
            val_images=data.train_images[held], val_labels=data.train_labels[held], val_from=where)))
    return dataclasses.replace(data, train=Subset(data.train, keep), val=Subset(data.train, held), val_from=where)


def _training_labels(data: Streamed, data_dir: str | None) -> np.ndarray:
    """The labels of a streamed training split, kept beside the data's statistics after the first read
    (for tensorflow-datasets this reads every record once, without decoding the images)."""
    if data.name == "folder" or isinstance(data.train, (FolderSource, Subset)):
        return source_labels(data.train)
    path = streamed_stats_path(data.name, data_dir)[:-len(".json")] + "-train-labels.npy"
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
