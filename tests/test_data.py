"""Data sources, the streamed pipeline and the paper augmentations, on files the tests write themselves
(CIFAR batches and tarballs, folders of odd images) and on tensorflow-datasets' mock data."""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flaxnets
from train import loop
from train import step as steps
from train.config import Config, ConfigError
from train.data import (DataError, Dataset, Streamed, ensure_statistics, epoch_order, fit_in_memory, load_cifar,
                        load_dataset, load_digits, load_folder, load_idx, read_idx)
from train.data.memory import RECORDED_CHECKSUMS
from train.data.stats import pixel_statistics
from train.data.sources import TfdsSource
from train.data.geometry import crop_box, ten_crops
from train.data.stream import TrainTransform, eval_batches, train_batches
from train.feed import make_feed
from train.parallel import make_driver
from train.run import build_run

tfds = pytest.importorskip("tensorflow_datasets")


# -- CIFAR readers ---------------------------------------------------------------------------------------
def _cifar_arrays(count: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, count).astype(np.int32)


def _python_batch(images, labels, key) -> bytes:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # the format's channel planes
    return pickle.dumps({b"data": rows, key: [int(l) for l in labels]})


def _write_cifar10_python(folder, train, test) -> dict[str, bytes]:
    files = {f"data_batch_{i + 1}": _python_batch(train[0][i::5], train[1][i::5], b"labels") for i in range(5)}
    files["test_batch"] = _python_batch(*test, b"labels")
    files["batches.meta"] = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    os.makedirs(os.path.join(folder, "cifar-10-batches-py"))
    for name, raw in files.items():
        with open(os.path.join(folder, "cifar-10-batches-py", name), "wb") as handle:
            handle.write(raw)
    return files


def test_cifar10_python_batches_and_tarball_read_back_exactly(tmp_path):
    train, test = _cifar_arrays(50, 10, 0), _cifar_arrays(20, 10, 1)
    files = _write_cifar10_python(tmp_path / "extracted", train, test)
    data = load_cifar("cifar10", str(tmp_path / "extracted"), verify=False)
    # Batches were written as every fifth example starting at i; undo that interleaving.
    order = np.concatenate([np.arange(50)[i::5] for i in range(5)])
    np.testing.assert_array_equal(data.train_images, train[0][order])
    np.testing.assert_array_equal(data.train_labels, train[1][order])
    np.testing.assert_array_equal(data.test_images, test[0])
    assert data.class_names == tuple(f"c{i}" for i in range(10)) and data.crop_padding == 4 and data.flip

    tarball = tmp_path / "tar" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as archive:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    from_tar = load_cifar("cifar10", str(tarball.parent), verify=False)
    np.testing.assert_array_equal(from_tar.train_images, data.train_images)
    # The real tarball's published MD5 does not match these made-up files: a clear error, nothing loaded.
    with pytest.raises(DataError, match="MD5 published"):
        load_cifar("cifar10", str(tarball.parent))
    with pytest.raises(DataError, match="MD5 published for cifar10"):
        load_cifar("cifar10", str(tmp_path / "extracted"))


def test_cifar100_binary_batches_use_fine_labels_and_truncation_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    arrays = {}
    for name, count in (("train.bin", 30), ("test.bin", 10)):
        images, fine = _cifar_arrays(count, 100, count)
        coarse = rng.integers(0, 20, count).astype(np.uint8)
        rows = np.concatenate([coarse[:, None], fine.astype(np.uint8)[:, None],
                               images.transpose(0, 3, 1, 2).reshape(count, -1)], axis=1)
        (folder / name).write_bytes(rows.tobytes())
        arrays[name] = (images, fine)
    (folder / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)) + "\n")
    data = load_cifar("cifar100", str(tmp_path))
    np.testing.assert_array_equal(data.train_images, arrays["train.bin"][0])
    np.testing.assert_array_equal(data.train_labels, arrays["train.bin"][1])
    np.testing.assert_array_equal(data.test_labels, arrays["test.bin"][1])
    assert data.num_classes == 100 and data.class_names[7] == "f7"
    (folder / "test.bin").write_bytes((folder / "test.bin").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_cifar("cifar100", str(tmp_path))


# -- folders of images ----------------------------------------------------------------------------------
def _odd_images_folder(root) -> dict[str, str]:
    """Two classes of images in every awkward format, plus files that are not images at all."""
    rng = np.random.default_rng(3)
    made = {}

    def save(cls, name, image, **kwargs):
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        made[name] = str(path)

    for cls in ("cats", "dogs"):
        for i, size in enumerate(((40, 30), (25, 60), (33, 33))):
            save(cls, f"{cls}_rgb{i}.jpg", Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)))
        save(cls, f"{cls}_grey.png", Image.fromarray(rng.integers(0, 256, (20, 50), dtype=np.uint8)))
        rgba = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
        rgba[..., 3] = 0  # fully transparent: shows as white
        save(cls, f"{cls}_rgba.png", Image.fromarray(rgba, "RGBA"))
        save(cls, f"{cls}_cmyk.jpg", Image.fromarray(rng.integers(0, 256, (28, 36, 4), dtype=np.uint8), "CMYK"))
        save(cls, f"{cls}_palette.gif", Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P"))
        save(cls, f"{cls}_16bit.png", Image.fromarray(rng.integers(0, 65535, (24, 24)).astype(np.uint16)))
    (root / "cats" / "notes.jpg").write_text("not a picture")  # broken: a text file with an image name
    (root / "dogs" / "empty.png").write_bytes(b"")
    (root / "dogs" / "readme.txt").write_text("ignored: not an image extension")
    return made


def test_folder_source_reads_every_mode_and_skips_broken_files_by_name(tmp_path, capfd):
    made = _odd_images_folder(tmp_path)
    data = load_folder(str(tmp_path))
    err = capfd.readouterr().err
    assert "notes.jpg" in err and "empty.png" in err and "readme" not in err
    assert data.class_names == ("cats", "dogs")
    assert data.train_size + data.test_size == len(made) == 16 and data.test_size == 2  # one per class held out
    for i in range(data.train_size):
        image, label = data.train[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 and label in (0, 1)
    from train.data.sources import decode_image

    assert (decode_image(made["cats_rgba.png"]) == 255).all()  # transparent over white
    grey = decode_image(made["cats_16bit.png"])
    assert grey.shape == (24, 24, 3) and grey.max() > 128  # 16-bit scaled to 8, not clipped to white
    # In memory at a chosen side: every image resized and centre-cropped.
    memory = fit_in_memory(data, 24, "memory")
    assert isinstance(memory, Dataset) and memory.train_images.shape == (data.train_size, 24, 24, 3)
    assert len(memory.mean) == 3 and len(memory.eigval) == 3
    # Streamed, its statistics are stored beside the images; that folder is not a class on the next load.
    with_stats = ensure_statistics(data, str(tmp_path))
    assert os.path.exists(tmp_path / "flaxnets-stats" / "folder.json") and len(with_stats.eigvec) == 3
    assert load_folder(str(tmp_path)).class_names == ("cats", "dogs")


def test_a_folder_follows_linked_sub_folders_and_a_dark_16_bit_image_stays_dark(tmp_path):
    """As torchvision's ImageFolder lists it: a class's linked sub-folder is part of the class. A 16-bit
    image is scaled from 65535 however dark it is (a maximum of 200 is 0 in 8 bits, not 200)."""
    from train.data.sources import decode_image, scan_folder

    _class_folders(tmp_path / "data")
    _class_folders(tmp_path / "elsewhere", classes=("more",), per_class=2)
    (tmp_path / "data" / "a" / "linked").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    paths, labels, classes, broken = scan_folder(str(tmp_path / "data"))
    assert classes == ("a", "b") and not broken
    assert sorted(os.path.relpath(p, tmp_path / "data") for p, label in zip(paths, labels) if label == 0) == [
        *(f"a/{i}.png" for i in range(5)), "a/linked/0.png", "a/linked/1.png"]
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark.png")
    assert Image.open(tmp_path / "dark.png").mode == "I;16" and decode_image(str(tmp_path / "dark.png")).max() == 0


def test_folder_with_train_and_val_and_a_file_truncated_after_its_header(tmp_path, capfd):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.random.default_rng(i).integers(0, 256, (120, 120, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    truncated = tmp_path / "train" / "a" / "1.jpg"
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])  # the header survives, half the pixels do not
    data = load_folder(str(tmp_path))
    assert (data.train_size, data.test_size) == (4, 4)  # a JPEG's header check cannot see the cut
    with pytest.warns(UserWarning, match="1.jpg"):
        images = [data.train[i][0] for i in range(data.train_size)]
    assert all(image.shape == (120, 120, 3) for image in images)


# -- validation splits ------------------------------------------------------------------------------------
def test_stratified_holdout_takes_each_class_share_with_a_fixed_seed():
    from train.data import stratified_holdout

    labels = np.repeat(np.arange(4), [100, 50, 10, 1])  # and one class with a single example
    held = stratified_holdout(labels, 0.2, seed=3)
    assert [int((labels[held] == c).sum()) for c in range(4)] == [20, 10, 2, 0]
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.2, seed=3))  # every process, every resume
    assert not np.array_equal(held, stratified_holdout(labels, 0.2, seed=4))
    assert np.all(np.diff(held) > 0)


def test_a_fraction_of_digits_is_held_out_for_validation_and_statistics_exclude_it():
    from train.data import load_digits, with_statistics

    whole = with_statistics(load_digits())
    data = load_dataset("digits", val_split="0.2", seed=0)
    held = sum(round(0.2 * n) for n in np.bincount(whole.train_labels))  # a fifth of each digit, rounded
    assert data.val_size == held == 287 and data.train_size == 1437 - held and data.test_size == 360
    assert "0.2 of the training split" in data.val_from and data.describe()["val_examples"] == held
    together = np.concatenate([data.train_images, data.val_images]).reshape(1437, -1)
    assert len(np.unique(together, axis=0)) == len(np.unique(whole.train_images.reshape(1437, -1), axis=0))
    assert data.mean != whole.mean  # computed on the images left to train on
    assert np.bincount(data.val_labels).min() >= 28  # about a fifth of every digit's ~144 images


@pytest.mark.parametrize("value, message", [("1.5", "strictly between 0 and 1"), ("0", "strictly between 0 and 1"),
                                            ("val/x", "fraction such as 0.1 or a split name"),
                                            ("validation", "only a train and a test split")])
def test_bad_validation_splits_are_one_sentence(value, message):
    with pytest.raises(DataError, match=message):
        load_dataset("digits", val_split=value)


def test_digits_refuses_a_data_dir_it_would_ignore(tmp_path):
    with pytest.raises(DataError, match="ships with the install and reads no files"):
        load_dataset("digits", str(tmp_path))


def _class_folders(root, classes=("a", "b"), per_class=5, size=(20, 20)):
    for cls in classes:
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(i).integers(0, 256, size + (3,), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_a_folder_read_into_memory_is_predicted_on_the_crops_it_was_scored_on(tmp_path):
    """Images of varying size held in memory are their shorter side resized and centre-cropped: prediction
    prepares a file the same way (the run's checkpoint records the resize), not squashed whole."""
    from train.inference import file_resize, read_images

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i, size in enumerate(((40, 90), (70, 33))):
                pixels = np.random.default_rng(i).integers(0, 256, size + (3,), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = fit_in_memory(load_folder(str(tmp_path)), side=24, pipeline="memory")
    assert data.cropped_to == 24 and data.describe()["image_shape"] == [24, 24, 3]
    files = [str(tmp_path / "test" / "a" / f"{i}.png") for i in range(2)]
    got = read_images(files, (24, 24, 3), side=24, resize=data.cropped_to)
    np.testing.assert_array_equal(got, data.test_images[:2])
    assert not np.array_equal(read_images(files, (24, 24, 3), side=24), got)  # squashed whole: what it was
    # A folder run saved before its checkpoints recorded the resize is read the same way; fixed-size data whole.
    folder_meta = {"config": {"dataset": "folder"}, "dataset": {"image_shape": [24, 24, 3]}, "image_side": 24}
    assert file_resize(folder_meta) == 24 and file_resize({**folder_meta, "resize": 20}) == 20
    assert file_resize({"config": {"dataset": "digits"}, "dataset": {"image_shape": [8, 8, 1]}, "image_side": 16}) is None


def test_a_folder_with_one_class_is_refused(tmp_path):
    _class_folders(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="at least two classes"):
        load_folder(str(tmp_path))


def test_folder_validation_by_fraction_and_by_its_own_split(tmp_path):
    _class_folders(tmp_path / "plain", per_class=10)
    data = load_dataset("folder", str(tmp_path / "plain"), val_split="0.25")
    # 10% of each class is the test split, then a quarter of the rest validates.
    assert (data.train_size, data.val_size, data.test_size) == (14, 4, 2)
    assert sorted(int(data.val[i][1]) for i in range(data.val_size)) == [0, 0, 1, 1]
    memory = fit_in_memory(data, 16, "memory")
    assert memory.val_images.shape == (4, 16, 16, 3) and memory.val_from == data.val_from
    for split in ("train", "val", "test"):
        _class_folders(tmp_path / "splits" / split, per_class={"train": 6, "val": 3, "test": 2}[split])
    named = load_dataset("folder", str(tmp_path / "splits"), val_split="val")
    assert (named.train_size, named.val_size, named.test_size) == (12, 6, 4)
    assert named.test_split == "test" and "val/" in named.val_from
    with pytest.raises(DataError, match="no train/ and validation/"):
        load_dataset("folder", str(tmp_path / "splits"), val_split="validation")


def test_tfds_validation_split_by_name_and_by_stratified_fraction(tfds_home):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        # (Mocked tensorflow-datasets serves any split name, so a missing split cannot be shown here.)
        named = load_dataset("imagenette", val_split="validation")
        assert (named.val_size, named.test_split) == (40, "test") and "'validation' split" in named.val_from
        fraction = load_dataset("cifar10", val_split="0.25")
        labels = np.load(tfds_home / "tfds" / "flaxnets-stats" / "cifar10-train-labels.npy")
        held = sum(min(max(1, round(0.25 * n)), n - 1) for n in np.bincount(labels) if n >= 2)
        assert (fraction.train_size, fraction.val_size) == (40 - held, held) and held > 0
        assert len(labels) == 40  # read once, without decoding images, and kept for the next run


def test_an_unlabelled_tfds_split_is_never_the_test_split(tfds_home, monkeypatch):
    # tensorflow-datasets labels every example of ImageNet's test split -1; mocked data labels every split
    # and serves any split name, so "val" is made unlabelled too.
    pair = TfdsSource._pair
    monkeypatch.setattr(TfdsSource, "_pair", lambda self, record: (
        pair(self, record)[0], -1 if self.split in ("test", "val") else pair(self, record)[1]))
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        assert load_dataset("imagenet2012").test_split == "validation"
        with pytest.raises(DataError, match=r"no labelled test or validation split other than 'validation' to "
                                            r"evaluate on \(unlabelled: test, val\); hold out a fraction"):
            load_dataset("imagenet2012", val_split="validation")


def test_recorded_checksums_are_tensorflow_datasets_own():
    """The table that checks the original files without tensorflow-datasets holds its records exactly."""
    folder = os.path.join(os.path.dirname(tfds.__file__), "url_checksums")
    for name, table in RECORDED_CHECKSUMS.items():
        with open(os.path.join(folder, f"{name}.txt")) as handle:
            records = {fields[3]: (int(fields[1]), fields[2]) for fields in (line.rstrip("\n").split("\t")
                                                                             for line in handle) if len(fields) > 3}
        assert {file: records[file] for file in table} == table


# -- tensorflow-datasets, mocked ----------------------------------------------------------------------------
def test_unknown_and_unprepared_tfds_names_are_one_sentence(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # where tensorflow-datasets makes (and leaves) a folder per unprepared builder
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(DataError, match="Did you mean cifar10"):
        load_dataset("cifar1O")
    with pytest.raises(DataError, match="not prepared .*python -m train.data prepare imagenette"):
        load_dataset("imagenette", str(tmp_path / "data"))
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("name,shape,classes", [("cifar10", (32, 32, 3), 10), ("fashion_mnist", (28, 28, 1), 10)])
def test_mock_tfds_datasets_that_fit_are_held_in_memory(name, shape, classes):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        run = build_run(Config(arch="lenet5_relu", dataset=name, batch_size=8).validate())
    assert isinstance(run.data, Dataset) and run.data.image_shape == shape and run.data.num_classes == classes
    assert run.data.train_images.shape == (40,) + shape and run.preprocess.crop_padding > 0
    assert len(run.data.class_names) == classes and run.steps_per_epoch == 5


@pytest.fixture()
def tfds_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    return tmp_path


def test_mock_imagenet_streams_through_the_trainer_with_the_paper_augmentations(tfds_home):
    """imagenet2012's images vary in size: streamed, AlexNet-style crops, PCA lighting, ten-crop eval."""
    config = Config(arch="lenet5_relu", dataset="imagenet2012", epochs=1, batch_size=16, eval_batch_size=16,
                    image_size=24, workdir=str(tfds_home / "run"), plots=False, workers=0, crop="alexnet", pipeline="stream",
                    lighting=0.1, ten_crop=True, warmup_epochs=0.5, log_every_steps=1)
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        out = io.StringIO()
        results = loop.train_and_evaluate(config, stream=out)
    assert results["traces"] == {"train": 1, "eval": 1}
    assert np.isfinite(results["train_loss"]) and 0 <= results["test_top1"] <= 1
    assert os.path.exists(tfds_home / "tfds" / "flaxnets-stats" / "imagenet2012.json")
    assert "24x24x3 input" in out.getvalue() and "1 steps per epoch" not in out.getvalue()


# -- the streamed pipeline ------------------------------------------------------------------------------
class _ArraySource:
    """Images of varying sizes whose pixels encode their index, as a random-access source."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        h, w = 30 + index % 7, 26 + index % 5
        return np.full((h, w, 3), index % 256, np.uint8), index % 3


def _streamed(count=40) -> Streamed:
    source = _ArraySource(count)
    return Streamed("toy", source, _ArraySource(10), ("a", "b", "c"), (None, None, 3), mean=(0.5,) * 3,
                    std=(0.25,) * 3)


def test_resuming_mid_epoch_reads_exactly_the_batches_an_uninterrupted_run_reads():
    data = _streamed()
    kwargs = dict(side=16, seed=5, epoch=3, steps=5, batch=8, workers=0)
    whole = list(train_batches(data, start=0, **kwargs))
    resumed = list(train_batches(data, start=2, **kwargs))
    assert len(whole) == 5 and len(resumed) == 3
    for a, b in zip(whole[2:], resumed):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])
    order = epoch_order(5, 3, 40)[:40]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in whole]), order)
    # Each process reads its own rows of every global batch; together they are the global batch.
    halves = [list(train_batches(data, start=0, process_index=p, process_count=2, **kwargs)) for p in (0, 1)]
    for k in range(5):
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["index"], halves[1][k]["index"]]),
                                      whole[k]["index"])


def test_eval_batches_pad_the_last_batch_and_mask_it():
    batches = list(eval_batches(_streamed(), side=16, batch=4, workers=0))
    masks = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 3 and masks.sum() == 10 and not masks[10:].any()
    ten = next(eval_batches(_streamed(), side=16, batch=4, ten_crop=True, workers=0))
    assert ten["image"].shape == (4, 10, 16, 16, 3)


def test_host_crops_stay_inside_the_image_and_flip_is_an_involution():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (0.1, 0.2))):  # the latter: the fallback
        for _ in range(20):
            top, left, height, width = crop_box(37, 53, rng, scale, ratio)
            assert 0 <= top <= top + height <= 37 and 0 <= left <= left + width <= 53 and height * width > 0
    crops = ten_crops(image, 20)  # margins 17 and 33: the centre's offsets round as torchvision's (8 and 16)
    assert crops.shape == (10, 20, 20, 3)
    np.testing.assert_array_equal(crops[0], image[:20, :20])
    np.testing.assert_array_equal(crops[4], image[8:28, 16:36])
    # TenCrop's second five are those of the mirrored image: its left corners are the right ones mirrored.
    for mirrored, original in ((5, 1), (6, 0), (7, 3), (8, 2)):
        np.testing.assert_array_equal(crops[mirrored], crops[original][:, ::-1])
    np.testing.assert_array_equal(crops[9], image[:, ::-1][8:28, 16:36])  # not the original centre mirrored
    source = _ArraySource(10)
    for crop in ("inception", "alexnet"):
        transform = TrainTransform(source, 16, seed=0, epoch=0, crop=crop)
        assert transform(3)["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(transform(3)["image"], transform(3)["image"])  # a pure function


def test_device_flip_is_an_involution_and_padding_crop_keeps_shape():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, 12, 12, 1), dtype=np.uint8))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(64))
    flip = steps.Preprocess(mean=(0.0,), std=(1.0,), size=12, flip=True)
    once = flip(images, keys, train=True)
    twice = flip((once * 255).round().astype(jnp.uint8), keys, train=True)
    np.testing.assert_allclose(twice, images / 255.0, atol=1e-6)
    flipped = np.asarray([not np.allclose(once[i], images[i] / 255.0) for i in range(64)])
    assert 16 < flipped.sum() < 48  # about half
    crop = steps.Preprocess(mean=(0.0,), std=(1.0,), size=12, crop_padding=3)
    assert crop(images, keys, train=True).shape == images.shape


def test_pca_lighting_noise_has_the_stated_covariance():
    """alpha ~ N(0, s) per component: the noise's covariance is V diag((s * lambda)^2) V^T."""
    rng = np.random.default_rng(4)
    pixels = (rng.normal(size=(4000, 3)) @ np.array([[1.0, 0.5, 0.2], [0.0, 0.8, 0.3], [0.0, 0.0, 0.4]]) * 40 + 120)
    stats = pixel_statistics(np.clip(pixels, 0, 255).astype(np.uint8).reshape(40, 10, 10, 3))
    eigvec, eigval = np.asarray(stats["eigvec"]), np.asarray(stats["eigval"])
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    assert np.all(np.diff(eigval) <= 0)
    preprocess = steps.Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, size=4, lighting=0.1, **{
        k: stats[k] for k in ("eigval", "eigvec")})
    keys = jax.random.split(jax.random.key(1), 20000)
    noise = np.asarray(jax.vmap(preprocess.colour_noise)(keys))
    expected = eigvec @ np.diag((0.1 * eigval) ** 2) @ eigvec.T
    np.testing.assert_allclose(np.cov(noise.T), expected, rtol=0.05, atol=1e-3 * expected.max())
    np.testing.assert_allclose(noise.mean(axis=0), 0, atol=4 * np.sqrt(expected.diagonal().max() / 20000))


def test_pixel_statistics_match_numpy():
    images = np.random.default_rng(5).integers(0, 256, (30, 7, 9, 3), dtype=np.uint8)
    stats = pixel_statistics(images, chunk=7)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(0), atol=1e-9)
    np.testing.assert_allclose(sorted(stats["eigval"]), np.linalg.eigvalsh(np.cov(pixels.T, bias=True)), atol=1e-12)


def test_host_batches_on_8_devices_train_as_the_device_resident_data_does():
    """The streamed step (examples placed by the host) equals the in-memory one (indices gathered on device)."""
    data = load_dataset("digits")
    run = build_run(Config(arch="lenet5_relu", batch_size=32, image_size=16).validate(), data=data)
    driver = make_driver("shard_map", steps.bind(steps.train_step, model=run.model, tx=run.tx,
                                                 preprocess=run.preprocess, num_classes=10),
                         steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess, num_classes=10))
    feed = make_feed(run, driver)
    state = driver.put_replicated(run.init_state())
    indices = epoch_order(0, 0, data.train_size)[:32]
    a, metrics_a = driver.train(state, feed.train_data, driver.put_indices(indices))
    b, metrics_b = driver.train_batch(driver.put_replicated(run.init_state()), driver.put_batch(
        {"image": data.train_images[indices], "label": data.train_labels[indices], "index": indices}))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    assert float(metrics_a["loss_sum"]) == float(metrics_b["loss_sum"])


def _scoring_lenet(seed: int):
    """A four-class LeNet-5 on 12x12 grey images: model, preprocessing, variables and a state to score with."""
    model = flaxnets.create_model("lenet5_relu", num_classes=4)
    preprocess = steps.Preprocess(mean=(0.5,), std=(0.5,), size=12)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 12, 12, 1)), train=False)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={}, opt_state=None,
                             rng=jnp.zeros((2,), jnp.uint32))
    return model, preprocess, variables, state


def test_ten_crop_evaluation_averages_the_softmax_of_the_views():
    model, preprocess, variables, state = _scoring_lenet(0)
    views = jnp.asarray(np.random.default_rng(6).integers(0, 256, (3, 10, 12, 12, 1), dtype=np.uint8))
    labels = jnp.asarray([0, 1, 2])
    metrics = steps.eval_step(state, {"image": views, "label": labels, "mask": jnp.ones(3, bool)}, model=model,
                              preprocess=preprocess, num_classes=4)
    logits = model.apply(variables, preprocess(views.reshape(30, 12, 12, 1), None, train=False), train=False)
    probabilities = jax.nn.softmax(logits).reshape(3, 10, 4).mean(1)
    expected = -np.log(np.asarray(probabilities)[np.arange(3), np.asarray(labels)]).sum()
    np.testing.assert_allclose(float(metrics["loss_sum"]), expected, rtol=1e-5)
    assert float(metrics["correct"]) == float((probabilities.argmax(-1) == labels).sum())


def test_flip_evaluation_averages_each_image_with_its_mirror_and_counts_one_view():
    model, preprocess, variables, state = _scoring_lenet(1)
    images = jnp.asarray(np.random.default_rng(7).integers(0, 256, (16, 12, 12, 1), dtype=np.uint8))
    labels = jnp.asarray(np.arange(16) % 4)
    mask = jnp.ones(16, bool).at[-1].set(False)

    @functools.partial(jax.jit, static_argnums=1)
    def scored(batch_images, flip):
        return steps.eval_step(state, {"image": batch_images, "label": labels, "mask": mask}, model=model,
                               preprocess=preprocess, num_classes=4, flip=flip)

    @jax.jit
    def softmax(x):
        return jax.nn.softmax(model.apply(variables, preprocess(x, None, train=False), train=False))

    both, one = scored(images, True), scored(images, False)
    probabilities = np.asarray((softmax(images) + softmax(images[:, :, ::-1])) / 2)
    kept = np.asarray(mask)
    expected = -np.log(probabilities[np.arange(16), np.asarray(labels)])[kept].sum()
    np.testing.assert_allclose(float(both["loss_sum"]), expected, rtol=1e-5)
    assert float(both["correct"]) == float(((probabilities.argmax(-1) == np.asarray(labels)) & kept).sum())
    assert float(both["correct_one_view"]) == float(one["correct"]) and "correct_one_view" not in one
    mirrored = scored(images[:, :, ::-1], True)  # the same two views, in the other order
    np.testing.assert_allclose(float(mirrored["loss_sum"]), float(both["loss_sum"]), rtol=1e-5)
    with pytest.raises(ValueError, match="two views"):
        scored(images[:, None], True)


def test_flip_evaluation_is_refused_where_mirrors_change_labels_or_ten_crop_has_them():
    with pytest.raises(ConfigError, match="whose labels in digits would not be the same"):
        build_run(Config(eval_flip=True).validate(), data=load_dataset("digits"))
    with pytest.raises(ConfigError, match="drop --eval-flip"):
        Config(eval_flip=True, ten_crop=True).validate()


def test_ten_crop_on_in_memory_data_and_bad_pipeline_settings_are_refused():
    data = load_dataset("digits")
    with pytest.raises(ConfigError, match="--ten-crop applies to streamed"):
        build_run(Config(ten_crop=True).validate(), data=data)
    with pytest.raises(DataError, match="--pipeline stream applies"):
        build_run(Config(pipeline="stream").validate(), data=data)
    with pytest.raises(ConfigError, match="--workers"):
        Config(workers=-1).validate()


def test_prepare_without_tensorflow_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on a machine without the extra: import fails
    from train.data.__main__ import main

    assert main(["prepare", "fashion_mnist"]) == 2
    assert 'pip install -e ".[prepare]"' in capsys.readouterr().err


def test_worker_processes_produce_the_batches_the_main_process_does(tmp_path):
    """Grain's worker processes (spawned, so they import the source afresh) give the same batches."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            pixels = np.random.default_rng([ord(cls), i]).integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    data = load_folder(str(tmp_path), holdout=0.2)
    kwargs = dict(side=12, seed=1, epoch=0, start=0, steps=2, batch=4)
    inline = list(train_batches(data, workers=0, **kwargs))
    spawned = list(train_batches(data, workers=1, **kwargs))
    assert len(spawned) == 2
    for a, b in zip(inline, spawned):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])


# -- the original MNIST files and the bundled digits -------------------------------------------------
def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    files = {"train-images-idx3-ubyte.gz": (images, 2051), "train-labels-idx1-ubyte.gz": (labels, 2049),
             "t10k-images-idx3-ubyte.gz": (images[:3], 2051), "t10k-labels-idx1-ubyte.gz": (labels[:3], 2049)}
    for name, (array, magic) in files.items():
        _write_idx(tmp_path / name, array, magic)
    data = load_idx("mnist", str(tmp_path), verify=False)
    np.testing.assert_array_equal(data.train_images[..., 0], images)
    np.testing.assert_array_equal(data.test_labels, labels[:3])
    # The checksums tensorflow-datasets records reject these files (they are not MNIST's).
    with pytest.raises(DataError, match="bytes|sha256"):
        load_idx("mnist", str(tmp_path))
    with pytest.raises(DataError, match="magic"):
        read_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), 2051)
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "short.gz"), 2051)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()[:200])
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "cut.gz"), 2051)


def test_digits_split_is_fixed_stratified_and_disjoint():
    data = load_digits()
    assert data.train_images.shape == (1437, 8, 8, 1) and data.test_images.shape == (360, 8, 8, 1)
    assert np.bincount(data.test_labels).tolist() == [36] * 10
    train_rows = {row.tobytes() for row in data.train_images}
    # A few digits repeat pixel-for-pixel in the UCI set; the split itself must not reuse rows.
    assert len(load_digits().test_labels) == 360
    np.testing.assert_array_equal(load_digits().test_images, data.test_images)
    assert len(train_rows) > 1400


def test_dataset_statistics_are_computed():
    data = load_dataset("digits")
    pixels = data.train_images.astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean()) and data.std[0] == pytest.approx(pixels.std())


# -- config ---------------------------------------------------------------------------------------------------------
