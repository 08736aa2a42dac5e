"""Preparing a tensorflow-datasets dataset (``python -m train.data prepare``): tensorflow-datasets' own
builder writes ArrayRecord files that training then reads without TensorFlow."""

from __future__ import annotations

import os

from flaxnets.cli import error_phrase
from train.data import DataError
from train.data.optional import no_stray_tfds_folders, require

__all__ = ["prepare"]


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> str:
    """Download (or take from ``manual_dir``) and convert ``name`` to ArrayRecord; returns where it went.

    Files in ``manual_dir`` named as tensorflow-datasets records them (the original distribution files:
    ``train-images-idx3-ubyte.gz``, ``cifar-10-binary.tar.gz``, ImageNet's tars) are used instead of
    downloading, after the same checksum check a download gets.
    """
    if manual_dir and not os.path.isdir(manual_dir):
        raise DataError(f"--manual-dir {manual_dir} is not a folder.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner is not for this user
    try:
        import tensorflow  # noqa: F401  (tensorflow-datasets' builders need it to write)
    except ImportError:
        raise DataError("preparing a tensorflow-datasets dataset needs TensorFlow: pip install -e \".[prepare]\" "
                        "(training on the prepared data does not).") from None
    tfds = require("tensorflow_datasets", f"preparing {name}")

    try:
        with no_stray_tfds_folders():
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tensorflow-datasets has no dataset called {name!r}.") from None
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as error:  # network, checksum and manual-file errors all end here
        raise DataError(f"preparing {name} failed ({error_phrase(error)}).") from None
    return str(builder.data_dir)
