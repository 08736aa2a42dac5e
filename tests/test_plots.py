"""The plots (`train.plots`) and the learning-rate range test (`train.lr_find`), in-process.

One tiny run serves every plot test: LeNet-5 (ReLU) on the embedded digits, global batch 64 over the
8 host devices of conftest, 6 epochs at a constant rate of 0.05 (132 steps). The range test runs once
too, through the function ``python -m train --lr-find`` calls (`train.lr_find.lr_find`). The compilation
cache is off, so what is measured is what a cold checkout pays: about 40 s for the file on 2 CPU cores
shared with other work (2026-11).
"""

from __future__ import annotations

import csv
import io
import os
import struct
import types

import numpy as np
import pytest

from train import figures, loop, lr_find, lr_range, plots
from train.arguments import parse_args
from train.config import Config, ConfigError
from train.data import load_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GOOD_LR = 0.05  # the rate the module's run trains at (checked to reach > 85% test top-1 below)
RUN = dict(arch="lenet5_relu", dataset="digits", batch_size=64, schedule="constant", warmup_epochs=0.0, seed=0)


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking that PIL decodes all of it."""
    from PIL import Image

    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG file"
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file fails here
        assert image.size == struct.unpack(">II", head[16:24])
        return image.size


def assert_sensible_png(path, min_side: int = 150, max_side: int = 5000) -> tuple[int, int]:
    width, height = png_size(path)
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path, width, height)
    return width, height


@pytest.fixture(scope="module")
def no_compile_cache():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # hermetic: the trainer leaves the cache off
        yield


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, no_compile_cache):
    """A finished 6-epoch run: (workdir, final metrics, what the trainer printed)."""
    workdir = tmp_path_factory.mktemp("run")
    config = Config(**RUN, epochs=6, lr=GOOD_LR, workdir=str(workdir)).validate()
    stream = io.StringIO()
    results = loop.train_and_evaluate(config, stream=stream)
    return workdir, results, stream.getvalue()


@pytest.fixture(scope="module")
def range_test(tmp_path_factory, no_compile_cache):
    """The range test through the trainer (``--lr-find``): (workdir, result, printed text)."""
    workdir = tmp_path_factory.mktemp("lr_find")
    config = parse_args(["--arch", RUN["arch"], "--dataset", "digits", "--batch-size", "64", "--lr-find",
                         "--workdir", str(workdir)])
    stream = io.StringIO()
    result = lr_find.lr_find(config, stream=stream)
    return workdir, result, stream.getvalue()


# -- the end of a run ---------------------------------------------------------------------------------------

def test_a_run_ends_with_its_four_plots(tiny_run):
    workdir, results, printed = tiny_run
    names = {"curves.png", "confusion.png", "predictions.png", "filters.png"}
    assert names <= set(os.listdir(workdir / "plots")), printed
    for name in names:
        assert_sensible_png(workdir / "plots" / name)
    assert "plots: plots/curves.png" in printed
    assert "warning" not in printed


def test_the_plots_command_redraws_them_from_a_checkpoint(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    assert plots.main(["run", str(workdir), "--checkpoint", "best", "--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["confusion.png", "curves.png", "filters.png", "predictions.png"]
    for name in os.listdir(tmp_path):
        assert_sensible_png(tmp_path / name)
    assert "wrote" in capsys.readouterr().out


def test_the_plots_command_keeps_plots_already_there_unless_told_to_replace_them(tmp_path):
    folder = str(tmp_path / "plots")
    assert plots._out_dir(folder, overwrite=False) == (folder, None)  # none yet
    os.makedirs(folder)
    (tmp_path / "plots" / "curves.png").write_bytes(b"an earlier plot")
    assert plots._out_dir(folder, overwrite=False) == (f"{folder}-2", folder)
    os.makedirs(f"{folder}-2")
    assert plots._out_dir(folder, overwrite=False) == (f"{folder}-3", folder)
    assert plots._out_dir(folder, overwrite=True) == (folder, None)


def test_the_plots_command_names_a_missing_workdir(tmp_path, capsys):
    assert plots.main(["run", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_samples_show_every_class(tmp_path, capsys):
    path = tmp_path / "samples.png"
    assert plots.main(["samples", "--dataset", "digits", "--out", str(path)]) == 0
    width, height = assert_sensible_png(path)
    assert width > height, "ten classes in rows of five"
    assert plots.main(["samples", "--dataset", "no_such_set"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    before = path.read_bytes()
    for out, words in ((path, "already exists; --overwrite replaces it"), (tmp_path, "is a folder"),
                       (tmp_path / "none" / "s.png", "does not exist")):
        assert plots.main(["samples", "--dataset", "digits", "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["samples.png"]
    assert plots.main(["samples", "--dataset", "digits", "--out", str(path), "--overwrite"]) == 0


def test_curves_come_from_metrics_jsonl_one_record_per_step(tiny_run):
    workdir, results, _ = tiny_run
    records = figures.read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["test_top1"] == pytest.approx(results["test_top1"])
    with open(workdir / "metrics.jsonl", "a") as handle:  # a resumed epoch and a half-written line
        handle.write('{"step": 132, "epoch": 6, "eval_top1": 0.5}\n{"step": 8')
    again = figures.read_metrics(str(workdir / "metrics.jsonl"))
    assert len(again) == 6 and again[-1]["test_top1"] == 0.5


# -- the pieces ---------------------------------------------------------------------------------------------

def test_confusion_matrix_rows_are_true_classes():
    matrix = figures.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_first_conv_kernel_is_the_one_reading_the_image():
    rng = np.random.default_rng(0)
    params = {"a_block": {"conv": {"kernel": rng.normal(size=(3, 3, 64, 64))}},
              "stem": {"kernel": rng.normal(size=(7, 7, 3, 64)), "bias": np.zeros(64)},
              "head": {"kernel": rng.normal(size=(64, 10))}}
    name, kernel = figures.first_conv_kernel(params, in_channels=3)
    assert name == "stem/kernel" and kernel.shape == (7, 7, 3, 64)
    with pytest.raises(ValueError, match="no convolution"):
        figures.first_conv_kernel({"dense": {"kernel": np.zeros((4, 2))}})


def test_unnormalize_inverts_the_models_normalisation():
    pixels = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (pixels - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(figures.unnormalize(normalised, mean, std), pixels, atol=1e-6)


def test_rgb_filters_and_a_confusion_matrix_without_numbers_in_cells(tmp_path):
    rng = np.random.default_rng(0)
    width, height = assert_sensible_png(figures.plot_filters(rng.normal(size=(5, 5, 3, 16)), str(tmp_path / "f.png")))
    assert width >= 600 and height < width, "two rows of eight"
    names = [f"class_{i:02d}" for i in range(24)]  # past 20 classes the cells carry colour only
    labels = np.repeat(np.arange(24), 3)
    path = figures.plot_confusion(figures.confusion_matrix(labels, np.roll(labels, 1), 24), names, str(tmp_path / "c.png"))
    width, height = assert_sensible_png(path)
    assert width > 1.8 * height


@pytest.mark.parametrize("classes", [10, 100])
def test_confusion_labels_stay_legible_up_to_a_hundred_classes(classes):
    """Drawing 100 classes takes 7 s here, so the layout is checked instead (the figure was inspected)."""
    panel, font = figures.confusion_layout(classes)
    row_points = panel * 72 / classes
    assert font >= 6.5, "readable on screen at 100 dpi"
    assert font <= 0.7 * row_points, "labels of neighbouring classes do not overlap"
    assert panel * 2 * figures.DPI <= 5000, "a PNG an image viewer opens at once"


def test_each_failing_plot_is_a_warning_and_the_others_are_drawn(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    from train.inference import load_variables, locate

    variables, meta = load_variables(*locate(str(workdir)))
    variables = {"params": {"fc": {"kernel": np.zeros((3, 10))}}, "batch_stats": {}}  # no conv, no model fit
    warnings: list[str] = []
    written = figures.write_run_plots(str(workdir), variables, meta, None, out_dir=str(tmp_path), warn=warnings.append)
    assert [os.path.basename(p) for p in written] == ["curves.png"]
    assert len(warnings) == 1 and "first-layer filters" in warnings[0]


def test_the_trainer_turns_a_plotting_crash_into_a_warning(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "write_run_plots", broken)
    said: list[str] = []
    run = types.SimpleNamespace(meta=lambda epoch, position: {}, data=None, schedule=None)
    state = types.SimpleNamespace(params={}, batch_stats={})
    loop._write_plots(run, str(tmp_path), state, 1, types.SimpleNamespace(info=said.append, warn=said.append))
    assert said == ["warning: no plots (RuntimeError: no display)."]


def test_no_plots_flag():
    assert parse_args(["--no-plots"]).plots is False and parse_args([]).plots is True
    with pytest.raises(ConfigError, match="lr-find-start"):
        parse_args(["--lr-find", "--lr-find-start", "1", "--lr-find-end", "0.1"])


# -- the learning-rate range test ----------------------------------------------------------------------------

def test_range_test_suggests_a_rate_within_ten_times_one_that_trains_well(range_test, tiny_run):
    """Problem: LeNet-5 (ReLU) on the 1,437 digits, SGD with momentum 0.9 and weight decay 5e-4, global
    batch 64, rates 1e-7 to 10 over up to 200 steps. Check: the suggestion lies within a factor of 10 of
    0.05, the rate at which this module's 6-epoch run reaches over 85% test top-1 (and the default run
    of 20 epochs about 98%).
    """
    _, result, printed = range_test
    _, trained, _ = tiny_run
    print(f"suggested {result['suggested_lr']:.3g}, lowest loss at {result['min_loss_lr']:.3g}; "
          f"{GOOD_LR} trains to {trained['test_top1']:.2%} in 6 epochs")
    assert trained["test_top1"] > 0.85, "the reference rate must train well for the check to mean anything"
    suggested = result["suggested_lr"]
    assert GOOD_LR / 10 <= suggested <= GOOD_LR * 10, printed
    assert f"suggested --lr {suggested:.3g} (rule: {result['rule']})" in printed
    assert result["min_loss_lr"] >= suggested


def test_range_test_writes_its_plot_and_table_and_nothing_of_a_run(range_test):
    workdir, result, printed = range_test
    assert sorted(os.listdir(workdir)) == ["plots"], "no checkpoint, config.json or metrics.jsonl"
    assert sorted(os.listdir(workdir / "plots")) == ["lr_find.csv", "lr_find.png"]
    assert_sensible_png(workdir / "plots" / "lr_find.png")
    with open(workdir / "plots" / "lr_find.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result["steps"] and 20 < len(rows) <= 200
    lrs = np.array([float(r["lr"]) for r in rows])
    losses = np.array([float(r["loss"]) for r in rows])
    smoothed = np.array([float(r["smoothed_loss"]) for r in rows])
    assert lrs[0] == pytest.approx(1e-7) and np.allclose(np.diff(np.log(lrs)), np.log(1e8) / 199, rtol=1e-4)
    np.testing.assert_allclose(lr_range.smooth(losses), smoothed, rtol=1e-4)
    if len(rows) < 200:  # stopped early: the loss diverged
        assert "passed 4 x its best" in result["stop_reason"] or "loss became" in result["stop_reason"]


def test_suggestion_rules_on_a_made_up_curve():
    lrs = np.logspace(-6, 1, 100)
    # A loss that falls fastest at 1e-3 (a logistic step in log10(rate)) and explodes past 1.
    losses = 2.3 - 2.0 / (1 + np.exp(-4 * (np.log10(lrs) + 3))) + np.where(lrs > 1, (lrs - 1) * 10, 0)
    rate, rule, min_loss_rate = lr_range.suggest(lrs, losses)
    assert rate == pytest.approx(1e-3, rel=0.2) and "steepest" in rule
    assert 0.1 < min_loss_rate <= 1.5


# -- the suggestion on synthetic curves: a loss that never falls gets none ------------------------------------

LRS = np.logspace(-7, 1, 200)
NOISE = np.random.default_rng(0).normal(0.0, 0.02, LRS.size)  # a batch-64 loss's step-to-step jitter


@pytest.mark.parametrize("name,losses,expected", [
    ("flat at chance", np.log(10) + NOISE, None),  # NiN on the digits: ln 10 from 1e-7 to 10
    ("falls 5%, within the tolerance", np.log(10) * (1 - 0.05 * (LRS > 1e-3)) + NOISE, None),
    ("only rises", np.log(10) + np.where(LRS > 1e-2, np.log10(LRS / 1e-2), 0) + NOISE, None),
    ("falls", 2.3 - 2.0 / (1 + np.exp(-4 * (np.log10(LRS) + 3))) + NOISE, 1e-3),
    ("falls, then diverges", 2.3 - 2.0 / (1 + np.exp(-4 * (np.log10(LRS) + 3)))
     + np.where(LRS > 1, (LRS - 1) * 10, 0) + NOISE, 1e-3),
])
def test_suggestion_on_synthetic_curves(name, losses, expected):
    smoothed = lr_range.smooth(losses)
    rate, rule, min_loss_rate = lr_range.suggest(LRS, smoothed)
    assert LRS[0] <= min_loss_rate <= LRS[-1]
    if expected is None:
        assert rate is None and f"never fell {lr_range.FLAT_TOLERANCE:.0%} below its start" in rule, name
    else:
        # smoothing lags the curve by a few steps, so the steepest fall shows a little later
        assert expected / 2 <= rate <= expected * 4 and "steepest" in rule, (name, rate)


def test_a_flat_sweep_says_what_to_try_and_its_plot_marks_no_rate(tmp_path):
    losses = np.log(10) + NOISE
    smoothed = lr_range.smooth(losses)
    rate, rule, min_loss_rate = lr_range.suggest(LRS, smoothed)
    finding = lr_range.LRFinding(LRS, losses, smoothed, rate, rule, min_loss_rate, "all 200 steps taken")
    summary = finding.as_dict()
    assert summary["suggested_lr"] is None and summary["min_loss_lr_over_10"] is None
    sentence = lr_range.no_suggestion(finding)
    assert sentence.startswith("no suggested --lr: the smoothed loss never fell 10% below its start")
    assert "--optimizer adam" in sentence and "smaller model" in sentence and "images and labels" in sentence
    assert sentence.count(". ") == sentence.count("e.g. ") and sentence.endswith(".") and "\n" not in sentence
    csv_path, png_path = lr_find.write_finding(finding, str(tmp_path), "flat")
    assert_sensible_png(png_path)
    assert not lr_range.suggest(LRS[:3], np.full(3, np.nan))[0]  # never finite: no rate either


def test_a_second_range_test_keeps_the_first_ones_plot_and_table(tmp_path):
    lrs = np.geomspace(1e-4, 1.0, 12)
    losses = np.concatenate([np.linspace(2.3, 0.5, 9), [0.8, 2.0, 9.0]])
    finding = lr_range.LRFinding(lrs, losses, lr_range.smooth(losses), 0.01, "steepest descent", 0.1, "diverged")
    first = lr_find.write_finding(finding, str(tmp_path), "first")
    second = lr_find.write_finding(finding, str(tmp_path), "second")
    assert [os.path.basename(p) for p in first + second] == ["lr_find.csv", "lr_find.png", "lr_find-2.csv",
                                                             "lr_find-2.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in first + second)  # nothing else
    with open(second[0]) as handle:
        assert len(list(csv.DictReader(handle))) == 12
