"""`flaxnets.export` and ``python -m flaxnets export``: StableHLO reloaded in a fresh process, ONNX run by
onnxruntime, and no file written when the exported program disagrees with the JAX model.

The table of families and formats in docs/research.md is the list below; the families named in STABLEHLO_FAMILIES
and ONNX_FAMILIES are exported here with a small member at a small input at every run, the others in
the sweep recorded in benchmarks/RESULTS.md (``python -m benchmarks.exports``).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from flaxnets import export as exporting
from flaxnets import nnx as flaxnets_nnx
from flaxnets.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
needs_flatbuffers = pytest.mark.skipif(
    __import__("importlib").util.find_spec("flatbuffers") is None,
    reason="StableHLO files need flatbuffers: pip install 'flaxnets[export]'")
needs_onnx = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(p) is None for p in ("jax2onnx", "onnxruntime")),
    reason="ONNX export needs jax2onnx and onnxruntime: pip install 'flaxnets[export]'")

# family: (a small member, its options, input side); docs/research.md's export table has one row per family.
FAMILIES = {
    "lenet": ("lenet5_bn", {}, 28),
    "alexnet": ("alexnet_small", {}, 16),
    "vgg": ("vgg11", {"config": ((1, 8), (1, 16)), "hidden": (16, 16), "pool_size": None}, 16),
    "nin": ("nin", {"mlp_layers": 1, "num_classes": 10}, 67),
    "squeezenet": ("squeezenet1_1", {"num_classes": 10}, 17),
    "googlenet": ("googlenet", {"num_classes": 10}, 16),
    "inception": ("inception_v3", {"num_classes": 10, "aux_logits": False}, 75),
    "resnet": ("resnet18_cifar", {"width": 8, "stage_sizes": (1, 1, 1, 1)}, 8),
    "densenet": ("densenet_bc100_k12", {"block_sizes": (2, 2)}, 8),
}
# Exported at every run: the layers of every family (GoogLeNet, Inception v3 and NiN are made of the same
# convolutions, pools and concatenations, at several times the compile time; they are in the sweep of
# benchmarks/RESULTS.md, as is every family's ONNX export).
STABLEHLO_FAMILIES = ("lenet", "alexnet", "vgg", "resnet", "densenet")
ONNX_FAMILIES = ("lenet", "alexnet")  # max pooling, LRN, BatchNorm, dense layers


def _model(family):
    name, options, side = FAMILIES[family]
    model = flaxnets.create_model(name, **options)
    shape = (side, side, flaxnets.get_spec(name).in_channels)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *shape)), train=False))(jax.random.key(0))
    return model, variables, shape


def test_every_family_has_a_row():
    assert set(FAMILIES) == {flaxnets.get_spec(name).family for name in flaxnets.list_models()}


@needs_flatbuffers
@pytest.mark.parametrize("family", STABLEHLO_FAMILIES)
def test_stablehlo(family, tmp_path):
    model, variables, shape = _model(family)
    report = exporting.export(model, variables, tmp_path / "model.stablehlo", input_shape=shape)
    assert report.format == "stablehlo" and report.max_error <= exporting.TOLERANCE * report.scale
    assert report.path.stat().st_size == report.bytes


@needs_onnx
@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx(family, tmp_path):
    model, variables, shape = _model(family)
    report = exporting.export(model, variables, tmp_path / "model.onnx", input_shape=shape)
    assert report.format == "onnx" and report.max_error <= exporting.TOLERANCE * report.scale


RELOAD = """
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(images)))
"""


@needs_flatbuffers
def test_converted_torchvision_resnet50_reloads_in_a_fresh_process(tmp_path):
    """torchvision's ResNet-50 layout (random tensors of its state_dict's shapes), converted, exported with a
    symbolic batch, then run by a process that has never seen flaxnets, on a batch size not checked.

    At a quarter of the width (16 channels at the stem, not 64): the same keys, blocks and conversion path
    with 1/16 of the weights to convert, serialise and reload."""
    rng = np.random.default_rng(0)
    state_dict = {key: rng.standard_normal(shape).astype(np.float32) * 0.05
                  for key, shape in flaxnets.convert.torch_shapes("resnet50", width=16).items()}
    state_dict.update({key: np.abs(value) + 0.5 for key, value in state_dict.items() if key.endswith("running_var")})
    variables = flaxnets.from_torch("resnet50", state_dict, width=16)
    model = flaxnets.create_model("resnet50", width=16)
    assert set(state_dict) == set(flaxnets.convert.torch_shapes("resnet50"))  # every key of the full width
    exporting.export(model, variables, tmp_path / "resnet50.stablehlo", input_shape=(32, 32, 3))
    images = rng.standard_normal((5, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "resnet50.stablehlo"),
                             str(tmp_path / "images.npy"), str(tmp_path / "out.npy")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = jax.jit(lambda x: model.apply(variables, x, False))(images)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@needs_flatbuffers
def test_a_disagreeing_export_writes_nothing(tmp_path, monkeypatch):
    model, variables, shape = _model("lenet")
    serialize = exporting._SERIALIZERS["stablehlo"]

    def off_by_a_little(fn, shape):
        data, run = serialize(fn, shape)
        return data, lambda images: run(images) * 1.01

    monkeypatch.setitem(exporting._SERIALIZERS, "stablehlo", off_by_a_little)
    with pytest.raises(exporting.ExportCheckError, match="differs from the JAX model"):
        exporting.export(model, variables, tmp_path / "model.stablehlo", input_shape=shape)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_one_sentence(tmp_path, capsys):
    (tmp_path / "taken.stablehlo").write_bytes(b"mine")
    for args, words in ((["lenet5", "--out", str(tmp_path / "taken.stablehlo")], "already exists"),
                        (["lenet5", "--out", str(tmp_path / "model.bin")], "cannot tell the format"),
                        (["lenet6", "--out", str(tmp_path / "m.onnx")], "unknown model"),
                        (["lenet5", "--weights", str(tmp_path), "--out", str(tmp_path / "m.onnx")], "config.json")):
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert (tmp_path / "taken.stablehlo").read_bytes() == b"mine"


@needs_flatbuffers
def test_the_command_exports_a_saved_folder(tmp_path, capsys):
    model, variables, shape = _model("lenet")
    flaxnets.save_pretrained(tmp_path / "lenet", "lenet5_bn", variables)
    out = tmp_path / "lenet.stablehlo"
    assert main(["export", "lenet5_bn", "--weights", str(tmp_path / "lenet"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (stablehlo")
    restored = jax.export.deserialize(out.read_bytes())
    x = jnp.ones((3, *shape))
    np.testing.assert_allclose(restored.call(x), model.apply(variables, x, False), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# bad requests, refused before any export; and the rest of `python -m flaxnets`'s own command line


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be made in: one without write permission, or /proc where root ignores permissions."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/proc/self").is_dir():
        yield Path("/proc")
    else:
        pytest.skip("root ignores permissions here and there is no /proc")


def _one_sentence(err: str, words: str) -> None:
    assert err.startswith("error: ") and words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_destination_without_room_is_refused_before_exporting(tmp_path, read_only_folder, capsys, monkeypatch):
    def never(fn, shape):
        raise AssertionError("exported before the destination was checked")

    monkeypatch.setitem(exporting._SERIALIZERS, "stablehlo", never)
    (tmp_path / "afile").write_text("mine\n")
    for out, words in ((read_only_folder / "m.stablehlo", "no file can be made in"),
                       (read_only_folder / "new" / "m.stablehlo", "no file can be made in"),
                       (tmp_path / "afile" / "m.stablehlo", "afile is not a folder")):
        assert main(["export", "lenet5_bn", "--out", str(out)]) == 2
        _one_sentence(capsys.readouterr().err, words)
        model, variables, shape = _model("lenet")
        with pytest.raises(exporting.ExportError, match=words):
            exporting.export(model, variables, out, input_shape=shape)
    assert (tmp_path / "afile").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] + (["read-only"] if os.geteuid() else [])


@pytest.mark.parametrize("tolerance", ["nan", "-1", "0", "inf"])
def test_a_tolerance_that_checks_nothing_is_refused_first(tolerance, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(exporting, "export", lambda *args, **kwargs: pytest.fail("exported with a bad tolerance"))
    assert main(["export", "lenet5_bn", "--out", str(tmp_path / "m.onnx"), "--tolerance", tolerance]) == 2
    _one_sentence(capsys.readouterr().err, "--tolerance must be a finite number above 0")
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_a_tolerance_that_checks_nothing(tmp_path):
    model, variables, shape = _model("lenet")
    for tolerance in (float("nan"), -1.0, 0, True):
        with pytest.raises(exporting.ExportError, match="tolerance must be a finite number above 0"):
            exporting.export(model, variables, tmp_path / "m.stablehlo", input_shape=shape, tolerance=tolerance)


def test_the_library_says_how_to_export_an_nnx_model(tmp_path):
    model = flaxnets_nnx.create_model("lenet5", num_classes=10, input_shape=(28, 28, 1))
    with pytest.raises(exporting.ExportError, match=r"got a Model and a NoneType; for an NNX model pass "
                                                    r"model.module, model.variables\.$"):
        exporting.export(model, None, tmp_path / "m.onnx", input_shape=(28, 28, 1))
    assert list(tmp_path.iterdir()) == []


def test_a_weights_file_an_architecture_cannot_read_is_named_with_the_reason(tmp_path, capsys):
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    for weights, words in ((tmp_path / "garbage.pth", "lenet5_bn has no torchvision counterpart"),
                           (tmp_path / "missing.pth", "there is no such file or folder")):
        assert main(["export", "lenet5_bn", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 2
        err = capsys.readouterr().err
        _one_sentence(err, words)
        assert f"cannot read the weights {weights}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth"]


@needs_flatbuffers
def test_the_file_gets_the_mode_open_would_give_and_nothing_else_is_left(tmp_path):
    model, variables, shape = _model("lenet")
    previous = os.umask(0o027)
    try:
        exporting.export(model, variables, tmp_path / "model.stablehlo", input_shape=shape)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.stablehlo").stat().st_mode) == 0o640  # 0666 less the umask, not 0600
    assert [p.name for p in tmp_path.iterdir()] == ["model.stablehlo"]


@needs_flatbuffers
def test_a_file_that_cannot_be_written_leaves_no_folder_made_for_it(tmp_path, monkeypatch):
    model, variables, shape = _model("lenet")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporting.os, "link", disk_full)
    monkeypatch.setattr(exporting.os, "replace", disk_full)
    (tmp_path / "kept").mkdir()
    with pytest.raises(exporting.ExportError, match=r"No space left on device\); nothing was written"):
        exporting.export(model, variables, tmp_path / "kept" / "new" / "deeper" / "m.stablehlo", input_shape=shape)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


@needs_flatbuffers
def test_a_file_made_at_the_destination_during_the_export_is_kept(tmp_path, monkeypatch):
    """Without overwrite, the file another process wrote meanwhile wins; with it, the export replaces it."""
    model, variables, shape = _model("lenet")
    out = tmp_path / "m.stablehlo"
    serialize = exporting._SERIALIZERS["stablehlo"]

    def and_meanwhile(fn, shape):
        result = serialize(fn, shape)
        out.write_text("mine\n")
        return result

    monkeypatch.setitem(exporting._SERIALIZERS, "stablehlo", and_meanwhile)
    with pytest.raises(exporting.ExportError, match="appeared while exporting; it is kept"):
        exporting.export(model, variables, out, input_shape=shape)
    assert out.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["m.stablehlo"]
    out.unlink()
    exporting.export(model, variables, out, input_shape=shape, overwrite=True)
    assert out.read_bytes() != b"mine\n" and [p.name for p in tmp_path.iterdir()] == ["m.stablehlo"]


def test_every_pattern_given_is_listed_and_one_matching_nothing_is_an_error(capsys):
    assert main(["resnet1*", "vgg11"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()][:-1]
    assert names == sorted(flaxnets.list_models("resnet1*") + ["vgg11"])
    assert main(["vgg11", "nothing*"]) == 2
    captured = capsys.readouterr()
    _one_sentence(captured.err, "no architecture matches 'nothing*'")
    assert captured.out == ""


@pytest.mark.parametrize("batch,words", [("10" + "0" * 11, "give at most 59,837,367,498"), ("0", "positive integer")])
def test_summary_refuses_a_batch_out_of_range_before_the_table(batch, words, capsys):
    assert main(["summary", "lenet5_bn", "--batch", batch]) == 2
    captured = capsys.readouterr()
    _one_sentence(captured.err, words)
    assert captured.out == ""


@pytest.mark.parametrize("pattern", ["lenet*", "*"])  # less than a pipe's buffer, and more
def test_a_reader_that_leaves_early_ends_the_listing_quietly(pattern):
    process = subprocess.Popen([sys.executable, "-m", "flaxnets", pattern], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the listing is written: every write meets a pipe without a reader
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and err == "", err  # as a POSIX tool ended by SIGPIPE
