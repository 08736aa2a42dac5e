"""`flaxnets.export` and ``python -m flaxnets export``: StableHLO reloaded in a fresh process, ONNX run by
onnxruntime, and no file written when the exported program disagrees with the JAX model.

The table of families and formats in docs/research.md is the list below; the families named in STABLEHLO_FAMILIES
and ONNX_FAMILIES are exported here with a small member at a small input at every run, the others in
the sweep recorded in benchmarks/RESULTS.md (``python -m benchmarks.exports``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from flaxnets import export as exporting
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
