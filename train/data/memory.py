"""Datasets that fit in memory, as uint8 NHWC arrays plus the facts the trainer needs about them, and the
readers of the original MNIST-style files and of the digits embedded in scikit-learn.

A source reads real files, verifies them, and fails with one clear sentence (`DataError`) when they are
missing, truncated or not what they claim to be.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import os
import struct
import numpy as np

from train.data.errors import DataError

__all__ = ["Dataset", "checked", "with_statistics", "load_digits", "load_idx", "read_idx", "recorded_checksums",
           "verify_file", "FASHION_CLASSES", "IDX_FILES",
           "RECORDED_CHECKSUMS"]


class DatasetFacts:
    """What a dataset tells the trainer and its checkpoints, whether held in memory or streamed.

    Subclasses have ``name``, ``class_names``, ``image_shape`` (``None`` for a side that varies), the
    ``train_size``, ``val_size`` (0 without a validation split) and ``test_size``, ``val_from`` (where the
    validation split came from, "" without one), and the statistics ``mean``, ``std``, ``eigval``,
    ``eigvec``.

    ``in_memory`` is the one fact the trainer branches on: True for a dataset held in host memory, which
    the trainer places on the devices and augments inside the compiled step; False for a streamed one,
    whose examples Grain workers read, decode and augment on the host.
    """

    cropped_to: int | None = None  # `Dataset`'s field; a streamed dataset takes each image whole

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        """What a checkpoint must remember to use the model without the data (prediction); a varying
        image side is recorded as 0."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "image_shape": [int(s) if s is not None else 0 for s in self.image_shape],
            "mean": list(self.mean),
            "std": list(self.std),
            "eigval": list(self.eigval),
            "eigvec": [list(row) for row in self.eigvec],
            "train_examples": int(self.train_size),
            "val_examples": int(self.val_size),
            "val_from": self.val_from,
            "test_examples": int(self.test_size),
        }


@dataclasses.dataclass(frozen=True)
class Dataset(DatasetFacts):
    """An image-classification dataset held in host memory.

    Images are uint8 ``(N, H, W, C)``; labels int32 ``(N,)``. ``mean`` and ``std`` are per channel, of the
    training images scaled to [0, 1], computed from the data when it is loaded. ``flip`` says whether a
    horizontal flip keeps the label (not for digits); ``crop_padding`` is the padding of the random-crop
    augmentation in pixels. ``val_images`` and ``val_labels`` are the validation split, when the run has
    one (`train.data.with_validation`). ``cropped_to`` is set when images of varying size were read in with
    their shorter side resized to it and the centre square kept (`train.data.stream.materialize`), which a
    file must go through too before the model sees it (`train.inference.read_images`).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    flip: bool
    crop_padding: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    eigval: tuple[float, ...] = ()
    eigvec: tuple[tuple[float, ...], ...] = ()
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_from: str = ""
    cropped_to: int | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def val_size(self) -> int:
        return 0 if self.val_labels is None else len(self.val_labels)

    @property
    def in_memory(self) -> bool:
        return True

    @property
    def test_size(self) -> int:
        return len(self.test_labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def with_statistics(data: Dataset) -> Dataset:
    """``data`` with the per-channel mean and std and the colour PCA of its training images (see `stats`)."""
    from train.data.stats import pixel_statistics

    stats = pixel_statistics(data.train_images)
    return dataclasses.replace(data, **stats)


def checked(data: Dataset) -> Dataset:
    """``data`` if its images are uint8 NHWC and its labels lie in 0..classes-1, else a `DataError`."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{data.name}: {split} images must be uint8 NHWC, got {images.dtype} {images.shape}.")
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= data.num_classes:
            raise DataError(f"{data.name}: {split} labels must lie in 0..{data.num_classes - 1}.")
    return data


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package} is not installed.")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def load_digits(data_dir: str | None = None, test_per_class: int = 36) -> Dataset:
    """The 1,797 8x8 handwritten digits that ship inside scikit-learn (the test part of UCI's Optical
    Recognition of Handwritten Digits), split with a fixed seed into 1,437 train and 360 test images,
    36 of each digit in the test split.

    Read straight from scikit-learn's bundled ``digits.csv.gz`` (64 pixel counts 0..16, then the label),
    which saves importing scikit-learn and SciPy (seconds) for one small file.
    """
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read ({error}).") from None
    images = np.clip(table[:, :64] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int32)
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:test_per_class] for d in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    test.sort()
    return Dataset("digits", images[train], labels[train], images[test], labels[test],
                   tuple(str(d) for d in range(10)), flip=False, crop_padding=1)


IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not): big-endian magic, dimension sizes, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is truncated or not a gzip file ({error}).") from None
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes).")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path} has IDX magic {magic}, expected {expected_magic}: not the file its name says.")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset, size = 4 + 4 * ndim, int(np.prod(shape))
    if len(raw) - offset != size:
        raise DataError(f"{path} is truncated: its header promises {size} bytes of data, it holds {len(raw) - offset}.")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


# Size and SHA-256 of the original distribution files, as tensorflow-datasets 4.9 records them for its
# downloads (url_checksums/NAME.txt), held here so that checking the files needs no tensorflow-datasets;
# tests/test_data.py compares the table with the installed package's records.
RECORDED_CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
    "cifar10": {
        "cifar-10-binary.tar.gz": (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    },
    "cifar100": {
        "cifar-100-binary.tar.gz": (168513733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
    },
}


def recorded_checksums(name: str) -> dict[str, tuple[int, str]]:
    """File name -> (size, sha256) of ``name``'s original files, as tensorflow-datasets records them."""
    return dict(RECORDED_CHECKSUMS[name])


def verify_file(path: str, size: int, sha256: str, what: str) -> None:
    """Raise `DataError` unless ``path`` has exactly the recorded size and sha256."""
    actual = os.path.getsize(path)
    if actual != size:
        raise DataError(f"{path} has {actual} bytes where {what} has {size}: truncated or another file.")
    if _sha256(path) != sha256:
        raise DataError(f"{path} does not match the sha256 recorded for {what}: the file is corrupt.")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_idx(name: str, data_dir: str | None, verify: bool = True) -> Dataset:
    """MNIST or Fashion-MNIST from the four original IDX .gz files in ``data_dir``."""
    if not data_dir:
        raise DataError(f"--dataset {name} reads the original IDX files: pass --data-dir FOLDER holding "
                        f"{', '.join(IDX_FILES)}.")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a folder.")
    paths = [os.path.join(data_dir, f) for f in IDX_FILES]
    missing = [f for f, p in zip(IDX_FILES, paths) if not os.path.exists(p)]
    if missing:
        raise DataError(f"{data_dir} lacks {', '.join(missing)} of {name}.")
    if verify:
        records = recorded_checksums(name)
        for file, path in zip(IDX_FILES, paths):
            verify_file(path, *records[file], what=f"{name}'s {file} (tensorflow-datasets' checksum)")
    train_x, train_y, test_x, test_y = (read_idx(p, 2051 if "images" in p else 2049) for p in paths)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(f"{data_dir}: image and label counts differ.")
    classes = FASHION_CLASSES if name == "fashion_mnist" else tuple(str(d) for d in range(10))
    return Dataset(name, train_x[..., None], train_y.astype(np.int32), test_x[..., None], test_y.astype(np.int32),
                   classes, flip=name == "fashion_mnist", crop_padding=2)
