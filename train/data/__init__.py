"""Datasets by name, held in memory or streamed: the package's face.

Where each part lives:

- `train.data.load`: `load_dataset` and `load_split` by name (the names and what each reads), and
  `fit_in_memory`, `ensure_statistics`, `sample_in_memory`.
- `train.data.memory`: the in-memory `Dataset`, the digits and the MNIST-style IDX files;
  `train.data.cifar` the CIFAR files.
- `train.data.stream`: the `Streamed` dataset and its Grain pipeline; `train.data.sources` the random-access
  sources it reads (tensorflow-datasets' ArrayRecord files, image files); `train.data.jpeg` the decoders.
- `train.data.tfds_sets`, `train.data.folder`: tensorflow-datasets datasets and folders of images.
- `train.data.splits`: ``--val-split`` and the validation split held out of the training split.
- `train.data.stats`: pixel statistics; `train.data.resized`: resized copies of a folder;
  `train.data.prepare`: preparing a tensorflow-datasets dataset.
- `train.data.errors`: `DataError`, the one error every part raises.
"""

from train.data.cifar import load_cifar
from train.data.errors import DataError
from train.data.folder import load_folder
from train.data.load import (MEMORY_LIMIT_BYTES, dataset_names, ensure_statistics, fit_in_memory, load_dataset,
                             load_split, sample_in_memory)
from train.data.memory import (FASHION_CLASSES, Dataset, load_digits, load_idx, read_idx, recorded_checksums,
                               verify_file, with_statistics)
from train.data.splits import parse_val_split, stratified_holdout, with_validation
from train.data.stream import Streamed, epoch_order
from train.data.tfds_sets import load_tfds

__all__ = ["DataError", "Dataset", "Streamed", "load_dataset", "load_split", "dataset_names", "fit_in_memory",
           "with_validation", "stratified_holdout", "parse_val_split",
           "ensure_statistics", "epoch_order", "load_digits", "load_idx", "read_idx", "load_cifar", "load_tfds",
           "load_folder", "recorded_checksums", "verify_file", "sample_in_memory", "with_statistics",
           "FASHION_CLASSES", "MEMORY_LIMIT_BYTES"]
