"""flaxnets.pth: torch.save files read with NumPy alone, equal to torch.load, and never running their code.

Files in both of torch's layouts (the zip archive and the legacy pickles, ``_use_new_zipfile_serialization=False``)
are written by torch itself and read back with ``import torch`` blocked. Hostile files are written without
torch: a pickle that calls ``os.system`` must be refused before anything runs.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile

import numpy as np
import pytest

from flaxnets import convert
from flaxnets.pth import WeightsFileError, read_pth
from reference import torch_or_skip


def tensors(torch) -> dict:
    """A state_dict-like mapping with every case the reader must get right."""
    base = torch.arange(24, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.num_batches_tracked": torch.tensor(7),  # a 0-d int64
        "half_transposed": torch.arange(6, dtype=torch.float16).reshape(2, 3).t(),  # not contiguous
        "bfloat16": torch.randn(3, 5, generator=generator).bfloat16(),
        "shared": base,
        "window": base[5:17].reshape(3, 4)[:, 1:3],  # an offset, strided view of the same storage
        "mask": torch.tensor([True, False, True]),
        "int8": torch.tensor([1, -2, 3], dtype=torch.int8),
        "float64": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }


def as_numpy(torch, value) -> np.ndarray:
    value = value.detach()
    return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_both_layouts_read_without_torch_equal_torch_load(tmp_path, monkeypatch, layout):
    torch = torch_or_skip()
    path = tmp_path / f"{layout}.pth"
    torch.save({"model": tensors(torch), "epoch": 3}, path, _use_new_zipfile_serialization=layout == "zip")
    expected = torch.load(path, map_location="cpu", weights_only=True)

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    loaded = read_pth(path)
    assert loaded["epoch"] == 3 and list(loaded["model"]) == list(expected["model"])
    for key, reference in expected["model"].items():
        got = loaded["model"][key]
        if reference.dtype == torch.bfloat16:
            assert str(got.dtype) == "bfloat16"
            got = got.astype(np.float32)
        reference = as_numpy(torch, reference)
        assert got.dtype == reference.dtype and got.shape == reference.shape, key
        assert np.array_equal(got, reference), key
        assert got.flags.owndata and got.flags.writeable, key  # no view into the file's bytes
    # load_state_dict unwraps {"model": ...} and needs no torch either.
    assert np.array_equal(convert.load_state_dict(path)["conv.weight"], as_numpy(torch, expected["model"]["conv.weight"]))


class _RunsCode:
    """Pickles as a call of os.system: what a hostile weights file holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_pickle(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")


def _legacy_pickle(path, payload: bytes) -> None:
    header = b"".join(pickle.dumps(part, protocol=2) for part in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    path.write_bytes(header + payload + pickle.dumps([], protocol=2))


@pytest.mark.parametrize("write", [_zip_pickle, _legacy_pickle], ids=["zip", "legacy"])
def test_a_pickle_naming_another_global_is_refused_before_it_runs(tmp_path, write):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    write(path, pickle.dumps({"fc.weight": _RunsCode(marker)}, protocol=2))
    with pytest.raises(WeightsFileError, match=rf"^{re.escape(str(path))} names (posix|os|nt)\.system, which flaxnets refuses to load: "
                                               "a weights file may only hold tensors"):
        convert.load_state_dict(path)
    assert not marker.exists()
    # Any class at all, not only functions: a whole pickled object is refused too.
    write(path, pickle.dumps({"config": zipfile.ZipInfo("x")}, protocol=2))
    with pytest.raises(WeightsFileError, match=r"names zipfile\.ZipInfo"):
        read_pth(path)


def test_files_that_are_not_torch_save_output_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not weights at all " * 40)
    with pytest.raises(WeightsFileError, match=rf"^{re.escape(str(garbage))} is not a PyTorch weights file \(neither"):
        convert.load_state_dict(garbage)
    plain_zip = tmp_path / "plain.pth"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(WeightsFileError, match="not one torch.save wrote"):
        read_pth(plain_zip)


def test_a_truncated_legacy_file_is_damaged(tmp_path):
    torch = torch_or_skip()
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsFileError, match=rf"^{re.escape(str(path))} is a damaged PyTorch weights file \(\w+: storage .* is truncated\)"):
        read_pth(path)
