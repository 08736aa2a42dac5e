"""Datasets too large for memory: Grain over a random-access source, decoded and augmented on the host by
worker processes, batches prefetched to the devices.

The order of the examples is `epoch_order` (a pure function of seed and epoch) and the augmentation of each
example a pure function of (seed, epoch, example index): a resumed run reads, from its checkpointed step
on, exactly the batches an uninterrupted run would have read. No iterator state needs saving.

Training crops (``crop``):

- ``"inception"``: a random crop of 8-100% of the area and aspect ratio 3/4-4/3, resized to the side
  (Szegedy et al. 2015, "Going deeper with convolutions", section 6; the ImageNet recipe of torchvision
  and of the flax ImageNet example);
- ``"alexnet"``: the image resized to 256x256 (shorter side to 256, centre crop), then a random 224x224
  crop, as Krizhevsky et al. 2012 (sections 2 and 4.1); for another side both numbers scale with it.

Both then flip half of the images left-right. Evaluation resizes the shorter side to 256/224 of the side
and takes the centre crop; ``ten_crop`` takes the four corners and the centre plus their mirror images
(Krizhevsky et al. 2012, section 4.1) and the trainer averages the ten softmax outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from flaxnets.images import center_crop, resize_shorter, shorter_size
from train.data import jpeg
from train.data.geometry import crop_box, eval_side, mirror, read_crop, ten_crops
from train.data.memory import Dataset, DatasetFacts
from train.data.optional import require

__all__ = ["Streamed", "epoch_order", "train_batches", "eval_batches", "TrainTransform", "EvalTransform",
           "RunTransform", "materialize", "prefetch", "require_grain", "default_workers", "read_ahead_batches",
           "CROPS"]

CROPS = ("inception", "alexnet")


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The permutation of the training set for ``epoch``: identical in every process and on every resume."""
    return np.random.default_rng([seed, epoch]).permutation(size).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Streamed(DatasetFacts):
    """A dataset read example by example from ``train``, ``test`` and (when the run holds one out or the
    dataset has one) ``val`` sources (see `train.data.sources`).

    ``image_shape`` has ``None`` for a side that varies between images. The statistics are those of the
    training images at their own size (see `train.data.stats`).
    """

    name: str
    train: Sequence
    test: Sequence
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, int | None, int]
    flip: bool = True
    crop_padding: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    eigval: tuple[float, ...] = ()
    eigvec: tuple[tuple[float, ...], ...] = ()
    test_split: str = "test"
    val: Sequence | None = None
    val_from: str = ""

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return 0 if self.val is None else len(self.val)

    @property
    def in_memory(self) -> bool:
        return False

    @property
    def test_size(self) -> int:
        return len(self.test)

    @property
    def fixed_size(self) -> bool:
        return None not in self.image_shape[:2]


@dataclasses.dataclass
class TrainTransform:
    """Dataset index -> augmented training example; its randomness depends on (seed, epoch, index) only.

    ``decoder`` (see `read_crop`): None decodes every image whole; "pillow" or "opencv" decode a JPEG straight
    to its crop, at reduced size where it allows. The crop box and the flip are the same either way: they are
    drawn from the image's size before anything is decoded.
    """

    source: Sequence
    side: int
    seed: int
    epoch: int
    crop: str = "inception"
    flip: bool = True
    decoder: str | None = None

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        if self.crop == "alexnet":
            big = eval_side(self.side)
            image, label = read_crop(self.source, index, lambda h, w: jpeg.Crop(0, 0, h, w, *shorter_size(h, w, big)),
                                     self.decoder)
            image = center_crop(image, big)
            top, left = rng.integers(0, big - self.side + 1, size=2)
            image = image[top:top + self.side, left:left + self.side]
        else:
            image, label = read_crop(self.source, index,
                                     lambda h, w: jpeg.Crop(*crop_box(h, w, rng), self.side, self.side), self.decoder)
        if self.flip and rng.random() < 0.5:
            image = mirror(image)
        return {"image": np.ascontiguousarray(image), "label": np.int32(label), "index": np.int32(index)}


@dataclasses.dataclass
class EvalTransform:
    """Dataset index (-1: padding) -> the centre crop (or the ten crops) of a resized test example; the
    shorter side is resized to ``resize`` first (default: 256/224 of ``side``).

    Every image is decoded whole, as torchvision decodes it: decoding at reduced size would move these
    pixels by about a level of 255 on average (benchmarks/RESULTS.md), and published weights are scored on
    torchvision's pixels."""

    source: Sequence
    side: int
    ten_crop: bool = False
    resize: int | None = None

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image, label = self.source[max(index, 0)]
        image = resize_shorter(image, self.resize or eval_side(self.side))
        image = ten_crops(image, self.side) if self.ten_crop else center_crop(image, self.side)
        return {"image": np.ascontiguousarray(image), "label": np.int32(label), "index": np.int32(max(index, 0)),
                "mask": np.bool_(index >= 0)}


def require_grain() -> Any:
    """The ``grain`` module, or a `DataError` naming the package (streaming is the only part that needs it)."""
    return require("grain", "streaming a dataset through worker processes (--pipeline stream, or a dataset "
                            "too large for memory)")


def default_workers() -> int:
    """Worker processes when none are asked for: one per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without CPU affinity (macOS)
        return os.cpu_count() or 1


# What the streamed pipeline holds ahead of its consumer (benchmarks.input_pipeline lets it drain before it
# times): each worker makes its batches with THREADS threads, each thread a whole batch, keeps up to
# READ_AHEAD_BATCHES of them made ahead and WORKER_BUFFER more handed over to the main process. Without
# workers, the main process makes batches with THREADS_INLINE threads. One thread per worker and one worker
# per core keep every core busy without oversubscribing it (the decoders release the GIL).
READ_AHEAD_BATCHES = 2
WORKER_BUFFER = 1
THREADS = 1
THREADS_INLINE = 2


def read_ahead_batches(workers: int) -> int:
    """The most batches the pipeline can have made ahead of what its consumer took: per worker, those its
    threads are making, READ_AHEAD_BATCHES made, WORKER_BUFFER queued, and in Grain's hand-over to the main
    process one held by the worker's put, one by the main process's reading thread and its buffer there."""
    if workers == 0:
        return THREADS_INLINE + READ_AHEAD_BATCHES
    return workers * (THREADS + READ_AHEAD_BATCHES + 2 * WORKER_BUFFER + 2)


def _pipeline(rows: Sequence[int], transform: Callable, batch: int, workers: int) -> Iterator[dict]:
    grain = require_grain()
    from absl import flags

    # Grain 0.2.18 reads one of its absl flags in mp_prefetch even when no absl app parsed them, which
    # raises UnparsedFlagAccessError (google/grain#1355); marking them parsed leaves every default in place.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    # Batched before the read options apply: their threads and buffer count batches, not examples.
    dataset = grain.MapDataset.source(rows).map(transform).batch(batch, drop_remainder=True)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=THREADS if workers else THREADS_INLINE,
                                                         prefetch_buffer_size=READ_AHEAD_BATCHES))
    if workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                                     per_worker_buffer_size=WORKER_BUFFER))
    return iter(iterable)


@dataclasses.dataclass
class RunTransform:
    """Position in one process's stream of training examples -> the example there, augmented by
    ``transform`` at its epoch. The stream starts at step ``start`` of ``first_epoch`` and runs on through
    the following epochs: each of them the ``steps`` first global batches of `epoch_order`, of which this
    process takes ``share`` examples from ``offset`` on. One pipeline can so serve several epochs, its
    workers started once."""

    transform: TrainTransform
    steps: int
    batch: int
    offset: int
    share: int
    first_epoch: int
    start: int

    def __post_init__(self):
        self._order = (None, None)  # (epoch, its order): one permutation per epoch and process

    def __getstate__(self):
        return {**self.__dict__, "_order": (None, None)}

    def locate(self, position: int) -> tuple[int, int]:
        """``(epoch, dataset index)`` of the example at ``position``."""
        row, slot = divmod(position, self.share)
        epoch, step = divmod(row + self.start, self.steps)
        epoch += self.first_epoch
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = epoch_order(self.transform.seed, epoch, len(self.transform.source))
            self._order = (epoch, order)
        return epoch, int(order[step * self.batch + self.offset + slot])

    def __call__(self, position: int) -> dict[str, Any]:
        epoch, index = self.locate(int(position))
        return dataclasses.replace(self.transform, epoch=epoch)(index)


def train_batches(data: Streamed, *, side: int, seed: int, epoch: int, start: int, steps: int, batch: int,
                  crop: str = "inception", workers: int = 2, process_index: int = 0, process_count: int = 1,
                  decoder: str | None = None, epochs: int | None = None) -> Iterator[dict]:
    """This process's share of the global batches ``start..steps-1`` of ``epoch``, then (with ``epochs``) of
    every batch of the epochs after it up to ``epochs - 1``, from one pipeline: dicts of ``image`` uint8
    ``(batch / process_count, side, side, C)``, ``label`` and ``index`` (the example's dataset index);
    ``decoder`` as in `TrainTransform`. Each epoch's batches are the same whether it is read alone or
    after another."""
    share = batch // process_count
    rows = ((max(epochs or 0, epoch + 1) - epoch) * steps - start) * share
    transform = RunTransform(TrainTransform(data.train, side, seed, epoch, crop, data.flip, decoder), steps, batch,
                             process_index * share, share, epoch, start)
    return _pipeline(range(rows), transform, share, workers)


def eval_batches(data: Streamed, *, side: int, batch: int, ten_crop: bool = False, workers: int = 2,
                 process_index: int = 0, process_count: int = 1, split: str = "test",
                 resize: int | None = None) -> Iterator[dict]:
    """Every example of ``split`` ("test" or "val") once, in order, the last global batch padded (``mask``
    False) instead of dropped; ``resize`` as in `EvalTransform`."""
    source = data.val if split == "val" else data.test
    padded = np.full(math.ceil(len(source) / batch) * batch, -1, np.int64)
    padded[:len(source)] = np.arange(len(source))
    share = batch // process_count
    rows = padded.reshape(-1, batch)[:, process_index * share:(process_index + 1) * share].reshape(-1)
    return _pipeline(rows.tolist(), EvalTransform(source, side, ten_crop, resize), share, workers)


def prefetch(batches: Iterator[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
    """``put`` (a transfer to the devices, which returns at once) applied ``size`` batches ahead."""
    queue: deque = deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def materialize(data: Streamed, side: int | None = None) -> Dataset:
    """Read every example into memory: at its own size when all share one (MNIST, CIFAR through
    tensorflow-datasets), else resized (shorter side) and centre-cropped to ``side``."""
    from train.data.memory import with_statistics

    def read(source):
        images, labels = [], []
        chunk = 4096
        for start in range(0, len(source), chunk):
            stop = min(start + chunk, len(source))
            pairs = (source.read_many(range(start, stop)) if hasattr(source, "read_many")
                     else [source[i] for i in range(start, stop)])
            for image, label in pairs:
                images.append(image)
                labels.append(label)
        for i, image in enumerate(images):
            if side is not None and (not data.fixed_size or image.shape[:2] != (side, side)):
                images[i] = center_crop(resize_shorter(image, side), side)
        return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)

    train_x, train_y = read(data.train)
    test_x, test_y = read(data.test)
    val_x, val_y = read(data.val) if data.val is not None else (None, None)
    padding = data.crop_padding or max(1, train_x.shape[1] // 8)
    return with_statistics(Dataset(data.name, train_x, train_y, test_x, test_y, data.class_names, flip=data.flip,
                                   crop_padding=padding, val_images=val_x, val_labels=val_y, val_from=data.val_from,
                                   cropped_to=None if data.fixed_size else side))
