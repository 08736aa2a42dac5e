"""State dicts on disk and in memory: ``.pth``/``.pt``/``.bin`` (read without torch by `flaxnets.pth`, written
with it), ``.safetensors`` and ``.npz`` (numpy alone), and the tensors of whatever a caller passes (torch
tensors, arrays, wrapped checkpoints) as numpy arrays. Knows nothing of architectures.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxnets.pth import WeightsFileError, read_pth

__all__ = ["WeightsFileError", "as_numpy", "unwrap", "load_state_dict", "save_state_dict"]

PathLike = str | os.PathLike


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device or dtype) or array-like as a numpy array, without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()  # numpy has no bfloat16; float16 is promoted the same way
    return np.asarray(value)


def unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a state_dict, also when saved as ``{"model": ...}`` or ``{"state_dict": ...}`` (the
    torchvision reference scripts' checkpoints) or from ``nn.DataParallel`` (keys prefixed ``module.``)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    state_dict = dict(state_dict)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # else NumPy would say it holds "pickled data", which is wrong
        raise WeightsFileError(f"{path} is not an .npz archive (a zip of NumPy arrays).")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise WeightsFileError(f"{path} is a damaged .npz archive ({error}).") from None


# The safetensors format (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
# length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
# then the raw little-endian data, offsets counted from the end of the header.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    size = int(data[:8].view("<u8")[0]) if data.size >= 8 else -1
    if not 0 < size <= data.size - 8:
        raise WeightsFileError(f"{path} is not a safetensors file (its header length does not fit its size).")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
        header.pop("__metadata__", None)
        start = 8 + size
        arrays, spans = {}, []
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise WeightsFileError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which flaxnets does not "
                                       "read.")
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= data.size - start:
                raise WeightsFileError(f"{path} is truncated: tensor {name!r} lies beyond its end.")
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise WeightsFileError(f"{path} is damaged: tensor {name!r} has {end - begin} bytes for "
                                       f"{info['dtype']} of shape {shape}.")
            spans.append((begin, end, name))
            arrays[name] = np.array(data[start + begin : start + end].view(dtype).reshape(shape))
        # The tensors lie back to back from the header's end to the file's, as the format requires: offsets
        # that overlap or leave a gap are a damaged header (the reference reader refuses them too).
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise WeightsFileError(f"{path} is damaged: tensor {name!r}'s bytes overlap another's or follow a "
                                       "gap.")
            position = end
        if position != data.size - start:
            raise WeightsFileError(f"{path} is damaged: {data.size - start - position} bytes after its last tensor.")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, WeightsFileError):
            raise
        raise WeightsFileError(f"{path} is not a safetensors file (its header is not the format's JSON).") from None
    return arrays


def _write_safetensors(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    arrays = {name: a.astype(a.dtype.newbyteorder("<"), order="C", copy=False) for name, a in state_dict.items()}
    header, offset = {}, 0
    for name, array in arrays.items():
        if array.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors does not store.")
        header[name] = {
            "dtype": _SAFETENSORS_CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference writer pads the header to 8 bytes with spaces
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for array in arrays.values():
            file.write(array.tobytes())


def _write_npz(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    with open(path, "wb") as file:  # np.savez would append ".npz" to other names
        np.savez(file, **state_dict)


def _write_torch(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    import torch  # noqa: PLC0415

    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, path)


_READERS = {".pth": read_pth, ".pt": read_pth, ".bin": read_pth, ".safetensors": _read_safetensors,
            ".npz": _read_npz}
_WRITERS = {".pth": _write_torch, ".pt": _write_torch, ".bin": _write_torch, ".safetensors": _write_safetensors,
            ".npz": _write_npz}


def _suffix(path: Path, table: dict) -> str:
    if path.suffix not in table:
        raise WeightsFileError(f"{path} has none of the suffixes flaxnets reads and writes ({', '.join(table)}).")
    return path.suffix


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a state_dict as numpy arrays, by suffix: ``.pth``/``.pt``/``.bin`` (``torch.save``'s zip or legacy
    format, read without torch by `flaxnets.pth.read_pth`), ``.safetensors`` or ``.npz``.

    A checkpoint that wraps the state_dict (``{"model": state_dict, ...}``, as torchvision's reference
    scripts save it, or ``{"state_dict": ...}``) and ``module.`` prefixes (``nn.DataParallel``) are unwrapped.
    A pickle naming anything but tensors, storages and OrderedDict is refused (a checkpoint that also holds
    ``argparse`` arguments, say): load such a file yourself with ``torch.load`` and pass its state_dict.
    """
    path = Path(path)
    reader = _READERS[_suffix(path, _READERS)]
    if not path.is_file():
        raise WeightsFileError(f"{path} is not a file.")
    loaded = reader(path)
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}, not a state_dict (names to tensors).")
    state_dict = {}
    for key, value in unwrap(loaded).items():
        array = as_numpy(value)
        # Weights are real numbers (bfloat16 included): text, objects or complex numbers would fail (or lose a
        # part) in conversion.
        real = array.dtype == np.bool_ or jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype,
                                                                                                     jnp.integer)
        if not isinstance(key, str) or not real:
            raise WeightsFileError(f"{path}: tensor {key!r} holds {array.dtype} values, not real numbers.")
        state_dict[key] = array
    return state_dict


def save_state_dict(state_dict: Mapping[str, Any], path: PathLike) -> None:
    """Write a state_dict (torch tensors or arrays, e.g. from `to_torch`) by suffix: ``.pth``/``.pt``/``.bin``
    (needs torch), ``.safetensors`` or ``.npz`` (numpy only)."""
    path = Path(path)
    writer = _WRITERS[_suffix(path, _WRITERS)]
    writer({key: as_numpy(value) for key, value in state_dict.items()}, path)
