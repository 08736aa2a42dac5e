"""Pictures of the data, of a run and of a trained model, as PNG files (the command that draws them for
any checkpoint is ``python -m train.plots``). Every plot of a run, from its checkpoint and
``metrics.jsonl``, goes into ``WORKDIR/plots`` (`write_run_plots`):

- ``curves.png``: train and test loss, top-1 (and top-5) accuracy and the learning rate, per epoch;
- ``confusion.png``: the test split's confusion matrix, in counts and normalised per true class;
- ``predictions.png``: test images titled "predicted / true", the misclassified ones first, in red;
- ``filters.png``: the first convolution's kernels as images (colour for RGB input, grey otherwise).

The trainer writes them at the end of every run (``--no-plots`` turns that off). Figures are
drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure`, never through pyplot: nothing opens
a window, nothing waits for one, and the process's matplotlib backend is left alone.

Images are drawn from the dataset's stored uint8 pixels, that is before the per-channel normalisation
the model's input gets, so they look as the data does; `unnormalize` maps model input back to them.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from flaxnets.cli import error_phrase
from train.text import count

if TYPE_CHECKING:
    from train.data import Dataset

__all__ = [
    "confusion_matrix", "confusion_layout", "first_conv_kernel", "read_metrics", "unnormalize",
    "plot_samples", "plot_curves", "plot_confusion", "plot_predictions", "plot_filters", "write_run_plots",
    "new_figure", "save_figure",
]

DPI = 100
RED = "#c0392b"


# -- numbers ---------------------------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``(classes, classes)`` counts: row = true class, column = predicted class."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def unnormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model input (normalised per channel) back to displayable pixels in [0, 1]."""
    pixels = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(pixels, 0.0, 1.0)


def _display(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (or floats already in [0, 1]) as float [0, 1], one channel squeezed for a grey colormap."""
    images = np.asarray(images)
    pixels = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else np.clip(images, 0.0, 1.0)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def first_conv_kernel(params: Any, in_channels: int | None = None) -> tuple[str, np.ndarray]:
    """``(path, kernel)`` of the first convolution: the 4-D (HWIO) ``kernel`` that reads the image.

    Parameter trees do not keep the order layers are called in (flattening sorts keys), so the first
    layer is recognised by what it reads: the image's ``in_channels``. Without ``in_channels``, or when
    several kernels match, the one with the fewest input channels comes first, then tree order.
    """
    from flax.traverse_util import flatten_dict

    kernels = [("/".join(map(str, key)), np.asarray(value)) for key, value in flatten_dict(dict(params)).items()
               if key[-1] == "kernel" and np.ndim(value) == 4]
    if not kernels:
        raise ValueError("the model has no convolution kernel (a 4-D 'kernel' parameter).")
    matching = [item for item in kernels if in_channels is None or item[1].shape[2] == in_channels]
    return min(matching or kernels, key=lambda item: item[1].shape[2])


def read_metrics(path: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, one per step (a resumed run's later record wins), by step.

    A line that is not a JSON record of a step (a run killed mid-write) is skipped
    (`train.workdir.read_records`).
    """
    from train.workdir import read_records

    by_step: dict[int, dict] = {}
    for step, record, _ in read_records(path):
        if record is not None:  # runs of earlier versions called the test split's metrics eval_*
            by_step[step] = {("test_" + k[5:] if k.startswith("eval_") else k): v for k, v in record.items()}
    return [by_step[step] for step in sorted(by_step)]


# -- figures ---------------------------------------------------------------------------------------------

def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.png"
    try:
        figure.savefig(tmp, dpi=DPI, facecolor="white")
        os.replace(tmp, path)  # a reader never sees half a PNG
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def _fit(text: str, width_inches: float, largest: float, smallest: float = 6.0) -> float:
    """A font size at which ``text`` fits ``width_inches`` (about 0.6 em per character), within bounds."""
    return float(np.clip(width_inches * 72 / (0.6 * max(len(text), 1)), smallest, largest))


def _image_grid(images: Sequence[np.ndarray], columns: int, cell: float, title: str, *,
                titles: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                framed: Sequence[bool] | None = None, title_lines: int = 1):
    """One figure of images in a grid, each scaled into a ``cell``-inch square, with optional titles.

    Every image is drawn into a single axes whose units are inches, instead of one axes per image:
    a 64-image grid then draws in a fraction of a second rather than seconds, and nothing needs a
    layout engine. ``framed`` images get a red border.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    count = len(images)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    gap = 0.1 * cell
    size = _fit(max((line for t in titles or () for line in t.split("\n")), key=len, default=""), cell + gap, 11)
    band = title_lines * size * 1.25 / 72 + 0.04 if titles else 0.0
    top = 0.5
    width = columns * (cell + gap) + gap
    height = top + rows * (band + cell + gap)
    figure = Figure(figsize=(width, height), dpi=DPI)
    ax = figure.add_axes((0, 0, 1, (height - top) / height))
    ax.set_axis_off()
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        x0, y0 = gap + column * (cell + gap), row * (band + cell + gap) + band
        h, w = image.shape[:2]
        iw, ih = cell * w / max(h, w), cell * h / max(h, w)
        left, upper = x0 + (cell - iw) / 2, y0 + (cell - ih) / 2
        ax.imshow(image, extent=(left, left + iw, upper + ih, upper), cmap="gray" if image.ndim == 2 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        if titles:
            ax.text(x0 + cell / 2, y0 - 0.03, titles[k], ha="center", va="bottom", fontsize=size,
                    color=colors[k] if colors else "black", linespacing=1.1)
        if framed is not None and framed[k]:
            ax.add_patch(Rectangle((left, upper), iw, ih, fill=False, edgecolor=RED, linewidth=3))
    ax.set_xlim(0, width)
    ax.set_ylim(height - top, 0)
    ax.set_aspect("auto")
    figure.text(0.5, 1 - top / 2 / height, title, ha="center", va="center", fontsize=_fit(title, width - 0.2, 12, 7))
    return figure


def plot_samples(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str,
                 title: str | None = None) -> str:
    """One image per class (the first of each in ``images``), titled with the class name; returns ``path``."""
    labels = np.asarray(labels)
    classes = [c for c in range(len(class_names)) if np.any(labels == c)]
    columns = 10 if len(classes) > 16 else min(len(classes), 5 if len(classes) <= 10 else 8)
    height, width = np.shape(images)[1:3]
    figure = _image_grid([_display(images[np.flatnonzero(labels == c)[0]]) for c in classes], columns,
                         1.4 if len(classes) > 16 else 1.8,
                         title or f"one image per class ({len(classes)} classes, {height}x{width} pixels)",
                         titles=[class_names[c] for c in classes])
    return save_figure(figure, path)


def plot_curves(records: Sequence[dict], path: str, schedule: Callable[[int], float] | None = None,
                steps_per_epoch: int | None = None, title: str | None = None) -> str:
    """Loss, accuracy and learning rate against epochs, from `read_metrics` records; returns ``path``.

    With a ``schedule`` (step -> learning rate) and ``steps_per_epoch`` the rate is drawn at every step,
    not only at the epochs' ends.
    """
    records = [r for r in records if "epoch" in r]
    if not records:
        raise ValueError("no epoch has been recorded yet: nothing to draw.")
    figure = new_figure(15, 4.4)
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    style = {"marker": "o", "markersize": 3.5} if len(records) <= 40 else {}

    def series(key):
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return tuple(zip(*points)) if points else None

    for ax, keys, ylabel, scale in (
        (loss_ax, (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")), "cross-entropy loss",
         1.0),
        (acc_ax, (("train_top1", "train top-1"), ("val_top1", "validation top-1"), ("test_top1", "test top-1"),
                  ("val_top5", "validation top-5"), ("test_top5", "test top-5")), "accuracy (%)", 100.0),
    ):
        for key, label in keys:
            points = series(key)
            if points:
                ax.plot(points[0], np.asarray(points[1]) * scale, label=label, **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    loss_ax.set_title("loss")
    acc_ax.set_title("accuracy")
    if acc_ax.lines:
        # The plotted curve's best point, on validation when there is one. The run's best checkpoint can be
        # another epoch: only checkpointed epochs compete, and the averaged weights' scores with them.
        key = "val_top1" if any("val_top1" in r for r in records) else "test_top1"
        best = max(records, key=lambda r: r.get(key, -1))
        if key in best:
            split = "validation" if key == "val_top1" else "test"
            acc_ax.set_title(f"accuracy (best {split} top-1 {best[key]:.2%}, epoch {best['epoch']})")
    last_step = max(int(r["step"]) for r in records)
    if schedule is not None and steps_per_epoch:
        steps = np.unique(np.linspace(0, max(last_step - 1, 0), 400).astype(int))
        lr_ax.plot((steps + 1) / steps_per_epoch, [float(schedule(int(s))) for s in steps], label="schedule")
    points = series("lr")
    if points:
        lr_ax.plot(points[0], points[1], linestyle="none", label="at epoch end", **({"marker": "o", "markersize": 3.5}))
    lr_ax.set_title("learning rate")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if lr_ax.lines:
        lr_ax.legend()
    figure.suptitle(title or f"training curves ({count(len(records), 'epoch')}, {count(last_step, 'step')})", fontsize=12)
    return save_figure(figure, path)


def confusion_layout(num_classes: int) -> tuple[float, float]:
    """``(panel side in inches, tick label size in points)`` for a confusion matrix of ``num_classes``.

    The panel grows with the classes (up to 18 inches) and the labels take a little over half of each
    row's height: 10 points for a few classes, 7 points at 100 classes (rows 0.16 inch = 11.5 points apart).
    """
    panel = float(np.clip(0.16 * num_classes + 2.0, 5.5, 18.0))
    font = float(np.clip(panel * 72 / num_classes * 0.55, 4.5, 10))
    return panel, font


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str, title: str | None = None) -> str:
    """Two panels: counts, and each row divided by its true class's count; returns ``path``.

    Up to 20 classes every cell is written in; beyond, the colours speak and every class keeps its tick
    label, in a font and a figure sized for the number of classes (100 classes: 6 pt on 16-inch panels).
    """
    matrix = np.asarray(matrix)
    n = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = matrix / np.maximum(totals, 1)
    panel, font = confusion_layout(n)
    figure = new_figure(2 * panel + 2.2, panel + 0.5)
    axes = figure.subplots(1, 2)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    annotate = n <= 20
    for ax, values, kind in ((axes[0], matrix, "counts"), (axes[1], normalised, "fraction of the true class")):
        top = 1.0 if values is normalised else max(int(values.max()), 1)
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
        figure.colorbar(image, ax=ax, shrink=0.8, label=kind)
        ax.set_xticks(range(n), class_names, fontsize=font,
                      rotation=90 if n > 10 or max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(range(n), class_names, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(kind)
        if annotate:
            high = values.max() * 0.5
            for (i, j), value in np.ndenumerate(values):
                if matrix[i, j] == 0:
                    continue
                text = f"{value:d}" if values is matrix else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=min(font, 9),
                        color="white" if value > high else "black")
    figure.suptitle(title or f"confusion matrix: {int(matrix.sum())} test images, {accuracy:.2%} on the diagonal",
                    fontsize=13)
    return save_figure(figure, path)


def plot_predictions(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                     class_names: Sequence[str], path: str, count: int = 36, title: str | None = None) -> str:
    """A grid of images titled "predicted / true" (red when wrong), misclassified first; returns ``path``.

    The misclassified images come in order of the model's confidence in its wrong answer, then the
    correct ones in dataset order. Each title also gives the probability of the predicted class.
    """
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    order = np.concatenate([wrong, np.flatnonzero(predicted == labels)])[:count]
    titles = [f"{class_names[predicted[i]]} ({confidence[i]:.0%})\n/ {class_names[labels[i]]}" for i in order]
    ok = predicted[order] == labels[order]
    figure = _image_grid(
        [_display(images[i]) for i in order], math.ceil(math.sqrt(len(order))), 1.7,
        title or f"predicted (probability) / true: {len(wrong)} of {len(labels)} test images misclassified, "
                 f"shown first in red",
        titles=titles, colors=["black" if good else RED for good in ok], framed=~ok, title_lines=2)
    return save_figure(figure, path)


def plot_filters(kernel: np.ndarray, path: str, name: str = "first convolution", title: str | None = None) -> str:
    """The ``(H, W, in, out)`` kernel as ``out`` small images, each scaled to its own min..max; returns ``path``.

    Three input channels are drawn in colour (as RGB), one in grey; any other count as the mean over
    input channels in grey. Per-filter scaling shows each filter's pattern, not its size relative to
    the others.
    """
    kernel = np.asarray(kernel, np.float32)
    h, w, cin, cout = kernel.shape
    filters = np.moveaxis(kernel, -1, 0)  # (out, H, W, in)
    if cin not in (1, 3):
        filters = filters.mean(axis=-1, keepdims=True)
    low = filters.min(axis=(1, 2, 3), keepdims=True)
    high = filters.max(axis=(1, 2, 3), keepdims=True)
    filters = (filters - low) / np.maximum(high - low, 1e-12)
    columns = min(cout, 16 if cout > 64 else 8)
    kind = "RGB" if cin == 3 else ("grey" if cin == 1 else f"mean of {cin} input channels")
    figure = _image_grid([f[..., 0] if f.shape[-1] == 1 else f for f in filters], columns,
                         float(np.clip(8.0 / columns, 0.6, 1.2)),
                         title or f"{name}: {cout} filters {h}x{w}x{cin} ({kind}), each scaled to its own range")
    return save_figure(figure, path)


# -- a run's plots -----------------------------------------------------------------------------------------

def write_run_plots(workdir: str, variables: dict, meta: dict, data: "Dataset | None" = None, *, schedule: Callable | None = None,
                    out_dir: str | None = None, warn: Callable[[str], None] = print) -> list[str]:
    """Every plot of a run into ``out_dir`` (default ``WORKDIR/plots``); returns the paths written.

    ``variables`` (params, batch_stats) and ``meta`` are a checkpoint's (`train.inference.load_variables`)
    or the trainer's at the end of a run (`train.loop.Run.meta`); ``data`` is the run's `Dataset`, for
    the test predictions (without it the confusion matrix and prediction grid are left out). Each plot
    that fails is reported through ``warn`` and the others are still drawn.
    """
    out_dir = out_dir or os.path.join(workdir, "plots")
    dataset = meta["dataset"]
    names = list(dataset["class_names"])
    written: list[str] = []

    def attempt(what: str, draw: Callable[[], str]) -> None:
        try:
            written.append(draw())
        except Exception as error:  # noqa: BLE001 - a plot is never worth stopping for
            warn(f"warning: could not draw the {what} ({error_phrase(error)}).")

    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        steps_per_epoch = dataset["train_examples"] // meta["batch_size"] if meta.get("batch_size") else None
        attempt("training curves", lambda: plot_curves(
            read_metrics(metrics), os.path.join(out_dir, "curves.png"), schedule=schedule,
            steps_per_epoch=steps_per_epoch,
            title=f"{meta['arch']} on {dataset['name']}: training curves"))
    if data is not None and not hasattr(data, "test_images"):  # streamed: read (the first) test images
        from train.data import sample_in_memory

        # Small fixed-size images (MNIST, CIFAR through tensorflow-datasets) all; large ones the first 2,000.
        limit = 10_000 if data.fixed_size and data.image_shape[0] <= 64 else 2_000
        data = sample_in_memory(data, meta["image_side"], per_class=0, test_limit=limit)
    if data is not None:
        try:
            from train.inference import predict_images

            probabilities = predict_images(variables, meta, data.test_images)
        except Exception as error:  # noqa: BLE001
            warn(f"warning: could not predict the test images for the plots ({error_phrase(error)}).")
        else:
            predicted = probabilities.argmax(axis=1)
            matrix = confusion_matrix(data.test_labels, predicted, len(names))
            accuracy = float(np.trace(matrix)) / max(int(matrix.sum()), 1)
            attempt("confusion matrix", lambda: plot_confusion(
                matrix, names, os.path.join(out_dir, "confusion.png"),
                title=f"{meta['arch']} on {dataset['name']}: confusion matrix of {int(matrix.sum())} test images "
                      f"(top-1 {accuracy:.2%})"))
            attempt("prediction grid", lambda: plot_predictions(
                data.test_images, data.test_labels, probabilities, names, os.path.join(out_dir, "predictions.png")))
    channels = dataset["image_shape"][-1]

    def filters() -> str:
        name, kernel = first_conv_kernel(variables["params"], channels)
        return plot_filters(kernel, os.path.join(out_dir, "filters.png"),
                            title=f"{meta['arch']}, first convolution ({name}): {kernel.shape[3]} filters "
                                  f"{kernel.shape[0]}x{kernel.shape[1]}x{kernel.shape[2]}, each scaled to its own range")
    attempt("first-layer filters", filters)
    return written
