"""What is checked of a checkpoint's files before and while Orbax reads them: every file of a checkpoint
is untrusted (`train.workdir` states the policy).

The files Orbax parses when it lists checkpoints are screened first (`screen`), the meta item is checked key
by key (`check_meta`), and the reason a read failed is one readable phrase (`describe_error`), reported
once (`drained_event_loops`). `train.checkpoint` applies the policy to what fails here; this module
imports neither Orbax nor JAX.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import warnings
from typing import Any

from train.workdir import Unreadable, read_json

__all__ = ["JSON_LIMIT_BYTES", "check_meta", "describe_error", "drained_event_loops", "screen"]


_DRAIN_TIMEOUT_S = 60.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first waits for the tasks still pending on it.

    Orbax reads a checkpoint's arrays as concurrent tasks and closes its loop as soon as the first read
    fails. The other reads are then abandoned mid-flight, and each echoes to stderr later: a task
    destroyed while pending, an exception never retrieved, or TensorStore's completion callback calling
    into the closed loop ("Event loop is closed", printed from TensorStore's thread with a traceback).
    Waiting for them (at most ``_DRAIN_TIMEOUT_S``; local reads take milliseconds) retrieves their
    outcomes, and so does marking as retrieved the exceptions of reads that had already failed unawaited,
    so the one failure is reported once, by `Checkpoints.restore`. A callback that still arrives after
    close, from a read that outlived the wait, is dropped.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._made: set[asyncio.Task] = set()  # every task of this loop, until it closes

    def create_task(self, coro, **kwargs) -> asyncio.Task:
        task = super().create_task(coro, **kwargs)
        self._made.add(task)
        return task

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            if pending:
                drained = asyncio.gather(*pending, return_exceptions=True)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    self.run_until_complete(asyncio.wait_for(drained, _DRAIN_TIMEOUT_S))
            for task in self._made:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "Task exception was never retrieved" when it is collected
            self._made.clear()
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():
            handle = asyncio.Handle(callback, args, self, context)
            handle.cancel()
            return handle
        return super().call_soon_threadsafe(callback, *args, context=context)


@contextlib.contextmanager
def drained_event_loops():
    """Event loops created inside this block (by Orbax, on any thread) are `_DrainingEventLoop`s.

    Through the event loop policy, which Python deprecates from 3.14 and plans to remove in 3.16; where
    it is gone the block changes nothing, and only the echoes described above come back.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = getattr(asyncio, "DefaultEventLoopPolicy", None)
        previous = asyncio.get_event_loop_policy() if base is not None else None
        if base is not None:
            asyncio.set_event_loop_policy(type("_DrainingPolicy", (base,), {"_loop_factory": _DrainingEventLoop})())
    try:
        yield
    finally:
        if previous is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_event_loop_policy(previous)


def describe_error(error: Exception) -> str:
    """One readable phrase for why a checkpoint could not be read: the error's kind and the first line of
    its message, without the object reprs and pointers to further details that TensorStore appends."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = re.sub(r"\s*See full TensorStore details.*", "", text)
    text = re.sub(r"<[^<>]*>?", "", text).strip(" .;:,")
    text = re.sub(r' (in \w+ database )?at local file "[^"]*"', "", text)  # the checkpoint is named already
    if len(text) > 160:
        text = text[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# The JSON files Orbax reads whole: a checkpoint's metadata, metrics and meta item. The meta holds a
# dataset's class names (ImageNet's 1,000 take 30 KiB); anything near this limit is not ours.
JSON_LIMIT_BYTES = 64 << 20


def screen(metadata: Any) -> str | None:
    """Why Orbax could not list the checkpoint of ``metadata`` (its step and path), or None when it can.

    Orbax reads two files of every checkpoint when it lists them: ``_CHECKPOINT_METADATA`` (its commit
    time) and ``metrics/metrics`` (the ranking of "best"); either one damaged would end every command
    that lists the checkpoints in a traceback. Both may be missing (Orbax copes).
    """
    folder = str(metadata.path)
    meta = os.path.join(folder, "meta", "metadata")
    if os.path.isfile(meta) and os.path.getsize(meta) > JSON_LIMIT_BYTES:
        return f"meta/metadata is larger than {JSON_LIMIT_BYTES:,} bytes"
    for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
        if not os.path.lexists(os.path.join(folder, name)):
            continue
        try:
            values = read_json(os.path.join(folder, name), JSON_LIMIT_BYTES, name)
        except Unreadable as error:
            return str(error)
        if not isinstance(values, dict):
            return f"{name} holds a JSON {type(values).__name__}, not an object"
        if name == "metrics/metrics" and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
            return "metrics/metrics holds other values than finite numbers"
    try:
        metadata.commit_timestamp_nsecs  # parsed by Orbax itself: values it cannot take raise here
    except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
        return f"_CHECKPOINT_METADATA: {describe_error(error)}"
    return None


def check_meta(meta: Any) -> dict:
    """``meta`` if it is a checkpoint's meta item as the trainer writes it (`train.run.Run.meta`), else
    `Unreadable` naming the first key that is missing or of the wrong type: every command reads these keys."""
    from train.config import Config, ConfigError

    def whole(value, low=0):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def numbers(values, positive=False):
        return isinstance(values, list) and values and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in values)

    if not isinstance(meta, dict):
        raise Unreadable(f"its meta item holds a JSON {type(meta).__name__}, not an object")
    dataset = meta.get("dataset")
    checks = {
        "arch": isinstance(meta.get("arch"), str) and bool(meta.get("arch")),
        "num_classes": whole(meta.get("num_classes"), 1),
        "image_side": whole(meta.get("image_side"), 1),
        "epoch": whole(meta.get("epoch")),
        "position": whole(meta.get("position", 0)),
        "batch_size": whole(meta.get("batch_size", 1), 1),
        "dataset": isinstance(dataset, dict),
        "dataset/class_names": isinstance(dataset, dict) and isinstance(dataset.get("class_names"), list)
        and len(dataset["class_names"]) == meta.get("num_classes")
        and all(isinstance(name, str) for name in dataset["class_names"]),
        "dataset/image_shape": isinstance(dataset, dict) and isinstance(dataset.get("image_shape"), list)
        and len(dataset["image_shape"]) == 3 and all(whole(v) for v in dataset["image_shape"])
        and dataset["image_shape"][2] in (1, 3),
        "dataset/mean": isinstance(dataset, dict) and numbers(dataset.get("mean")),
        "dataset/std": isinstance(dataset, dict) and numbers(dataset.get("std"), positive=True),
        # The sums of an epoch saved in its middle (train.loop): what the step's metrics add to.
        "epoch_sums": meta.get("epoch_sums") is None or isinstance(meta["epoch_sums"], dict)
        and {"loss_sum", "correct", "count"} <= set(meta["epoch_sums"]) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in meta["epoch_sums"].values()) and meta["epoch_sums"]["count"] > 0,
        "history": isinstance(meta.get("history", []), list),
    }
    for key, ok in checks.items():
        if not ok:
            raise Unreadable(f"its meta item has no usable {key}")
    if "config" in meta:
        try:
            Config.recorded(meta["config"])
        except ConfigError as error:
            raise Unreadable(f"its meta item records an unusable config ({str(error)[:120]})") from None
    return meta
