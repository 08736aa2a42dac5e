"""Feeding streamed JPEGs fast: decoding straight to the crop at reduced size (`train.data.jpeg`), the resized
copy in ArrayRecord files (`train.data.resized`, ``python -m train.data prepare folder``) and the pipeline's
benchmarks, on small images the tests write themselves."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks import input_pipeline, stream_train
from train.data import DataError, jpeg, load_folder, load_split, resized
from train.data.__main__ import main as data_main
from train.data.sources import FolderSource
from train.data.geometry import crop_box
from train.data.stream import TrainTransform, eval_batches, read_ahead_batches, train_batches
from train.feed import StreamFeed

pytest.importorskip("array_record")
BACKENDS = ["pillow", pytest.param("opencv", marks=pytest.mark.skipif(
    not jpeg.importlib.util.find_spec("cv2"), reason="OpenCV is not installed (pip install opencv-python-headless)"))]


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth scene with a little noise, as a photo is at the scales the tests crop it to."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [sum(rng.uniform(20, 60) * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)
                                                 + rng.uniform(0, 6)) for _ in range(3)) for _ in range(3)]
    pixels = 128 + np.stack(channels, -1) + rng.normal(0, 2, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, path=None, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, **options)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out.getvalue())
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Twelve JPEGs from 90x120 to 640x880 in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    sizes = [(90, 120), (240, 180), (480, 640), (640, 880), (300, 400), (512, 384)] * 2
    for i, (h, w) in enumerate(sizes):
        _jpeg(_photo(h, w, i), root / ("a" if i % 2 else "b") / f"{i:02d}.jpg")
    return root


def _source(root) -> FolderSource:
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    return FolderSource(paths, [0] * len(paths))


# -- decoding straight to the crop ----------------------------------------------------------------------------
def test_header_size_and_dct_scale():
    data = _jpeg(_photo(50, 70, 0))
    assert jpeg.jpeg_shape(data) == (50, 70)
    assert jpeg.jpeg_shape(data + b"trailing bytes") is None  # not ending in its end marker: the exact path
    assert jpeg.jpeg_shape(data[:len(data) // 2]) is None  # cut short
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert jpeg.jpeg_shape(cmyk.getvalue()) is None and jpeg.jpeg_shape(png.getvalue()) is None
    assert [jpeg.dct_scale(jpeg.Crop(0, 0, h, w, 64, 64)) for h, w in ((64, 64), (127, 500), (128, 130), (300, 256),
                                                                         (512, 600), (40, 40))] == [1, 1, 2, 4, 8, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_decoding_is_the_full_size_crop_up_to_resampling(photos, backend, monkeypatch):
    """Same crop box and flip as decoding the whole image (a pure function of seed, epoch and index), pixels
    within a small mean difference; at scale 1 Pillow's are bitwise those of the whole-image path."""
    source = _source(photos)
    scales, differences, means = [], [], []
    for side in (48, 96):
        reduced = TrainTransform(source, side, seed=3, epoch=1, decoder=backend)
        whole = TrainTransform(source, side, seed=3, epoch=1, decoder=None)
        for index in range(len(source)):
            for epoch in (1, 2):
                reduced.epoch = whole.epoch = epoch
                rng = np.random.default_rng([3, epoch, index, 7])
                with Image.open(source.paths[index]) as image:
                    top, left, h, w = crop_box(image.height, image.width, rng)
                scale = jpeg.dct_scale(jpeg.Crop(top, left, h, w, side, side))
                fast, exact = reduced(index)["image"], whole(index)["image"]
                np.testing.assert_array_equal(fast, reduced(index)["image"])  # a pure function: resumes exactly
                difference = np.abs(fast.astype(int) - exact).mean()
                scales.append(scale)
                differences.append(difference)
                means.append((fast.mean(), exact.mean()))
                if scale == 1 and backend == "pillow":
                    np.testing.assert_array_equal(fast, exact)
    scales, differences = np.asarray(scales), np.asarray(differences)
    assert {1, 2, 4, 8} <= set(scales.tolist())  # every reduction was exercised
    # Resampling differences only: a mirrored or shifted crop would differ by tens of levels.
    assert differences[scales > 1].mean() < 1.5 and differences.max() < 4
    means = np.asarray(means)
    np.testing.assert_allclose(means[:, 0], means[:, 1], atol=1.5)


@pytest.mark.skipif(not jpeg.importlib.util.find_spec("cv2"), reason="OpenCV is not installed")
@pytest.mark.parametrize("out", [(120, 160), (92, 123), (63, 84), (40, 100), (150, 200)],
                         ids=["same size", "shrink 1.3", "shrink 1.9", "shrink rows 3, columns 1.6", "enlarge"])
def test_opencv_resamples_a_full_size_crop_close_to_pillow(out):
    """OpenCV's resize (a Gaussian, then bilinear) against Pillow's antialiased bilinear one (torchvision's)
    at scale 1, where both decode the same pixels: a crop of its own size is those pixels."""
    data = _jpeg(_photo(160, 200, 3))
    crop = jpeg.Crop(20, 30, 120, 160, *out)
    assert jpeg.dct_scale(crop) == 1
    fast, exact = jpeg.decode_crop(data, crop, "opencv"), jpeg.decode_crop(data, crop, "pillow")
    assert fast.shape == exact.shape == (*out, 3)
    if out == (120, 160):
        np.testing.assert_array_equal(fast, exact)
    assert np.abs(fast.astype(int) - exact).mean() < 0.4


def test_mirror_is_numpys_flip_for_every_layout():
    from train.data.geometry import mirror

    image = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    for x in (image, image[..., 0], image[1:7, 2:11], image[..., :1], image.astype(np.float32), image[::2]):
        got = mirror(x)
        np.testing.assert_array_equal(got, x[:, ::-1])
        assert got.flags.c_contiguous and got.dtype == x.dtype and got.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_grey_cmyk_png_and_damaged_files_decode_as_the_whole_image_path_does(tmp_path, backend):
    pixels = _photo(60, 80, 5)
    _jpeg(pixels[..., 0], tmp_path / "a" / "grey.jpg")
    cmyk = Image.fromarray(pixels).convert("CMYK")
    cmyk.save(tmp_path / "a" / "cmyk.jpg", format="JPEG")
    Image.fromarray(pixels).save(tmp_path / "a" / "plain.png")
    whole = _jpeg(pixels, tmp_path / "a" / "whole.jpg")
    (tmp_path / "a" / "cut.jpg").write_bytes(whole[:len(whole) // 2])  # header intact, data cut short
    paths = sorted(str(p) for p in (tmp_path / "a").iterdir())
    source = FolderSource(paths, [0] * len(paths))
    fast = TrainTransform(source, 24, seed=0, epoch=0, decoder=backend)
    exact = TrainTransform(source, 24, seed=0, epoch=0, decoder=None)
    for index, path in enumerate(paths):
        damaged = pytest.warns(UserWarning, match="cut.jpg") if "cut" in path else contextlib.nullcontext()
        with damaged:
            got = fast(index)["image"]
        with pytest.warns(UserWarning, match="cut.jpg") if "cut" in path else contextlib.nullcontext():
            want = exact(index)["image"]
        if backend == "pillow" or not path.endswith(("grey.jpg", "whole.jpg")):  # OpenCV resamples its own way
            np.testing.assert_array_equal(got, want, err_msg=path)
        else:
            assert np.abs(got.astype(int) - want).mean() < 3, path


def test_decoder_names_resolve_and_a_missing_opencv_is_one_sentence(monkeypatch):
    present = jpeg.importlib.util.find_spec("cv2") is not None
    assert jpeg.resolve_backend("auto") == ("opencv" if present else "pillow")
    assert jpeg.resolve_backend("pillow") == "pillow"
    monkeypatch.setattr(jpeg.importlib.util, "find_spec", lambda name: None)
    assert jpeg.resolve_backend("auto") == "pillow"
    with pytest.raises(DataError, match="pip install opencv-python-headless"):
        jpeg.resolve_backend("opencv")


# -- one pipeline for many epochs ---------------------------------------------------------------------------
def test_one_pipeline_over_several_epochs_gives_each_epochs_batches_and_the_feed_keeps_it(photos):
    data = load_folder(str(photos), holdout=0.2)
    kwargs = dict(side=16, seed=2, steps=2, batch=4, workers=0, decoder="pillow")
    for process in (0, 1):
        shares = dict(process_index=process, process_count=2)
        run = list(train_batches(data, epoch=1, start=1, epochs=4, **kwargs, **shares))
        alone = [batch for epoch, start in ((1, 1), (2, 0), (3, 0))
                 for batch in train_batches(data, epoch=epoch, start=start, **kwargs, **shares)]
        assert len(run) == len(alone) == 5
        for a, b in zip(run, alone):
            np.testing.assert_array_equal(a["index"], b["index"])
            np.testing.assert_array_equal(a["image"], b["image"])

    class Driver:  # the host batches as they are
        put_batch = staticmethod(lambda batch: batch)

    feed = StreamFeed(Driver(), data, seed=2, batch_size=4, steps_per_epoch=2, eval_batch_size=4, side=16,
                      crop="inception", workers=0, ten_crop=False, decoder="pillow", epochs=3)
    first = list(feed.batches(0, 0))
    stream = feed._stream
    second = list(feed.batches(1, 0))
    assert feed._stream is stream  # the same workers went on into the next epoch
    np.testing.assert_array_equal(second[1]["image"], list(train_batches(data, epoch=1, start=0, **kwargs))[1]["image"])
    next(iter(feed.batches(2, 0)))  # an epoch left unfinished: asking for it again starts a new pipeline
    again = list(feed.batches(2, 0))
    assert feed._stream is not stream and len(again) == 2 and len(first) == 2


# -- the resized copy -------------------------------------------------------------------------------------------
def _image_folder(root):
    """train/ and val/ splits of two classes: large JPEGs, one small enough to keep, a PNG, a broken file."""
    for split, count in (("train", 4), ("val", 2)):
        for label in ("cat", "dog"):
            for i in range(count):
                _jpeg(_photo(300 + 20 * i, 400, hash((split, label, i)) % 1000), root / split / label / f"{i}.jpg")
    _jpeg(_photo(100, 120, 7), root / "train" / "cat" / "small.jpg")
    Image.fromarray(_photo(280, 300, 8)).save(root / "train" / "dog" / "drawing.png")
    (root / "train" / "dog" / "broken.jpg").write_bytes(_jpeg(_photo(300, 300, 9))[:300])
    return root


def test_prepare_folder_writes_a_resized_copy_that_trains_and_evaluates_like_the_images(tmp_path, capsys):
    source, copy = _image_folder(tmp_path / "images"), tmp_path / "copy"
    assert data_main(["prepare", "folder", "--data-dir", str(source), "--output", str(copy), "--shorter-side", "128",
                      "--quality", "92", "--workers", "1"]) == 0
    assert "train on it with python -m train --dataset folder --data-dir" in capsys.readouterr().out
    index = json.loads((copy / resized.INDEX).read_text())
    assert index["classes"] == ["cat", "dog"] and index["shorter_side"] == 128 and index["quality"] == 92
    assert index["splits"]["train"]["per_class"] == [5, 5] and index["splits"]["val"]["per_class"] == [2, 2]
    assert index["skipped"] == [os.path.join("train", "dog", "broken.jpg")]
    assert (index["kept"], index["resized"], index["re-encoded"]) == (1, 13, 0)
    original, prepared = load_folder(str(source)), load_folder(str(copy))
    assert prepared.class_names == original.class_names and prepared.test_split == "val"
    assert (prepared.train_size, prepared.test_size) == (10, 4)
    np.testing.assert_array_equal(prepared.train.labels(), [0] * 5 + [1] * 5)
    pairs = [prepared.train[i] for i in range(prepared.train_size)]
    assert [label for _, label in pairs] == [0] * 5 + [1] * 5
    assert [min(image.shape[:2]) for image, _ in pairs] == [128] * 4 + [100] + [128] * 5  # small.jpg kept
    kept = prepared.train.encoded(4)[0]  # small.jpg sorts last among the cats: stored byte for byte
    assert kept == (source / "train" / "cat" / "small.jpg").read_bytes()
    # Evaluation on the copy sees the images torchvision's Resize(128) + CenterCrop(112) makes, up to JPEG.
    ours = next(eval_batches(prepared, side=112, batch=4, workers=0, resize=128))["image"]
    theirs = next(eval_batches(original, side=112, batch=4, workers=0, resize=128))["image"]
    assert np.abs(ours.astype(int) - theirs).mean() < 2.5
    assert load_split("folder", str(copy)).test_size == 4
    # Training reads it through the same streamed pipeline, both decoders and worker processes alike.
    batches = list(train_batches(prepared, side=32, seed=0, epoch=0, start=0, steps=2, batch=4, workers=1,
                                 decoder="pillow"))
    inline = list(train_batches(prepared, side=32, seed=0, epoch=0, start=0, steps=2, batch=4, workers=0,
                                decoder="pillow"))
    for a, b in zip(batches, inline):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_a_copy_of_class_folders_holds_out_the_same_images_as_the_folder(tmp_path):
    for label in ("x", "y", "z"):
        for i in range(5):
            _jpeg(_photo(64, 80, i), tmp_path / "images" / label / f"{i}.jpg")
    resized.write_copy(str(tmp_path / "images"), str(tmp_path / "copy"), shorter_side=32, workers=1)
    original, prepared = load_folder(str(tmp_path / "images")), load_folder(str(tmp_path / "copy"))
    assert prepared.test_split == "held-out" and list(resized.copy_splits(str(tmp_path / "copy"))) == ["all"]
    np.testing.assert_array_equal(prepared.test.indices, original.test.indices)
    np.testing.assert_array_equal(prepared.train.labels(), original.train.labels())


def test_prepare_never_overwrites_without_asking_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    source = tmp_path / "images"
    for label in ("a", "b"):
        for i in range(2):
            _jpeg(_photo(40, 40, i), source / label / f"{i}.jpg")
    copy = tmp_path / "copy"
    args = ["prepare", "folder", "--data-dir", str(source), "--output", str(copy), "--shorter-side", "16",
            "--workers", "1"]
    assert data_main(args) == 0
    first = (copy / "all.array_record").read_bytes()
    assert data_main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for output, message in ((tmp_path / "mine", "is not a prepared copy"), (source / "x", "inside the source"),
                            (tmp_path, "holds the source folder")):
        assert data_main(args[:4] + ["--output", str(output), "--shorter-side", "16", "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (source / "x").exists()
    for bad, message in ((["--shorter-side", "0"], "--shorter-side must be"), (["--quality", "101"], "--quality must"),
                         (["--manual-dir", str(tmp_path)], "--manual-dir applies")):
        assert data_main(args + bad) == 2 and message in capsys.readouterr().err
    assert data_main(["prepare", "mnist", "--output", str(tmp_path / "o")]) == 2
    assert "--output apply to prepare folder" in capsys.readouterr().err

    def interrupted(*_):  # as if stopped while the copy was being put in place
        raise KeyboardInterrupt

    monkeypatch.setattr(resized, "_move_into_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_main(args + ["--shorter-side", "24", "--overwrite"])
    with pytest.raises(KeyboardInterrupt):
        resized.write_copy(str(source), str(tmp_path / "new"), shorter_side=24, workers=1)
    assert (copy / "all.array_record").read_bytes() == first and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "images", "mine"]  # no partial folder left
    monkeypatch.undo()
    assert data_main(args + ["--shorter-side", "24", "--overwrite"]) == 0
    assert resized.read_index(str(copy))["shorter_side"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "images", "mine"]


# -- the benchmarks -------------------------------------------------------------------------------------------
def test_steady_rate_waits_until_what_was_made_ahead_is_drained(monkeypatch):
    """A producer with 12 batches made ahead, then one every 2 ms: the rate is that of the 2 ms. The clock is
    a counter the producer advances, so that a loaded machine's uneven sleeps cannot make it unsteady."""
    calls, now = iter(range(10 ** 6)), [0.0]

    def step():
        now[0] += 0.002 if next(calls) >= 12 else 0.0001  # made ahead: only handed over

    monkeypatch.setattr(input_pipeline.time, "perf_counter", lambda: now[0])
    measured = input_pipeline.steady_rate(step, batch=10, segment=8, segments=12)
    assert measured["steady"] and measured["drained_batches"] >= 16
    assert measured["images_per_sec"] == pytest.approx(5000)  # 10 images per 2 ms


def test_input_pipeline_benchmark_measures_originals_and_copy_against_a_plain_loop(tmp_path, capsys):
    """Both kinds of data, the pipeline and the plain loop, in this process (worker processes cost seconds
    each to start here; the streamed tests above run Grain's), then the plain loop's Pool of one."""
    out = tmp_path / "result.json"
    assert input_pipeline.main(["--folder", str(tmp_path / "jpegs"), "--images", "24", "--workers", "0",
                                "--batch", "4", "--batches", "4", "--repeats", "1", "--side", "32", "--copy-side",
                                "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["data"], row["workers"]) for row in rows] == [("originals", 0), ("copy-64", 0)]
    for row in rows:
        assert row["images_per_sec"] > 0 and row["plain_images_per_sec"] > 0 and row["mean_jpeg_kib"] > 0
        assert row["skipped_batches"] >= read_ahead_batches(0) and row["timed_batches"] >= 4
    assert "plain Pool" in capsys.readouterr().out
    source = load_folder(str(tmp_path / "jpegs-s64")).train
    pool = input_pipeline.plain_rate(source, workers=1, images=8, side=32, crop="inception", decoder="pillow")
    assert pool["images_per_sec"] > 0
    assert input_pipeline.main(["--images", "0"]) == 2


def test_stream_train_compares_the_streamed_step_with_the_resident_one(tmp_path, capsys):
    for label in ("a", "b"):
        for i in range(5):
            _jpeg(_photo(40, 48, i), tmp_path / "images" / label / f"{i}.jpg")
    out = tmp_path / "result.json"
    assert stream_train.main(["--data-dir", str(tmp_path / "images"), "--arch", "lenet5_relu", "--dtype", "float32",
                              "--batch-size", "8", "--image-size", "16", "--workers", "0", "--steps", "2",
                              "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["synthetic_images_per_sec"] > 0 and result["streamed_images_per_sec"] > 0
    assert result["streamed_of_synthetic"] == pytest.approx(
        result["streamed_images_per_sec"] / result["synthetic_images_per_sec"])
    assert "synthetic" in capsys.readouterr().out
