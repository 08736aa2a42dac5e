"""Checkpoints in ``WORKDIR/checkpoints`` through Orbax's CheckpointManager.

Each checkpoint holds the whole `TrainState` (params, batch_stats, optimizer state, step, rng) and a JSON
``meta`` item: architecture, class count, dataset facts, epoch and position in the data order. The last
``keep`` checkpoints and the best one by eval top-1 are kept. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a process killed mid-save leaves no half checkpoint
where a whole one was. A checkpoint that cannot be read is moved aside to ``WORKDIR/corrupt_checkpoints``
(never deleted) and the previous one is used, with a warning.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["Checkpoints", "CheckpointError"]


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """When one array of a checkpoint fails to read, Orbax abandons the reads of the others; Python then
    prints each abandoned coroutine's exception as "Exception ignored in ..." with a traceback, whenever
    the garbage collector meets it. The failure is reported once, in one sentence, by `Checkpoints.restore`;
    these echoes are collected here, with the hook for unraisable exceptions silenced, instead."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to another run; the message says which and why."""


class Checkpoints:
    """Save and restore training state; resume picks the newest readable checkpoint."""

    def __init__(self, workdir: str, keep: int = 3, warn: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.warn = warn
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda metrics: metrics["eval_top1"], n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

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
                with _quiet_abandoned_reads():
                    restored = self.manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return restored["state"], restored["meta"], candidate
            except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                if step is not None:
                    raise CheckpointError(f"checkpoint {candidate} in {self.directory} cannot be read: {error}") from None
                self._set_aside(candidate, error)
        if candidates:
            raise CheckpointError(f"none of the checkpoints in {self.directory} can be read; they were moved to "
                                  f"{os.path.join(self.workdir, 'corrupt_checkpoints')}.")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
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
