"""Feeding a run's data to its driver: from device memory (`MemoryFeed`) or streamed from the host (`StreamFeed`).

Both give the same interface to the training loop: ``batches(epoch, start)`` yields the inputs of the
steps ``start..steps_per_epoch-1`` of an epoch in order, ``train(state, inputs)`` runs one step, and
``evaluate(state, split)`` returns metric sums over every example of the test or validation split.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from train.data import Dataset, Streamed, epoch_order
from train.data.jpeg import resolve_backend
from train.data.stream import default_workers, eval_batches, prefetch, train_batches
from train.parallel import Driver, host

__all__ = ["MemoryFeed", "StreamFeed", "make_feed", "eval_indices"]


def eval_indices(size: int, batch: int) -> list[np.ndarray]:
    """Every example once, the last batch padded with -1 (masked out) instead of dropped."""
    padded = np.full(math.ceil(size / batch) * batch, -1, np.int32)
    padded[:size] = np.arange(size, dtype=np.int32)
    return list(padded.reshape(-1, batch))


def _sum(batches, run_one) -> dict[str, float]:
    sums = None
    for inputs in batches:
        metrics = run_one(inputs)
        sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
    return host(sums)


class MemoryFeed:
    """The whole dataset replicated on every device; a batch is the indices of its examples."""

    def __init__(self, driver: Driver, data: Dataset, *, seed: int, batch_size: int, steps_per_epoch: int,
                 eval_batch_size: int, with_train: bool = True):
        self.driver, self.data, self.seed = driver, data, seed
        self.batch_size, self.steps_per_epoch, self.eval_batch_size = batch_size, steps_per_epoch, eval_batch_size
        self.train_data = (driver.put_replicated({"image": data.train_images, "label": data.train_labels})
                           if with_train else None)
        self.eval_data = {"test": driver.put_replicated({"image": data.test_images, "label": data.test_labels})}
        if data.val_size:
            self.eval_data["val"] = driver.put_replicated({"image": data.val_images, "label": data.val_labels})

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        order = epoch_order(self.seed, epoch, self.data.train_size)
        for position in range(start, self.steps_per_epoch):
            yield self.driver.put_indices(order[position * self.batch_size:(position + 1) * self.batch_size])

    def train(self, state, inputs):
        return self.driver.train(state, self.train_data, inputs)

    def evaluate(self, state, split: str = "test") -> dict[str, float]:
        size = self.data.val_size if split == "val" else self.data.test_size
        batches = (self.driver.put_indices(i) for i in eval_indices(size, self.eval_batch_size))
        return _sum(batches, lambda inputs: self.driver.evaluate(state, self.eval_data[split], inputs))


class StreamFeed:
    """Examples read, decoded and augmented by Grain workers on the host, a few batches ahead.

    One pipeline serves the training batches from the first epoch asked for to ``epochs - 1``: its workers
    start once, not once an epoch, and decode the next epoch's first batches while the run evaluates. An
    epoch asked for anywhere else than where the pipeline stands (a resume, an epoch left unfinished)
    starts a new one there.
    """

    def __init__(self, driver: Driver, data: Streamed, *, seed: int, batch_size: int, steps_per_epoch: int,
                 eval_batch_size: int, side: int, crop: str, workers: int, ten_crop: bool, decoder: str | None = None,
                 epochs: int = 1):
        self.driver, self.data, self.seed = driver, data, seed
        self.batch_size, self.steps_per_epoch, self.eval_batch_size = batch_size, steps_per_epoch, eval_batch_size
        self.side, self.crop, self.workers, self.ten_crop, self.decoder = side, crop, workers, ten_crop, decoder
        self.epochs = epochs
        self.processes = (jax.process_index(), jax.process_count())
        self._stream, self._next = None, None  # the training pipeline, and the (epoch, step) it gives next

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        if self._stream is None or self._next != (epoch, start):
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
            self._stream = train_batches(self.data, side=self.side, seed=self.seed, epoch=epoch, start=start,
                                         steps=self.steps_per_epoch, batch=self.batch_size, crop=self.crop,
                                         workers=self.workers, process_index=self.processes[0],
                                         process_count=self.processes[1], decoder=self.decoder,
                                         epochs=max(self.epochs, epoch + 1))
        self._next = None  # known again only once this epoch's batches have all been taken

        def epoch_batches() -> Iterator[dict]:
            for _ in range(start, self.steps_per_epoch):
                yield next(self._stream)
            self._next = (epoch + 1, 0)

        return prefetch(epoch_batches(), self.driver.put_batch)

    def train(self, state, inputs):
        return self.driver.train_batch(state, inputs)

    def evaluate(self, state, split: str = "test") -> dict[str, float]:
        host_batches = eval_batches(self.data, side=self.side, batch=self.eval_batch_size, ten_crop=self.ten_crop,
                                    workers=self.workers, process_index=self.processes[0],
                                    process_count=self.processes[1], split=split)
        return _sum(prefetch(host_batches, self.driver.put_batch),
                    lambda inputs: self.driver.evaluate_batch(state, inputs))


def make_feed(run, driver: Driver, with_train: bool = True) -> MemoryFeed | StreamFeed:
    """The feed for ``run``'s data: in device memory when it was loaded there, else streamed."""
    common = dict(seed=run.config.seed, batch_size=run.config.batch_size, steps_per_epoch=run.steps_per_epoch,
                  eval_batch_size=run.eval_batch_size)
    if run.data.in_memory:
        return MemoryFeed(driver, run.data, with_train=with_train, **common)
    workers = default_workers() if run.config.workers is None else run.config.workers
    return StreamFeed(driver, run.data, side=run.image_side, crop=run.config.crop, workers=workers,
                      ten_crop=run.config.ten_crop, decoder=resolve_backend(run.config.decoder),
                      epochs=run.config.epochs, **common)
