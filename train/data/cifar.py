"""CIFAR-10 and CIFAR-100 from their original distribution files (Krizhevsky 2009), verified.

``--data-dir`` may hold any of:

- the python-version tarball (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), checked against
  the MD5 the dataset's page publishes;
- its extracted folder (``cifar-10-batches-py/`` / ``cifar-100-python/``) or the batch files themselves,
  each checked against its own MD5 (the values torchvision's CIFAR loader also records);
- the binary-version tarball (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``), checked against the
  size and SHA-256 that tensorflow-datasets records for it.

Images come out uint8 NHWC; CIFAR-100 uses its 100 fine labels.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np

from flaxnets.cli import error_phrase
from train.data.errors import DataError
from train.data.memory import Dataset, recorded_checksums, verify_file

__all__ = ["load_cifar", "CIFAR"]

# name -> python tarball (file, md5), member folder, train and test batches with their md5, meta file and key.
CIFAR = {
    "cifar10": {
        "tarball": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        "folder": "cifar-10-batches-py",
        "train": (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                  ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                  ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                  ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                  ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", b"label_names"),
        "labels": b"labels",
        "binary": ("cifar-10-binary.tar.gz", "cifar-10-batches-bin", 1,
                   tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), "batches.meta.txt"),
    },
    "cifar100": {
        "tarball": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        "folder": "cifar-100-python",
        "train": (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        "test": (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48", b"fine_label_names"),
        "labels": b"fine_labels",
        "binary": ("cifar-100-binary.tar.gz", "cifar-100-binary", 2, ("train.bin",), ("test.bin",),
                   "fine_label_names.txt"),
    },
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        value = pickle.load(io.BytesIO(raw), encoding="bytes")
    except Exception as error:  # a pickle can fail in many ways; all mean "not a CIFAR batch"
        raise DataError(f"{where} is not a CIFAR python batch ({error_phrase(error)}).") from None
    if not isinstance(value, dict):
        raise DataError(f"{where} is not a CIFAR python batch (it holds a {type(value).__name__}).")
    return value


def _python_batches(name: str, files: dict[str, bytes], where: str, verify: bool):
    info = CIFAR[name]
    for file, md5 in info["train"] + info["test"] + (info["meta"][:2],):
        if file not in files:
            raise DataError(f"{where} lacks {file} of {name}.")
        if verify and _md5(files[file]) != md5:
            raise DataError(f"{where}/{file} does not match the MD5 published for {name}: the file is corrupt "
                            "or another dataset's.")

    def split(entries):
        images, labels = [], []
        for file, _ in entries:
            batch = _unpickle(files[file], f"{where}/{file}")
            try:
                data = np.asarray(batch[b"data"], np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[info["labels"]], np.int32))
            except (KeyError, ValueError) as error:
                raise DataError(f"{where}/{file} is not a {name} batch ({error}).") from None
            if len(images[-1]) != len(labels[-1]):
                raise DataError(f"{where}/{file}: {len(images[-1])} images but {len(labels[-1])} labels.")
        return np.concatenate(images), np.concatenate(labels)

    meta = _unpickle(files[info["meta"][0]], f"{where}/{info['meta'][0]}")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(info["meta"][2], ()))
    return (*split(info["train"]), *split(info["test"]), classes)


def _binary_batches(name: str, files: dict[str, bytes], where: str):
    _, _, label_bytes, train, test, meta = CIFAR[name]["binary"]
    record = label_bytes + 3072

    def split(entries):
        images, labels = [], []
        for file in entries:
            if file not in files:
                raise DataError(f"{where} lacks {file} of {name}.")
            raw = np.frombuffer(files[file], np.uint8)
            if raw.size % record:
                raise DataError(f"{where}/{file} is truncated: {raw.size} bytes is not a whole number of "
                                f"{record}-byte records.")
            rows = raw.reshape(-1, record)
            labels.append(rows[:, label_bytes - 1].astype(np.int32))  # CIFAR-100: coarse, then fine
            images.append(rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        return np.concatenate(images), np.concatenate(labels)

    names = tuple(line.strip() for line in files.get(meta, b"").decode().splitlines() if line.strip())
    return (*split(train), *split(test), names)


def _read_tar(path: str, wanted: set[str]) -> dict[str, bytes]:
    files = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    files[base] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{path} is truncated or not a tar archive ({error}).") from None
    return files


def load_cifar(name: str, data_dir: str, verify: bool = True) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the original files in ``data_dir`` (any of the layouts above)."""
    info = CIFAR[name]
    tarball, tar_md5 = info["tarball"]
    python_files = {f for f, _ in info["train"] + info["test"]} | {info["meta"][0]}
    binary_tar, binary_folder, *_ = info["binary"]
    binary_files = set(info["binary"][3] + info["binary"][4] + (info["binary"][5],))
    where = data_dir
    if os.path.isfile(os.path.join(data_dir, tarball)):
        path = os.path.join(data_dir, tarball)
        if verify:
            digest = hashlib.md5()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != tar_md5:
                raise DataError(f"{path} does not match the MD5 published for {tarball}: truncated or corrupt.")
        parts = _python_batches(name, _read_tar(path, python_files), path, verify=False)
    elif os.path.isfile(os.path.join(data_dir, binary_tar)):
        path = os.path.join(data_dir, binary_tar)
        if verify:
            verify_file(path, *recorded_checksums(name)[binary_tar], what=f"{binary_tar} (tensorflow-datasets' checksum)")
        parts = _binary_batches(name, _read_tar(path, binary_files), path)
    else:
        for folder in (os.path.join(data_dir, info["folder"]), os.path.join(data_dir, binary_folder), data_dir):
            present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if python_files <= present or binary_files - {info["binary"][5]} <= present:
                where = folder
                break
        else:
            raise DataError(f"{data_dir} holds no {name} files: expected {tarball}, {binary_tar}, or the "
                            f"extracted {info['folder']}/ folder.")
        if python_files <= present:
            files = {}
            for file in python_files:
                with open(os.path.join(where, file), "rb") as handle:
                    files[file] = handle.read()
            parts = _python_batches(name, files, where, verify)
        else:
            files = {}
            for file in binary_files & present:
                with open(os.path.join(where, file), "rb") as handle:
                    files[file] = handle.read()
            parts = _binary_batches(name, files, where)
    train_x, train_y, test_x, test_y, classes = parts
    expected = 10 if name == "cifar10" else 100
    if len(classes) != expected:
        classes = tuple(str(i) for i in range(expected))
    return Dataset(name, train_x, train_y, test_x, test_y, classes, flip=True, crop_padding=4)
