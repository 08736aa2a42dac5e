"""Published weights in the trainer and its commands: ``--init-from IMAGENET1K_V1`` (with the weights'
normalisation), ``train.predict --weights`` and ``train.evaluate --weights``, offline.

A ResNet-18 of flaxnets' own random initialisation stands in for torchvision's file: it is put in the
weights table under resnet18's IMAGENET1K_V1 with a small resize and crop (72 and 64 pixels, so the tests
run in seconds), and served from a mirror folder (``FLAXNETS_WEIGHTS_URL``). Every command reads the table
as it reads the real entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket

import jax
import numpy as np
import pytest
from PIL import Image

import flaxnets
from flaxnets import hub
from flaxnets.analysis import abstract_variables
from flaxnets.convert import save_state_dict, to_torch
from flaxnets.images import center_crop, resize_shorter
from train import evaluate, predict
from train.__main__ import main as train_main
from train.config import Config, ConfigError
from train.run import build_run, with_weights_defaults

from reference import torchvision_or_skip


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict:
    """Variables of a 1000-class ResNet-18: He-scaled random kernels, random biases and BatchNorm statistics
    (drawn with numpy: compiling the model's own init would take longer than the tests that use them)."""
    rng = np.random.default_rng(3)

    def draw(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        if leaf in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape)
        return rng.uniform(-0.1, 0.1, shape)

    shapes = abstract_variables("resnet18", num_classes=1000)
    return jax.tree_util.tree_map_with_path(lambda path, s: draw(path, s.shape).astype(np.float32), shapes)


@pytest.fixture()
def published(imagenet_resnet18, tmp_path, monkeypatch) -> hub.Weights:
    """resnet18's IMAGENET1K_V1 replaced by `imagenet_resnet18` in a mirror folder, resized 72, cropped 64."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    file = mirror / "weights.npz"
    save_state_dict(to_torch("resnet18", imagenet_resnet18, return_numpy=True), file)
    name = f"resnet18-{hashlib.sha256(file.read_bytes()).hexdigest()[:8]}.npz"
    file.rename(mirror / name)
    weights = dataclasses.replace(hub.get_weights("resnet18", "IMAGENET1K_V1"), resize=72, crop=64,
                                  url=f"https://download.pytorch.org/models/{name}", sha256_prefix=name[9:17])
    monkeypatch.setitem(hub.WEIGHTS, "resnet18", {"IMAGENET1K_V1": weights})
    monkeypatch.setenv(hub.MIRROR_ENV, str(mirror))
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    return weights


def expected_log_probabilities(variables, weights: hub.Weights, images: list[np.ndarray]) -> np.ndarray:
    """Log class probabilities ``(N, 1000)`` of RGB uint8 images under the weights' own preprocessing,
    computed here."""
    pixels = np.stack([center_crop(resize_shorter(image, weights.resize), weights.crop) for image in images])
    pixels = (pixels.astype(np.float32) / 255 - np.asarray(weights.mean, np.float32)) / np.asarray(weights.std,
                                                                                                   np.float32)
    model = flaxnets.create_model("resnet18", num_classes=1000)
    return np.asarray(jax.nn.log_softmax(model.apply(variables, pixels, train=False)))


def test_predict_prints_imagenet_class_names_with_the_weights_preprocessing(published, imagenet_resnet18, tmp_path,
                                                                            capsys):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (90, 120, 3), np.uint8)
    grey = rng.integers(0, 256, (50, 40), np.uint8)
    paths = [str(tmp_path / "colour.png"), str(tmp_path / "grey.png")]
    Image.fromarray(colour).save(paths[0])
    Image.fromarray(grey).save(paths[1])

    assert predict.main(["--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--top-k", "3", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    classes = hub.imagenet_classes()
    rgb = [colour, np.repeat(grey[..., None], 3, axis=2)]
    for path, line, image in zip(paths, lines, rgb):  # (images of different sizes: one at a time)
        assert line.startswith(f"{path}: ")
        printed = re.findall(r"(?:^|, )(.+?) (\d+\.\d)%", line[len(path) + 2:])
        expected = np.exp(expected_log_probabilities(imagenet_resnet18, published, [image])[0])
        best = expected.argsort()[::-1][:3]
        assert [name for name, _ in printed] == [classes[i] for i in best]
        np.testing.assert_allclose([float(p) for _, p in printed], 100 * expected[best], atol=0.051)


def test_evaluate_scores_a_mock_imagenet_validation_split_with_the_weights_preprocessing(
        published, imagenet_resnet18, tmp_path, monkeypatch, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from train.data import load_split

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        # 10 examples over 8 devices: batches of 8, the second padded with 6 examples that must not count.
        assert evaluate.main(["--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--dataset", "imagenet2012",
                              "--batch-size", "4"]) == 0
        source = load_split("imagenet2012", None).test
        examples = [source[i] for i in range(len(source))]
    results = json.loads(capsys.readouterr().out)
    assert {k: results[k] for k in ("weights", "split", "resize", "crop", "examples", "published_top1")} == {
        "weights": "IMAGENET1K_V1", "split": "validation", "resize": 72, "crop": 64, "examples": 10,
        "published_top1": 0.69758}
    log_p = expected_log_probabilities(imagenet_resnet18, published, [image for image, _ in examples])
    labels = np.asarray([label for _, label in examples])
    assert results["top1"] == np.mean(log_p.argmax(axis=1) == labels)
    np.testing.assert_allclose(results["loss"], -np.mean(log_p[np.arange(10), labels]), rtol=1e-4)


def test_init_from_a_published_name_freezes_the_backbone_under_the_weights_normalisation(published, imagenet_resnet18,
                                                                                          digits):
    config = Config(arch="resnet18", batch_size=32, init_from="IMAGENET1K_V1", freeze_backbone=True).validate()
    run = build_run(config, data=digits)
    # Grey digits: the average of the weights' RGB mean and std, recorded with the data for predict.
    assert run.config.mean == (0.449,) and run.config.std == (0.226,)
    assert (run.preprocess.mean, run.preprocess.std) == ((0.449,), (0.226,))
    assert run.data.describe()["mean"] == [0.449]
    state = run.init_state()
    np.testing.assert_allclose(state.params["conv1"]["kernel"],
                               imagenet_resnet18["params"]["conv1"]["kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
    assert state.params["fc"]["kernel"].shape == (512, 10)
    # --mean/--std win over the weights' own.
    mine = build_run(dataclasses.replace(config, mean=(0.5,), std=(0.25,)), data=digits)
    assert (mine.preprocess.mean, mine.preprocess.std) == ((0.5,), (0.25,))
    with pytest.raises(ConfigError, match=r"^--mean has 2 values, but digits images have 1 channel\(s\)"):
        build_run(dataclasses.replace(config, mean=(0.5, 0.5)), data=digits)


def test_published_weights_bring_their_model_fields_and_rgb_normalisation():
    googlenet = with_weights_defaults(Config(arch="googlenet", init_from="IMAGENET1K_V1"), channels=3)
    weights = hub.get_weights("googlenet", "IMAGENET1K_V1")
    assert googlenet.model_args == {"transform_input": True}
    assert (googlenet.mean, googlenet.std) == (weights.mean, weights.std)
    kept = with_weights_defaults(Config(arch="googlenet", init_from="IMAGENET1K_V1",
                                        model_args={"transform_input": False}), channels=3)
    assert kept.model_args == {"transform_input": False}
    # A file of one's own is not published: nothing is assumed about it.
    own = Config(arch="googlenet", init_from="mine.pth")
    assert with_weights_defaults(own, channels=3) == own


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_bad_weights_on_the_command_line_are_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    cases = [
        (train_main, ["--arch", "resnet18", "--init-from", "IMAGENET1K_V9"],
         ("error: --init-from IMAGENET1K_V9: resnet18 has no weights named IMAGENET1K_V9; it has IMAGENET1K_V1 (and "
         "DEFAULT, the best of them).")),
        (train_main, ["--arch", "resnet18", "--init-from", str(tmp_path / "absent.pth")],
         (f"error: --init-from {tmp_path / 'absent.pth'} is neither a file, a URL nor the name of published weights "
         "(IMAGENET1K_V1, DEFAULT).")),
        (train_main, ["--arch", "resnet18_cifar", "--init-from", "IMAGENET1K_V1"],
         ("error: --init-from IMAGENET1K_V1: resnet18_cifar has no published weights; the architectures that have "
         "are alexnet, densenet121,")),
    ]
    for command, argv, message in cases:
        assert command(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err

    # Offline: the sentence names the URL and the cache path where a file downloaded by hand is picked up.
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    base = closed_port_url()
    monkeypatch.setenv(hub.MIRROR_ENV, base)
    name = hub.get_weights("resnet18", "IMAGENET1K_V1").file_name
    assert predict.main(["--arch", "resnet18", "--weights", "IMAGENET1K_V1", str(image)]) == 2
    # (After the line saying what is being downloaded where.)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot download {base}/{name} (the network or the server is unreachable); download it yourself and "
        f"put it at {tmp_path / 'cache' / name}, where flaxnets will pick it up.")
    for argv in (["--weights", "IMAGENET1K_V1", str(image)], ["--workdir", str(tmp_path), "--weights", "X", "y.png"]):
        with pytest.raises(SystemExit) as exit_:
            predict.main(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:  # ignored before: a checkpoint knows its architecture
        evaluate.main(["--workdir", str(tmp_path), "--arch", "resnet18"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: --arch goes with --weights;")


# One weight set of each preprocessing in the table: resize 256 / crop 224, 232 / 224, 342 / 299.
PREPROCESSING = [("resnet18", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2"), ("inception_v3", "IMAGENET1K_V1")]


@pytest.mark.parametrize(("arch", "name"), PREPROCESSING)
def test_weights_preprocess_is_torchvisions_transforms(arch, name):
    """`Weights.preprocess` gives, bit for bit, the tensors of torchvision's ``weights.transforms()`` (as NHWC),
    for one image or a list, Pillow or array; grey arrays are replicated to RGB as Pillow's convert does."""
    _, torchvision = torchvision_or_skip()
    weights = hub.get_weights(arch, name)
    theirs = torchvision.models.get_model_weights(flaxnets.get_spec(arch).torchvision)[name].transforms()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(301, 257, 3), (240, 500, 3)]]
    expected = np.stack([theirs(Image.fromarray(image)).numpy().transpose(1, 2, 0) for image in images])
    np.testing.assert_array_equal(weights.preprocess(images), expected)
    np.testing.assert_array_equal(weights.preprocess(Image.fromarray(images[0])), expected[:1])
    grey = images[1][..., 0]
    np.testing.assert_array_equal(weights.preprocess(grey),
                                  theirs(Image.fromarray(grey).convert("RGB")).numpy().transpose(1, 2, 0)[None])


def test_weights_preprocess_refuses_what_is_not_an_image():
    weights = hub.get_weights("resnet18", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="uint8 pixels"):
        weights.preprocess(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 2\)"):
        weights.preprocess(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        weights.preprocess([])


@pytest.mark.parametrize("shape", [(375, 500), (1000, 667), (481, 359), (257, 421), (299, 299)])
def test_evaluation_crop_is_torchvisions_pixel_for_pixel(shape):
    """Published accuracies come from torchvision's Resize(256) + CenterCrop(224) on PIL images: the longer
    side truncated and the crop offsets rounded as it does (1000x667 and 481x359 differ by a pixel otherwise)."""
    _, torchvision = torchvision_or_skip()
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    transforms = torchvision.transforms
    theirs = np.asarray(transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(Image.fromarray(image)))
    np.testing.assert_array_equal(center_crop(resize_shorter(image, 256), 224), theirs)


def test_variables_that_do_not_fit_are_named_by_their_first_odd_leaf(tmp_path):
    """`flaxnets.pretrained.misfit`: what save_pretrained, from_pretrained and a checkpoint's reader refuse."""
    from flaxnets.convert import StateDictMismatchError
    from flaxnets.pretrained import misfit
    from train.checkpoint import CheckpointError
    from train.inference import _check_fit

    model = flaxnets.create_model("lenet5_bn", num_classes=10)
    variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract_variables(model, (1, 28, 28, 1)))
    assert misfit(model, variables, (28, 28, 1)) is None
    wider = misfit(flaxnets.create_model("lenet5_bn", num_classes=12), variables, (28, 28, 1))
    assert wider.given[-1] == 10 and wider.expected[-1] == 12 and wider.path.startswith("params/")
    missing = {**variables, "batch_stats": {}}
    assert misfit(model, missing, (28, 28, 1)).given is None
    extra = {**variables, "params": {**variables["params"], "probe": {"kernel": np.zeros(3)}}}
    assert misfit(model, extra, (28, 28, 1)) == ("params/probe/kernel", (3,), None)
    with pytest.raises(StateDictMismatchError, match=r"lenet5_bn on 32x32x1 images: .* pass input_shape"):
        flaxnets.save_pretrained(tmp_path / "lenet", "lenet5_bn", variables, input_shape=(32, 32, 1))
    assert not (tmp_path / "lenet").exists()
    meta = {"arch": "lenet5_bn", "num_classes": 12, "image_side": 28, "dataset": {"image_shape": [28, 28, 1]},
            "config": {"model_args": {}}}
    with pytest.raises(CheckpointError, match=r"^checkpoint 7 holds variables that do not fit lenet5_bn: params/"):
        _check_fit(variables, meta, "checkpoint 7")


def test_save_pretrained_records_the_options_of_the_module_it_is_given(tmp_path):
    """Options that change no shape (LeNet-5's activation here; GoogLeNet's transform_input, which
    from_pretrained sets for torchvision's weights) are read off the module, or the folder would load as
    the default build and compute something else."""
    model = flaxnets.create_model("lenet5", activation="relu", num_classes=7)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    variables = jax.jit(lambda key: model.init(key, x, False))(jax.random.key(0))
    flaxnets.save_pretrained(tmp_path / "relu", "lenet5", variables, model=model)
    loaded, again = flaxnets.from_pretrained(tmp_path / "relu")
    assert (loaded.activation, loaded.num_classes) == ("relu", 7)
    np.testing.assert_array_equal(loaded.apply(again, x, False), model.apply(variables, x, False))
    with pytest.raises(ValueError, match="model is a LeNet5, but resnet18 builds a ResNet"):
        flaxnets.save_pretrained(tmp_path / "other", "resnet18", variables, model=model)
    with pytest.raises(FileNotFoundError, match="does not exist: from_pretrained reads a folder save_pretrained wrote"):
        flaxnets.from_pretrained(tmp_path / "nothere")
