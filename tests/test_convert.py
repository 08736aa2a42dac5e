"""flaxnets.convert: torchvision weights in and out, with numerical parity.

Parity tests build each torchvision model with torchvision's own random initialisation, give every
BatchNorm random affine parameters and running statistics (torchvision initialises them to 1, 0, 0, 1: the
values a conversion that lost them would give too), convert, and compare on the same images:

* eval mode: logits;
* train mode (dropout off on both sides, since the two frameworks draw different masks): logits, GoogLeNet's
  auxiliary logits, and the running statistics after one forward pass;
* the way back: ``to_torch(from_torch(sd))`` equals ``sd`` exactly and loads strictly into torchvision.

Errors are relative to the reference's scale: ``max|flax - torch| / max|torch|``, below 1e-4 in float32;
in train mode, where torch's own float32 result is further than that from its float64 one (ResNet-101 and
-152: BatchNorm on a small batch amplifies rounding), below twice torch's own error (`torch_float32_error`).
Inputs are small where the architecture allows (the suite runs on two CPU cores), 224x224 for resnet18 and
alexnet, and 299x299 for Inception v3 with its auxiliary head (which needs that size to run). VGG-13/19 and
the BatchNorm VGG-16/19 are compared by keys and shapes only (each has ~140M parameters; VGG-11, VGG-11-BN
and VGG-16 run fully and share all conversion code with them), and so are ResNeXt-101, Wide ResNet-50 and
-101 (ResNeXt-50 and Wide ResNet-50 run, with grouped and widened bottlenecks) and DenseNet-161, -169 and -201 (DenseNet-121
runs; they differ in depth, growth rate and stem width only).
Without torch/torchvision these tests skip with the reason; the format and error tests need numpy only.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import flaxnets
from flaxnets import convert
from flaxnets.analysis import abstract_variables
from flaxnets.models.googlenet import collect_aux_logits
from flaxnets.models.vgg import D2L_CONV_ARCH
from flaxnets.torch_layout import TorchLayout
from reference import torch_or_skip, torchvision_or_skip

TOLERANCE = 1e-4
SUPPORTED = convert.supported_models()

# Input side per architecture (batch of 2): small where the architecture allows it, and keeping
# at least 2x2 final maps, so that train-mode BatchNorm sees more than two values per channel. The deeper
# ResNets and VGGs (tests/siblings.py) are ResNet-18/50 and VGG-11 with more blocks or layers: their keys
# and shapes are compared with torchvision's below, their values through the members here.
SIDES = {
    "alexnet": 63,
    "googlenet": 64,
    "resnet18": 64,
    "resnet50": 64,
    "vgg11": 32,
    "vgg11_bn": 32,
    "resnext50_32x4d": 64,
    "wide_resnet50_2": 64,
    "densenet121": 64,
    # Odd sides where its ceil-mode pools keep a partial last window.
    "squeezenet1_0": 63,
    "squeezenet1_1": 61,
}
# (arch, input side, fields of both models): the above, and Inception v3 at its native 299x299, the smallest
# input its auxiliary head (compared in training) runs at.
CASES = [(arch, side, {}) for arch, side in sorted(SIDES.items())] + [("inception_v3", 299, {"aux_logits": True})]
FULL_SIZE = ("alexnet", "resnet18")
# torchvision's own constructor arguments; GoogLeNet with its input transform on (as its ImageNet weights are
# used) and its auxiliary heads, whose outputs are compared too.
TORCH_KWARGS = {"googlenet": {"init_weights": True, "transform_input": True, "aux_logits": True},
                "inception_v3": {"init_weights": True, "transform_input": True}}
FLAX_OVERRIDES = {"googlenet": {"transform_input": True}, "inception_v3": {"transform_input": True},
                  "vgg11": {"hidden": (64, 64)}, "vgg11_bn": {"hidden": (64, 64)},
                  "densenet121": {"block_sizes": (2, 2, 2, 2)}}
# Smaller members built with torchvision's own classes, compared at the same fields (the full-size keys
# and shapes are compared with torchvision's in test_keys_and_shapes_match_torchvision):
# - VGG's classifier at 64 hidden units instead of 4,096: the same three layers and the same flattening of
#   the 512x7x7 map into the first, a fiftieth of the 133 million parameters to initialise, convert, compare;
# - DenseNet-121 with two dense layers a block instead of 6, 12, 24 and 16: every kind of layer and key,
#   a program a fifth the size to compile.
NARROW_CLASSIFIER = {"vgg11": 64, "vgg11_bn": 64}
TORCH_BUILDERS = {"densenet121": lambda models: models.DenseNet(32, (2, 2, 2, 2), 64)}
# GoogLeNet and Inception v3 have hundreds of differently shaped operations, and DenseNet's layers all differ
# in width: compiled as a whole they run 2-3x sooner than op by op. The ResNets repeat a few block shapes,
# so op by op is quicker than compiling 150 layers.
JITTED = {"googlenet", "inception_v3", "densenet121"}


def apply_fn(model, arch: str, **kwargs):
    apply = functools.partial(model.apply, **kwargs)
    if arch not in JITTED:
        return apply
    return jax.jit(apply)


def rel_err(actual, reference) -> float:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


def torch_model(arch: str, seed: int = 0, **kwargs):
    """torchvision's ``arch`` with its own random initialisation and random BatchNorm parameters and statistics."""
    torch, torchvision = torchvision_or_skip()
    torch.manual_seed(seed)
    if arch in TORCH_BUILDERS:
        model = TORCH_BUILDERS[arch](torchvision.models)
    else:
        builder = getattr(torchvision.models, flaxnets.get_spec(arch).torchvision)
        model = builder(**{**TORCH_KWARGS.get(arch, {}), **kwargs})
    if arch in NARROW_CLASSIFIER:
        hidden, layers = NARROW_CLASSIFIER[arch], model.classifier
        for index, (fan_in, fan_out) in {0: (layers[0].in_features, hidden), 3: (hidden, hidden),
                                         6: (hidden, layers[6].out_features)}.items():
            layers[index] = torch.nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def no_dropout(torch_module, arch: str) -> dict:
    """Switch dropout off in the torch model; returns the flaxnets fields that do the same."""
    torch = torch_or_skip()
    for module in torch_module.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    fields = flaxnets.create_model(arch, num_classes=10).__dataclass_fields__
    return {name: 0.0 for name in ("dropout", "aux_dropout") if name in fields}


def images(side: int, seed: int = 0) -> np.ndarray:
    """A batch of 2 NCHW images, roughly ImageNet-normalised."""
    return np.random.default_rng(seed).standard_normal((2, 3, side, side)).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def random_state_dict(arch: str, seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """A state_dict of the right keys and shapes with random values, made without torch."""
    rng = np.random.default_rng(seed)
    shapes = convert.torch_shapes(arch, **overrides)
    return {key: rng.standard_normal(shape, dtype=np.float32) for key, shape in shapes.items()}


# ------------------------------------------------------------------------------------------------------
# Keys and shapes: every architecture against torchvision's own state_dict, nothing allocated.


@pytest.mark.parametrize("arch", SUPPORTED)
def test_keys_and_shapes_match_torchvision(arch):
    torch, torchvision = torchvision_or_skip()
    builder = getattr(torchvision.models, flaxnets.get_spec(arch).torchvision)
    # torchvision's GoogLeNet class has the auxiliary heads, its pretrained model not: both must convert.
    variants = [{"aux_logits": True}, {"aux_logits": False}] if arch in ("googlenet", "inception_v3") else [{}]
    init = {"init_weights": True} if arch in ("googlenet", "inception_v3") else {}  # they warn without it
    for fields in variants:
        with torch.device("meta"):
            expected = builder(**fields, **init).state_dict()
        _check_keys(expected, convert.torch_shapes(arch, **fields))


def _check_keys(torch_state_dict, shapes):
    expected = {k: tuple(v.shape) for k, v in torch_state_dict.items() if not k.endswith("num_batches_tracked")}
    assert shapes == expected
    # In torchvision's order too, but for GoogLeNet's auxiliary heads: torchvision registers them after
    # inception5b, flaxnets (like torchvision's forward) calls them after inception4a and 4d.
    def in_order(keys):
        return [k for k in keys if not k.startswith(("aux1.", "aux2."))]

    assert in_order(shapes) == in_order(expected)


def test_vgg_from_d2l_blocks_converts_as_its_table_row():
    d2l = convert.torch_shapes("vgg11", config=D2L_CONV_ARCH)
    assert d2l == convert.torch_shapes("vgg11") and list(d2l) == list(convert.torch_shapes("vgg11"))


def test_supported_models_are_the_ones_torchvision_has():
    assert set(SUPPORTED) == {n for n in flaxnets.list_models() if flaxnets.get_spec(n).torchvision}
    assert {"alexnet", "googlenet", "resnet18", "resnet152", "vgg11", "vgg19_bn"} <= set(SUPPORTED)
    assert len(SUPPORTED) == 27


# ------------------------------------------------------------------------------------------------------
# Numerical parity


def logits_and_aux(outputs) -> list:
    """A torch model's training outputs as a list: the logits, then the auxiliary logits in network order."""
    if hasattr(outputs, "aux_logits1"):  # GoogLeNet
        return [outputs.logits, outputs.aux_logits1, outputs.aux_logits2]
    if hasattr(outputs, "aux_logits"):  # Inception v3
        return [outputs.logits, outputs.aux_logits]
    return [outputs]


@pytest.mark.parametrize(("arch", "side", "fields"), CASES, ids=[f"{arch}-{side}" for arch, side, _ in CASES])
def test_matches_torchvision(arch, side, fields):
    torch, _ = torchvision_or_skip()
    reference = torch_model(arch, **fields).eval()
    state_dict = state_dict_numpy(reference)
    variables = convert.from_torch(arch, reference.state_dict(), **FLAX_OVERRIDES.get(arch, {}))
    x = images(side)

    # Eval mode: running statistics, no dropout.
    model = flaxnets.create_model(arch, num_classes=1000, **FLAX_OVERRIDES.get(arch, {}), **fields)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    eval_err = rel_err(apply_fn(model, arch, train=False)(variables, nhwc(x)), expected)
    report = f"\n{arch} @{side}: eval {eval_err:.1e}"
    assert eval_err < TOLERANCE, report

    # Train mode (BatchNorm models; without BatchNorm and dropout it is eval mode): batch statistics, and
    # the running statistics they update.
    if "batch_stats" in variables:
        fields = {**fields, **no_dropout(reference, arch)}
        model = flaxnets.create_model(arch, num_classes=1000, **FLAX_OVERRIDES.get(arch, {}), **fields)
        reference.train()
        with torch.no_grad():
            outputs = reference(torch.from_numpy(x))
        train = apply_fn(model, arch, train=True, mutable=["batch_stats", "aux_logits"])
        logits, mutated = train(variables, nhwc(x))
        torch_outputs = logits_and_aux(outputs)
        train_err = max(rel_err(a, b.numpy()) for a, b in zip([logits, *collect_aux_logits(mutated)], torch_outputs))
        assert len(collect_aux_logits(mutated)) == len(torch_outputs) - 1
        torch_stats = convert.from_torch(arch, reference.state_dict(), **FLAX_OVERRIDES.get(arch, {}))["batch_stats"]
        stats_err = max_err(mutated["batch_stats"], torch_stats)
        report += f", train {train_err:.1e}, running stats {stats_err:.1e}"

    # The way back is exact and loads strictly into torchvision (restoring its weights before training).
    back = convert.to_torch(arch, variables, **FLAX_OVERRIDES.get(arch, {}))
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            assert back[key].dtype == torch.float32 and np.array_equal(back[key].numpy(), value), key
    reference.load_state_dict(back, strict=True)

    if "batch_stats" in variables and max(train_err, stats_err) >= TOLERANCE:
        floor = torch_float32_error(arch, reference, x, torch_outputs, torch_stats)
        report += f" (torch float32 vs float64: {floor:.1e})"
        assert max(train_err, stats_err) < 2 * floor, report
    print(report)


def max_err(actual_tree, reference_tree) -> float:
    actual, reference = flatten_dict(actual_tree), flatten_dict(reference_tree)
    assert actual.keys() == reference.keys()
    return max(rel_err(actual[key], reference[key]) for key in actual)


def torch_float32_error(arch, reference, x, outputs32, stats32) -> float:
    """How far torch's own float32 train step (logits, auxiliary logits, running statistics) is from a float64 one.

    ``reference`` holds the weights from before the float32 step, which gave ``outputs32`` and ``stats32``.
    Deep ResNets in train mode on a small batch amplify float32 rounding through every BatchNorm: ResNet-152's
    torch float32 logits differ from float64 ones by ~1e-3, so no float32 implementation can match them to 1e-4.
    So does Inception v3's auxiliary head, whose last BatchNorm sees one pixel of each of the batch's two
    images. Where the 1e-4 check fails, flaxnets must be as close to torch as torch's float32 is to its
    float64. (In float64, flaxnets and torchvision agree to ~1e-8.) Leaves ``reference`` in float64.
    """
    torch = torch_or_skip()
    with torch.no_grad():
        outputs64 = logits_and_aux(reference.double().train()(torch.from_numpy(x).double()))
    stats64 = convert.from_torch(arch, reference.state_dict(), **FLAX_OVERRIDES.get(arch, {}))["batch_stats"]
    return max(*(rel_err(a.numpy(), b.numpy()) for a, b in zip(outputs32, outputs64)), max_err(stats32, stats64))


@pytest.mark.parametrize("arch", FULL_SIZE)
def test_matches_torchvision_at_224(arch):
    torch, _ = torchvision_or_skip()
    reference = torch_model(arch, seed=1).eval()
    x = images(224, seed=1)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    model = flaxnets.create_model(arch, num_classes=1000)
    err = rel_err(model.apply(convert.from_torch(arch, reference.state_dict()), nhwc(x), train=False), expected)
    print(f"\n{arch} @224: eval {err:.1e}")
    assert err < TOLERANCE


def test_googlenet_without_auxiliary_heads():
    """torchvision's pretrained GoogLeNet has no auxiliary heads in its state_dict; from_torch follows it.
    (Its forward pass is the one above: the auxiliary heads do not run in eval mode.)"""
    torch, _ = torchvision_or_skip()
    reference = torch_model("googlenet", aux_logits=False).eval()
    variables = convert.from_torch("googlenet", reference.state_dict())
    assert "aux1" not in variables["params"] and "inception4a" in variables["params"]
    shapes = abstract_variables("googlenet", aux_logits=False)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, {c: shapes[c] for c in variables})
    reference.load_state_dict(convert.to_torch("googlenet", variables), strict=True)


def test_pretrained_overrides():
    assert convert.pretrained_overrides("googlenet") == {"transform_input": True}
    assert convert.pretrained_overrides("inception_v3") == {"transform_input": True}
    assert convert.pretrained_overrides("resnet50") == {}


# ------------------------------------------------------------------------------------------------------
# Errors: one sentence, a ValueError, naming the first key that does not fit.


def _error(arch, state_dict) -> str:
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.from_torch(arch, state_dict)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and message.endswith(".")
    return message


def test_missing_key_is_named():
    state_dict = random_state_dict("resnet18")
    del state_dict["layer2.0.bn1.running_var"], state_dict["fc.bias"]
    message = _error("resnet18", state_dict)
    assert "'layer2.0.bn1.running_var' is missing" in message and "2 missing" in message


def test_unexpected_key_is_named():
    state_dict = random_state_dict("resnet18")
    state_dict["layer1.0.conv3.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    assert "'layer1.0.conv3.weight' is unexpected" in _error("resnet18", state_dict)


def test_wrong_architecture_names_the_first_wrong_shape():
    message = _error("resnet18", {k: np.zeros(s, np.float32) for k, s in convert.torch_shapes("resnet50").items()})
    assert "'layer1.0.conv1.weight' has shape (64, 64, 1, 1) where resnet18 has (64, 64, 3, 3)" in message
    message = _error("vgg11", {k: np.zeros(s, np.float32) for k, s in convert.torch_shapes("alexnet").items()})
    assert "'features.0.weight'" in message


def test_num_batches_tracked_is_optional_and_module_prefix_is_stripped():
    state_dict = random_state_dict("resnet18")
    with_extras = {f"module.{k}": v for k, v in state_dict.items()}
    with_extras["module.bn1.num_batches_tracked"] = np.array(5)
    a, b = convert.from_torch("resnet18", state_dict), convert.from_torch("resnet18", with_extras)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_weights_that_are_not_finite_are_refused_by_name():
    """A diverged or damaged file would make every prediction NaN (`predict` printed "nan%")."""
    state_dict = random_state_dict("resnet18")
    state_dict["layer2.0.bn1.running_var"] = np.asarray(state_dict["layer2.0.bn1.running_var"]).copy()
    state_dict["layer2.0.bn1.running_var"][[0, 3]] = [np.inf, np.nan]
    with pytest.raises(convert.StateDictMismatchError, match=r"layer2\.0\.bn1\.running_var holds 2 value\(s\) that are "
                                                             "not finite"):
        convert.from_torch("resnet18", state_dict)


def test_wrong_variables_are_named_on_the_way_back():
    variables = convert.from_torch("resnet18", random_state_dict("resnet18"))
    del variables["batch_stats"]["layer1_1"]
    with pytest.raises(convert.StateDictMismatchError, match="'batch_stats/layer1_1/bn1/mean' is missing"):
        convert.to_torch("resnet18", variables, return_numpy=True)


def test_architectures_without_torchvision_counterpart_are_refused():
    with pytest.raises(ValueError, match="no torchvision counterpart.*resnet18"):
        convert.from_torch("resnet18_cifar", {})
    with pytest.raises(flaxnets.UnknownModelError, match="resnet18"):
        convert.from_torch("resnet19", {})


# ------------------------------------------------------------------------------------------------------
# Files and fine-tuning


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_numpy_formats_round_trip(tmp_path, suffix):
    state_dict = random_state_dict("resnet18")
    state_dict["bn1.num_batches_tracked"] = np.array(3, np.int64)
    convert.save_state_dict(state_dict, tmp_path / f"weights{suffix}")
    loaded = convert.load_state_dict(tmp_path / f"weights{suffix}")
    assert list(loaded) == list(state_dict)
    assert all(loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v) for k, v in state_dict.items())


def test_safetensors_agree_with_the_reference_implementation(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {
        "a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b.half": np.linspace(-1, 1, 5).astype(np.float16),
        "c.count": np.array(7, np.int64),
        "d.flag": np.array([True, False]),
    }
    convert.save_state_dict(arrays, tmp_path / "ours.safetensors")
    theirs = safetensors_numpy.load_file(tmp_path / "ours.safetensors")
    assert theirs.keys() == arrays.keys() and all(np.array_equal(theirs[k], v) for k, v in arrays.items())
    safetensors_numpy.save_file(arrays, tmp_path / "theirs.safetensors")
    ours = convert.load_state_dict(tmp_path / "theirs.safetensors")
    assert ours.keys() == arrays.keys() and all(np.array_equal(ours[k], v) for k, v in arrays.items())


def test_a_safetensors_header_whose_offsets_do_not_tile_the_data_is_refused(tmp_path):
    """Offsets pointing one tensor at another's bytes, a byte count that is not the shape's, or bytes after
    the last tensor: each a damaged file in one sentence, where reading would hand back wrong values."""
    import json
    import struct

    arrays = {"a": np.arange(6, dtype=np.float32), "b": np.ones(2, np.float32)}
    convert.save_state_dict(arrays, tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]

    def damaged(edit, extra=b""):
        changed = json.loads(json.dumps(header))
        edit(changed)
        text = json.dumps(changed).encode()
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data + extra)
        with pytest.raises(convert.WeightsFileError, match="bad.safetensors is damaged") as caught:
            convert.load_state_dict(tmp_path / "bad.safetensors")
        return str(caught.value)

    assert "overlap" in damaged(lambda h: h["b"].update(data_offsets=[0, 8]))
    assert "has 8 bytes for F32 of shape (3,)" in damaged(lambda h: h["b"].update(shape=[3]))
    assert "4 bytes after its last tensor" in damaged(lambda h: None, extra=b"\0" * 4)


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert.load_state_dict(tmp_path / "weights.h5")


def test_pth_files_and_torchvision_reference_checkpoints(tmp_path):
    torch = torch_or_skip()
    state_dict = random_state_dict("resnet18")
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    tensors["fc.weight"] = tensors["fc.weight"].to(torch.bfloat16)  # numpy has no bfloat16: widened on reading
    torch.save({"model": tensors, "epoch": 3}, tmp_path / "checkpoint.pth")  # torchvision's references/train.py
    variables = convert.load_pretrained("resnet18", tmp_path / "checkpoint.pth")
    expected = tensors["fc.weight"].float().numpy().T
    assert np.array_equal(variables["params"]["fc"]["kernel"], expected)
    convert.save_state_dict(convert.to_torch("resnet18", variables), tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert torch.equal(back["layer4.1.conv2.weight"], tensors["layer4.1.conv2.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_load_pretrained_keeps_every_tensor(tmp_path, suffix):
    state_dict = random_state_dict("resnet18")
    convert.save_state_dict(state_dict, tmp_path / f"resnet18{suffix}")
    variables = convert.load_pretrained("resnet18", tmp_path / f"resnet18{suffix}")
    expected = convert.from_torch("resnet18", state_dict)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, expected))


def test_load_pretrained_with_a_new_head():
    state_dict = random_state_dict("resnet18")
    variables = convert.load_pretrained("resnet18", state_dict, num_classes=10, rng=3)
    converted = flatten_dict(convert.from_torch("resnet18", state_dict))
    got = flatten_dict(variables)
    assert got.keys() == converted.keys()
    for key, value in got.items():
        if key[1] == "fc":
            assert value.shape[-1] == 10
        else:
            assert np.array_equal(value, converted[key]), key
    # The new head is initialised as create_model initialises it (U(+-1/sqrt(fan_in)), zero bias).
    kernel = np.asarray(got["params", "fc", "kernel"])
    assert kernel.shape == (512, 10) and 0 < np.abs(kernel).max() <= 1 / np.sqrt(512)
    assert not np.any(got["params", "fc", "bias"])
    model = flaxnets.create_model("resnet18", num_classes=10)
    assert model.apply(variables, np.zeros((2, 64, 64, 3), np.float32), train=False).shape == (2, 10)


@pytest.mark.parametrize("channels", [1, 6])
def test_load_pretrained_for_other_input_channels_keeps_the_response(channels):
    """``in_channels``: the first convolution's colour kernel is summed (one channel) or repeated and scaled
    (six), so ``channels`` copies of a grey image get the logits its RGB copy gets from the weights as
    published; nothing else changes."""
    model = flaxnets.create_model("squeezenet1_1", num_classes=10)
    variables = jax.jit(lambda key: model.init(key, np.zeros((1, 33, 33, 3), np.float32), False))(jax.random.key(0))
    state_dict = convert.to_torch("squeezenet1_1", variables)
    adapted = convert.load_pretrained("squeezenet1_1", state_dict, in_channels=channels)
    assert adapted["params"]["conv10"]["kernel"].shape == (1, 1, 512, 10)  # a class layer that is a convolution
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    expected = kernel.sum(axis=2, keepdims=True) if channels == 1 else np.concatenate([kernel, kernel], axis=2) / 2
    np.testing.assert_allclose(adapted["params"]["conv1"]["kernel"], expected, rtol=1e-6)
    _, loaded = flaxnets.from_pretrained("squeezenet1_1", state_dict, in_channels=channels)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, adapted))
    rest = lambda v: {k: x for k, x in flatten_dict(dict(v["params"])).items() if k[0] != "conv1"}  # noqa: E731
    assert jax.tree.all(jax.tree.map(np.array_equal, rest(adapted), rest(variables)))
    grey = np.random.default_rng(1).standard_normal((2, 33, 33, 1)).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, False))
    np.testing.assert_allclose(apply(adapted, np.tile(grey, (1, 1, 1, channels))),
                               apply(variables, np.tile(grey, (1, 1, 1, 3))), rtol=1e-5, atol=1e-6)


def test_load_pretrained_leaves_kernels_that_images_do_not_decide():
    """GoogLeNet with ``transform_input`` makes three channels of any grey image before its first
    convolution, so that kernel keeps its colours; a channel count that is not a positive integer is refused."""
    state_dict = random_state_dict("googlenet")
    variables = convert.load_pretrained("googlenet", state_dict, in_channels=1, transform_input=True)
    assert variables["params"]["conv1"]["conv"]["kernel"].shape == (7, 7, 3, 64)
    with pytest.raises(ValueError, match="in_channels must be a positive integer, got 0"):
        convert.load_pretrained("googlenet", state_dict, in_channels=0)
    with pytest.raises(ValueError, match="transform_input re-maps RGB images .* these have 2 channels"):
        convert.load_pretrained("googlenet", state_dict, in_channels=2, transform_input=True)


def test_load_pretrained_googlenet_fills_in_auxiliary_heads():
    """torchvision's pretrained GoogLeNet lacks (untrained) auxiliary heads; the default model has them."""
    state_dict = random_state_dict("googlenet", aux_logits=False)
    variables = convert.load_pretrained("googlenet", state_dict)
    shapes = abstract_variables("googlenet")
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, {c: shapes[c] for c in variables})
    converted = flatten_dict(convert.from_torch("googlenet", state_dict))
    for key, value in flatten_dict(variables).items():
        if key[1] in ("aux1", "aux2"):
            assert key not in converted and np.all(np.isfinite(value))
        else:
            assert np.array_equal(value, converted[key]), key
    assert np.any(variables["params"]["aux2"]["fc1"]["kernel"])  # initialised, not left at zero
    without = convert.load_pretrained("googlenet", state_dict, aux_logits=False)
    assert "aux1" not in without["params"]


def test_head_paths_are_the_layers_that_follow_num_classes():
    """For one architecture of each family: the params whose shape changes with num_classes."""
    for arch in {flaxnets.get_spec(name).family: name for name in flaxnets.list_models()}.values():
        params = abstract_variables(arch, num_classes=7)["params"]
        seven = flatten_dict(params)
        eleven = flatten_dict(abstract_variables(arch, num_classes=11)["params"])
        follows = {key for key in seven if seven[key].shape != eleven[key].shape}
        heads = convert.head_paths(arch)
        assert follows == {key for key in seven if any(key[: len(h)] == h for h in heads)}, arch
        mask = flatten_dict(convert.head_mask(arch, params))
        assert {key for key, is_head in mask.items() if is_head} == follows


def test_each_family_declares_its_layout_beside_it():
    """Every registered architecture carries the `TorchLayout` its family module declares (only the fields
    of its own pretrained weights may differ), and those torchvision has name their modules."""
    for name in flaxnets.list_models():
        spec = flaxnets.get_spec(name)
        assert isinstance(spec.torch_layout, TorchLayout) and spec.torch_layout.heads, name
        declared = getattr(sys.modules[f"flaxnets.models.{spec.family}"], "TORCH_LAYOUT", None)
        assert isinstance(declared, TorchLayout), f"flaxnets/models/{spec.family}.py declares no TORCH_LAYOUT"
        assert (dataclasses.replace(spec.torch_layout, pretrained_overrides={})
                == dataclasses.replace(declared, pretrained_overrides={})), name
        assert spec.torch_layout.module_name is not None or not spec.torchvision, name


def _code_words(path) -> tuple[set[str], set[str], set[str]]:
    """The identifiers, the string literals (docstrings aside) and the imported modules of a Python file."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
    names, strings, imports = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.add(node.value)
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module or "")
        elif isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        for field in ("id", "attr", "name", "arg"):
            if isinstance(getattr(node, field, None), str):
                names.add(getattr(node, field))
    return names, strings, imports


def test_the_conversion_names_no_family():
    """The mechanism (flaxnets/convert/, flaxnets/torch_layout.py) knows architectures only through their
    specs: no family or architecture name in its code, no module name of any family's layout in its
    strings, no import of a model module. Docstrings and comments may name them."""
    specs = [flaxnets.get_spec(name) for name in flaxnets.list_models()]
    families = {spec.family for spec in specs}
    layouts = [spec.torch_layout for spec in specs]
    module_names = {segment for layout in layouts
                    for path in (*layout.heads, *layout.untrained, *layout.flattened, *((h,) for h in layout.aux_heads))
                    for segment in path}
    root = Path(convert.__file__).parent
    files = sorted(root.glob("*.py")) + [root.parent / "torch_layout.py"]
    assert len(files) > 2
    for path in files:
        names, strings, imports = _code_words(path)
        words = {w for text in names | strings for w in re.findall(r"[a-z]+", text.lower())}
        assert not words & families, f"{path.name} names {sorted(words & families)}"
        assert not strings & (module_names | {spec.name for spec in specs}), f"{path.name} names a family's module"
        assert not [m for m in imports if m.startswith("flaxnets.models")], f"{path.name} imports a model module"


def test_works_without_torch(tmp_path):
    """flaxnets imports no torch, and reads .safetensors/.npz and converts where torch cannot be imported."""
    script = textwrap.dedent(
        f"""
        import sys
        import flaxnets
        assert "torch" not in sys.modules, "importing flaxnets imported torch"
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from flaxnets import convert
        sd = {{k: np.ones(s, np.float32) for k, s in convert.torch_shapes("resnet18").items()}}
        for suffix in (".safetensors", ".npz"):
            convert.save_state_dict(sd, r"{tmp_path}/w" + suffix)
            variables = convert.load_pretrained("resnet18", r"{tmp_path}/w" + suffix)
            back = convert.to_torch("resnet18", variables, return_numpy=True)
            assert all(np.array_equal(back[k], v) for k, v in sd.items())
        try:
            convert.to_torch("resnet18", variables)
        except ImportError:
            print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
