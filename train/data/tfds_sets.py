"""Datasets of tensorflow-datasets' catalogue prepared in ArrayRecord format, read through
`tfds.data_source` (no TensorFlow): `load_tfds` (train, test and a named validation split) and
`load_tfds_split` (one labelled split alone).
"""

from __future__ import annotations

import difflib

from train.data.errors import DataError
from train.data.names import BUILTIN, EVAL_SPLITS, TEST_SPLITS
from train.data.optional import no_stray_tfds_folders, require
from train.data.sources import TfdsSource
from train.data.stream import Streamed

__all__ = ["load_tfds", "load_tfds_split", "tfds_builder"]


def tfds_builder(name: str, data_dir: str | None) -> tuple[object, str, str]:
    """``(builder, image key, label key)`` of a tensorflow-datasets image-classification dataset."""
    tfds = require("tensorflow_datasets", f"--dataset {name}")
    require("array_record", f"--dataset {name}")  # tfds.data_source reads ArrayRecord files through it
    from tensorflow_datasets.core import registered
    try:
        with no_stray_tfds_folders():
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
    builder, image_key, label_key = tfds_builder(name, data_dir)
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


def load_tfds_split(name: str, data_dir: str | None, split: str | None = None) -> Streamed:
    """One labelled split of a prepared tensorflow-datasets dataset alone (`train.data.load_split`): ``split``,
    else the first of validation, val and test that is prepared."""
    builder, image_key, label_key = tfds_builder(name, data_dir)
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
