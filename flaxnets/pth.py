"""Reading PyTorch ``.pth`` files with the standard library and NumPy: no torch, and no code run.

``torch.save`` writes a pickle whose tensors point at separately stored raw data, in one of two layouts:

* the zip archive of torch >= 1.6: ``PREFIX/data.pkl`` holds the pickle, ``PREFIX/data/KEY`` the bytes of
  each storage, ``PREFIX/byteorder`` their byte order ("little" when absent, as in the oldest archives);
* the legacy layout before it (``_use_new_zipfile_serialization=False``, and torchvision's 2017 files):
  five pickles in a row, namely a magic number, the protocol version (1001), a dict of platform facts, the
  object itself, and the sorted list of storage keys; then, for each key in that order, the storage's
  element count as a little-endian int64 followed by its little-endian bytes.

In both, a tensor is pickled as a call of ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` and a storage as a persistent id ``("storage", torch.FloatStorage, key, location, numel[, view])``.

A pickle may name any importable function and have it called while it is read: that is how a weights
file could run code. `read_pth` therefore unpickles through `_RestrictedUnpickler`, whose ``find_class``
resolves only the tensor-rebuild functions and the storage classes (to NumPy stand-ins defined here) and
``collections.OrderedDict`` (a state_dict's container, which runs nothing); any other global is refused with
`WeightsFileError`. Every global in a pickle, including those of pickle's extension registry, is looked up
through ``find_class``, so nothing else can be called.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import tarfile
import zipfile
from typing import Any, BinaryIO

import numpy as np

from flaxnets.cli import error_phrase

__all__ = ["WeightsFileError", "read_pth"]


class WeightsFileError(ValueError):
    """A weights file that cannot be read: missing, of another format than its suffix says, damaged, unsafe,
    or needing a package that is not installed. The message is one sentence naming the file."""


# torch's storage classes and the NumPy dtype of their elements (``torch.cuda.*`` of files saved from a
# GPU hold the same bytes). bfloat16 comes from ml_dtypes, which jax depends on.
def _storage_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "DoubleStorage": np.dtype("<f8"),
        "FloatStorage": np.dtype("<f4"),
        "HalfStorage": np.dtype("<f2"),
        "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
        "LongStorage": np.dtype("<i8"),
        "IntStorage": np.dtype("<i4"),
        "ShortStorage": np.dtype("<i2"),
        "CharStorage": np.dtype("i1"),
        "ByteStorage": np.dtype("u1"),
        "BoolStorage": np.dtype("bool"),
        "ComplexFloatStorage": np.dtype("<c8"),
        "ComplexDoubleStorage": np.dtype("<c16"),
    }


_STORAGE_MODULES = ("torch", "torch.cuda")
# 0x1950a86a20f9469cfc6c is the magic number torch's legacy format opens with; 1001 its protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass
class _Storage:
    """One storage: its element type and count, and its elements once they are read (the legacy layout
    stores them after the pickle that refers to them). A legacy view is a slice of a root storage."""

    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None
    root: "_Storage | None" = None
    offset: int = 0

    def elements(self) -> np.ndarray:
        if self.root is not None:
            return self.root.elements()[self.offset:self.offset + self.numel]
        return self.data


@dataclasses.dataclass
class _Tensor:
    """A tensor as pickled: a strided window onto a storage, made an array once the storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
    # ``_rebuild_tensor_v2`` adds requires_grad, backward hooks and (newer torch) metadata: irrelevant here.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused) -> Any:
    return data  # an nn.Parameter is its tensor plus requires_grad


_REBUILD = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and its kind resolve to: the element type, nothing callable."""

    dtype: np.dtype


class _Refused(pickle.UnpicklingError):
    """A global outside the allowed set; `read_pth` turns it into a sentence naming the file."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only tensors, storages and OrderedDict; storages come from ``storage``."""

    def __init__(self, file: BinaryIO, storage):
        super().__init__(file)
        self._storage = storage
        self._dtypes = _storage_dtypes()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILD:
            return _REBUILD[module, name]
        if module in _STORAGE_MODULES and name in self._dtypes:
            return _StorageType(self._dtypes[name])
        raise _Refused(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise _Refused("persistent id", str(kind))  # e.g. ("module", ...): a whole pickled nn.Module
        return self._storage(*pid[1:])


def _unpickle(file: BinaryIO, storage=None) -> Any:
    def no_storage(*args):
        raise pickle.UnpicklingError("a storage where none may be")

    return _RestrictedUnpickler(file, storage or no_storage).load()


def _materialise(obj: Any) -> Any:
    """``obj`` with every `_Tensor` replaced by a NumPy array of its own (not a view of the storage)."""
    if isinstance(obj, _Tensor):
        elements = obj.storage.elements()
        if elements is None:
            raise pickle.UnpicklingError("a tensor whose storage was never written")
        if 0 in obj.size:
            return np.zeros(obj.size, elements.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= len(elements):
            raise pickle.UnpicklingError("a tensor reaching beyond its storage")
        itemsize = elements.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(elements[obj.offset:], obj.size, [s * itemsize for s in obj.stride])
        return np.array(view, dtype=elements.dtype.newbyteorder("="))
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        out.update((key, _materialise(value)) for key, value in obj.items())
        return out
    if isinstance(obj, list):
        return [_materialise(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(value) for value in obj)
    return obj


def _read_zip(archive: zipfile.ZipFile, path: str) -> Any:
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsFileError(f"{path} is a zip archive but not one torch.save wrote (it has no PREFIX/data.pkl).")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    storages: dict[str, _Storage] = {}

    def storage(kind: _StorageType, key: str, location: str, numel: int, *unused) -> _Storage:
        if key not in storages:
            dtype = kind.dtype.newbyteorder("<" if order == "little" else ">")
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is shorter than its {numel} elements")
            storages[key] = _Storage(dtype, numel, np.frombuffer(raw, dtype, count=numel))
        return storages[key]

    with archive.open(pickles[0]) as file:
        return _materialise(_unpickle(file, storage))


def _read_legacy(file: BinaryIO, path: str) -> Any:
    try:
        magic = _unpickle(file)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError):
        magic = None
    if magic != _LEGACY_MAGIC:
        raise WeightsFileError(f"{path} is not a PyTorch weights file (neither the zip archive of torch.save nor "
                               "its legacy pickle format).")
    version = _unpickle(file)
    if version != _LEGACY_PROTOCOL:
        raise WeightsFileError(f"{path} is a legacy PyTorch file of protocol {version!r}, which flaxnets does not "
                               f"read (only {_LEGACY_PROTOCOL}).")
    facts = _unpickle(file)
    if not (isinstance(facts, dict) and facts.get("little_endian", True)):
        raise WeightsFileError(f"{path} was saved on a big-endian machine in the legacy format, which flaxnets "
                               "does not read.")
    storages: dict[str, _Storage] = {}

    def storage(kind: _StorageType, key: str, location: str, numel: int, view=None) -> _Storage:
        root = storages.setdefault(key, _Storage(kind.dtype, int(numel)))
        if view is None:
            return root
        view_key, offset, view_numel = view  # a storage view of old torch: part of the root storage
        return storages.setdefault(view_key, _Storage(kind.dtype, int(view_numel), root=root, offset=int(offset)))

    obj = _unpickle(file, storage)
    for key in _unpickle(file):
        record = storages.get(key)
        if record is None:
            raise pickle.UnpicklingError(f"storage {key} is listed but never used")
        numel = int.from_bytes(file.read(8), "little")
        raw = file.read(numel * record.dtype.itemsize)
        if numel < record.numel or len(raw) < numel * record.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        record.data = np.frombuffer(raw, record.dtype, count=numel)
    return _materialise(obj)


def read_pth(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path`` (typically a state_dict), tensors as NumPy arrays.

    Reads the zip format and the legacy one without importing torch, and runs no code from the file: a
    pickle that names any function or class other than torch's tensor-rebuild functions, its storage
    classes and ``collections.OrderedDict`` is refused.

    Raises:
      WeightsFileError: the file is not a torch.save file, is damaged, or names another global (one sentence).
    """
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _read_zip(archive, path)
        if tarfile.is_tarfile(path):
            raise WeightsFileError(f"{path} is in the tar format of PyTorch 0.1, which flaxnets does not read; load "
                                   "it with torch and save it again.")
        with open(path, "rb") as file:
            return _read_legacy(file, path)
    except _Refused as refused:
        raise WeightsFileError(f"{path} names {refused.qualname}, which flaxnets refuses to load: a weights file "
                               "may only hold tensors, and unpickling anything else could run code.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            zipfile.BadZipFile, UnicodeDecodeError) as error:
        if isinstance(error, WeightsFileError):
            raise
        raise WeightsFileError(f"{path} is a damaged PyTorch weights file ({error_phrase(error, 120)}).") from None
