"""Checkpoints in ``WORKDIR/checkpoints`` through Orbax's CheckpointManager.

Each checkpoint holds the whole `TrainState` (params, batch_stats, optimizer state, step, rng) and a JSON
``meta`` item: architecture, class count, dataset facts, epoch and position in the data order. The last
``keep`` checkpoints and the best one are kept: best by the top-1 accuracy the epoch's checkpoint was saved
with (its ``metrics``: ``val_top1`` with a validation split, else ``test_top1``), which Orbax stores beside
it and ranks (``best_fn``). Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a process killed mid-save leaves no half checkpoint
where a whole one was. A checkpoint that cannot be read is moved aside to ``WORKDIR/corrupt_checkpoints``
(never deleted) and the previous one is used, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import warnings
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["Checkpoints", "CheckpointError", "describe_error", "drained_event_loops", "selection_metric"]


_DRAIN_TIMEOUT_S = 60.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first waits for the tasks still pending on it.

    Orbax reads a checkpoint's arrays as concurrent tasks and closes its loop as soon as the first read
    fails. The other reads are then abandoned mid-flight, and each echoes to stderr later: a task
    destroyed while pending, an exception never retrieved, or TensorStore's completion callback calling
    into the closed loop ("Event loop is closed", printed from TensorStore's thread with a traceback).
    Waiting for them (at most ``_DRAIN_TIMEOUT_S``; local reads take milliseconds) retrieves their
    outcomes, so the one failure is reported once, by `Checkpoints.restore`. A callback that still
    arrives after close, from a read that outlived the wait, is dropped.
    """

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            if pending:
                drained = asyncio.gather(*pending, return_exceptions=True)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    self.run_until_complete(asyncio.wait_for(drained, _DRAIN_TIMEOUT_S))
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
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to another run; the message says which and why."""


def selection_metric(metrics: dict) -> float:
    """The number a checkpoint is ranked by: validation top-1 when the run had a validation split, else
    test top-1 (``eval_top1`` in checkpoints of earlier versions)."""
    for key in ("val_top1", "test_top1", "eval_top1"):
        if key in metrics:
            return float(metrics[key])
    return float("-inf")


class Checkpoints:
    """Save and restore training state; resume picks the newest readable checkpoint."""

    def __init__(self, workdir: str, keep: int = 3, warn: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.warn = warn
        # Checkpoints saved without metrics (on SIGTERM mid-epoch) are kept only while among the latest.
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=selection_metric, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax store each checkpoint's metrics beside it, so the ranking survives a restart.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=selection_metric, best_mode="max",
                                               create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def best(self) -> tuple[int, float] | None:
        """``(step, top-1)`` of the best checkpoint saved with metrics (`selection_metric`), or None."""
        self.manager.reload()
        step = self.manager.best_step()
        if step is None:
            return None
        return step, selection_metric(self.manager.metrics(step) or {})

    def best_step(self) -> int | None:
        """The step of the best checkpoint saved with metrics, or None when none was."""
        best = self.best()
        return None if best is None else best[0]

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Write a checkpoint for ``step`` (collectively: every process calls this) and wait for it."""
        if step in self.steps():
            return  # already saved at this step (e.g. a signal right after an epoch-end save)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        with drained_event_loops():
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def latest_meta(self) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest checkpoint whose meta can be read, or None when there is none.

        A checkpoint whose meta cannot be read can be neither checked against the run nor resumed: it is
        moved aside like one whose state cannot be read, and the previous one is tried.
        """
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                self._set_aside(step, error)
        return None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """Restore into the structure of ``target`` (abstract or concrete arrays with shardings).

        With ``step=None`` tries the newest checkpoint first and falls back to older ones when one cannot
        be read. Returns ``(state, meta, step)``, or None when there is no checkpoint at all.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise CheckpointError(f"{self.directory} has no checkpoint at step {step}; it has {self.steps() or 'none'}.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for candidate in candidates:
            try:
                with drained_event_loops():
                    restored = self.manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return restored["state"], restored["meta"], candidate
            except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                if step is not None:
                    raise CheckpointError(f"checkpoint {candidate} in {self.directory} cannot be read "
                                          f"({describe_error(error)}).") from None
                self._set_aside(candidate, error)
        if candidates:
            raise CheckpointError(f"none of the checkpoints in {self.directory} can be read; they were moved to "
                                  f"{os.path.join(self.workdir, 'corrupt_checkpoints')}.")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        reason = describe_error(error)
        source = os.path.join(self.directory, str(step))
        target_dir = os.path.join(self.workdir, "corrupt_checkpoints")
        if jax.process_index() == 0 and os.path.isdir(source):
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, str(step))
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(target_dir, f"{step}.{suffix}"), suffix + 1
            shutil.move(source, target)
            self.warn(f"warning: checkpoint {step} cannot be read ({reason}); moved it to {target} and "
                      "falling back to the previous one.")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
