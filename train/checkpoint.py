"""Checkpoints in ``WORKDIR/checkpoints`` through Orbax's CheckpointManager.

Each checkpoint holds the whole `TrainState` (params, batch_stats, optimizer state, step, rng) and a JSON
``meta`` item: architecture, class count, dataset facts, epoch and position in the data order. The last
``keep`` checkpoints and the best one are kept: best by the top-1 accuracy the epoch's checkpoint was saved
with (its ``metrics``: ``val_top1`` with a validation split, else ``test_top1``), which Orbax stores beside
it and ranks (``best_fn``). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a process killed mid-save leaves no half checkpoint where a whole one was (the run that holds
the workdir next removes the temporary folder).

Every file of a checkpoint is untrusted (`train.workdir` states the policy): the files Orbax parses when it
lists checkpoints are screened first (`_ScreenedNames`), the meta item is checked key by key (both in
`train.checkpoint_checks`), and any failure to read makes the checkpoint unusable. A training run moves it aside to
``WORKDIR/corrupt_checkpoints`` (never deleted) and uses the previous one, with a warning; a reader leaves
it in place and skips or refuses it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from train.checkpoint_checks import check_meta, describe_error, drained_event_loops, screen
from train.workdir import Unreadable

__all__ = ["Checkpoints", "CheckpointError", "selection_metric"]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to another run; the message says which and why."""


def selection_metric(metrics: dict) -> float:
    """The number a checkpoint is ranked by: validation top-1 when the run had a validation split, else
    test top-1 (``eval_top1`` in checkpoints of earlier versions)."""
    for key in ("val_top1", "test_top1", "eval_top1"):
        if key in metrics:
            return float(metrics[key])
    return float("-inf")


class _ScreenedNames:
    """Orbax's standard step names (``checkpoints/STEP``), listing only the checkpoints `screen` passes.

    A `orbax.checkpoint.path.step.NameFormat`: every listing Orbax makes goes through it, so a checkpoint it
    cannot read is never handed to Orbax's own readers. ``rejected`` maps each step left out to the reason.
    """

    def __init__(self):
        self.base = ocp.step.standard_name_format()
        self.rejected: dict[int, str] = {}
        self._passed: set[int] = set()

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path):
        for metadata in self.base.find_all(base_path):
            if metadata.step in self.rejected:
                continue
            if metadata.step not in self._passed:
                reason = screen(metadata)
                if reason is not None:
                    self.rejected[metadata.step] = reason
                    continue
                self._passed.add(metadata.step)
            yield metadata

    def find_step(self, base_path, step: int):
        if step in self.rejected:
            raise ValueError(f"checkpoint {step} cannot be read ({self.rejected[step]}).")
        return self.base.find_step(base_path, step)

    def forget(self, step: int) -> None:
        """``step`` was moved away: a checkpoint saved at the same step later is a new one."""
        self.rejected.pop(step, None)
        self._passed.discard(step)


class Checkpoints:
    """Save and restore training state; resume picks the newest readable checkpoint.

    A training run (``writable``, holding the workdir's lock) sets aside every checkpoint it finds
    unreadable: moved whole to ``WORKDIR/corrupt_checkpoints``. A reader (``writable=False``: evaluate,
    predict, plots, which may run while a run trains) leaves it in place, warns and skips it when
    listing, and refuses it when it is the one asked for (`train.workdir` states the policy).
    """

    def __init__(self, workdir: str, keep: int = 3, warn: Callable[[str], None] = print, *, writable: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.warn = warn
        self.writable = writable
        self.names = _ScreenedNames()
        self.unusable: dict[int, str] = {}  # every checkpoint found unreadable here, and why
        # Warnings of checkpoints set aside wait for the first `restore`: when none is left, its one
        # sentence says it all.
        self._held_warnings: list[str] | None = []
        # Checkpoints saved without metrics (on SIGTERM mid-epoch) are kept only while among the latest.
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=selection_metric, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax store each checkpoint's metrics beside it, so the ranking survives a restart.
        # A save interrupted by a kill leaves its temporary folder (STEP.orbax-checkpoint-tmp-*): never a
        # checkpoint, so the run holding the workdir removes it.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=selection_metric, best_mode="max",
                                               create=writable, read_only=not writable,
                                               cleanup_tmp_directories=writable, enable_async_checkpointing=False,
                                               step_name_format=self.names)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._act_on_rejected()

    def best(self) -> tuple[int, float] | None:
        """``(step, top-1)`` of the best checkpoint saved with metrics (`selection_metric`), or None."""
        self._reload()
        step = self.manager.best_step()
        if step is None:
            return None
        return step, selection_metric(self.manager.metrics(step) or {})

    def best_step(self) -> int | None:
        """The step of the best checkpoint saved with metrics, or None when none was."""
        best = self.best()
        return None if best is None else best[0]

    def steps(self) -> list[int]:
        self._reload()
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
        """The meta item of checkpoint ``step``, checked (`check_meta`); raises whatever reading it raised."""
        with drained_event_loops():
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return check_meta(meta)

    def restore(self, target: Any, step: int | None = None,
                check: Callable[[dict, int], None] | None = None) -> tuple[Any, dict, int] | None:
        """Restore into the structure of ``target`` (abstract or concrete arrays with shardings).

        With ``step=None`` tries the newest checkpoint first and falls back to older ones when one cannot
        be read. ``check(meta, step)`` is called with each candidate's meta before its state is read, to
        refuse (by raising) a checkpoint that is readable but belongs to another run. Returns ``(state,
        meta, step)``, or None when there is no checkpoint at all.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise CheckpointError(f"{self.directory} has no checkpoint at step {step}; it has {self.steps() or 'none'}.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for candidate in candidates:
            try:
                meta = self.read_meta(candidate)
            except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                self._unusable(candidate, error, explicit=step is not None)
                continue
            if check is not None:
                check(meta, candidate)
            try:
                with drained_event_loops():
                    restored = self.manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                state = restored["state"], check_meta(restored["meta"]), candidate
            except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                self._unusable(candidate, error, explicit=step is not None)
                continue
            self._release_warnings()
            return state
        held, self._held_warnings = self._held_warnings, None
        if self.unusable:
            newest = max(self.unusable)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read (checkpoint {newest}: {self.unusable[newest]}); "
                + (f"they were moved to {self.aside_directory}, so the next run starts afresh."
                   if self.writable else "a training run into this workdir sets them aside."))
        for warning in held or ():
            self.warn(warning)
        return None

    def restore_saved(self, step: int) -> tuple[dict, dict]:
        """``(state, meta)`` of checkpoint ``step`` as saved, its arrays on this process's first device,
        whatever devices they were saved from (restored as saved, the checkpoint of a multi-process run
        names other processes' devices and Orbax refuses it: "Topology mismatch detected")."""
        if step not in self.steps():
            reason = self.names.rejected.get(step)
            raise CheckpointError(f"checkpoint {step} in {self.workdir} cannot be read ({reason})." if reason else
                                  f"{self.directory} has no checkpoint at step {step}; it has "
                                  f"{self.steps() or 'none'}.")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            meta = self.read_meta(step)
            with drained_event_loops():
                metadata = self.manager.item_metadata(step)["state"]
                target = jax.tree_util.tree_map(
                    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                    getattr(metadata, "tree", metadata))
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
        except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
            raise CheckpointError(f"checkpoint {step} in {self.workdir} cannot be read ({_reason(error)}).") from None
        if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
            raise CheckpointError(f"checkpoint {step} in {self.workdir} holds no parameters.")
        return state, meta

    def _release_warnings(self) -> None:
        held, self._held_warnings = self._held_warnings, None
        for warning in held or ():
            self.warn(warning)

    def skipped(self, newer_than: int | None = None) -> list[str]:
        """Warnings for the unreadable checkpoints a reader left out, those newer than ``newer_than``."""
        return [f"warning: checkpoint {step} in {self.workdir} cannot be read ({reason}); skipping it."
                for step, reason in sorted(self.unusable.items()) if newer_than is None or step > newer_than]

    @property
    def aside_directory(self) -> str:
        return os.path.join(self.workdir, "corrupt_checkpoints")

    def _reload(self) -> None:
        self.manager.reload()
        self._act_on_rejected()

    def _act_on_rejected(self) -> None:
        """Apply the policy to checkpoints the listing left out since last time (`_ScreenedNames`)."""
        for step, reason in list(self.names.rejected.items()):
            if self.unusable.get(step) != reason:
                self._set_aside(step, reason)

    def _unusable(self, step: int, error: Exception, explicit: bool) -> None:
        """Apply the policy to checkpoint ``step``, found unreadable (``error``)."""
        reason = _reason(error)
        if explicit:
            raise CheckpointError(f"checkpoint {step} in {self.workdir} cannot be read ({reason}).")
        self.names.rejected[step] = reason
        self._set_aside(step, reason)

    def _set_aside(self, step: int, reason: str) -> None:
        self.unusable[step] = reason
        source = os.path.join(self.directory, str(step))
        if not self.writable:  # a reader moves nothing; `skipped` tells which it left out
            return
        if jax.process_index() == 0 and os.path.isdir(source):
            os.makedirs(self.aside_directory, exist_ok=True)
            target = os.path.join(self.aside_directory, str(step))
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(self.aside_directory, f"{step}.{suffix}"), suffix + 1
            shutil.move(source, target)
            warning = (f"warning: checkpoint {step} cannot be read ({reason}); moved it to {target} and falling "
                       "back to the previous one.")
            if self._held_warnings is None:
                self.warn(warning)
            else:
                self._held_warnings.append(warning)
        self.names.forget(step)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, Unreadable) else describe_error(error)
