"""`train_and_evaluate`: the whole run, from a `Config` to a trained, evaluated, checkpointed model.

The order of examples is a pure function of (seed, epoch), the random numbers of each step a pure
function of (seed, step, example), and the checkpoint holds the step: so a run interrupted at any point
and resumed ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from typing import Any, Iterator

import jax
import numpy as np

import flaxnets
from flaxnets.cli import error_phrase
from train.checkpoint import Checkpoints
from train.config import Config, ConfigError
from train.parallel import host
from train.report import Reporter
from train.resume import flags, resume
from train.run import Run, build_run
from train.scores import evaluate, selection_metrics
from train.text import count
from train.tuning import enable_compilation_cache
from train.workdir import Lock, WorkdirBusy, check_layout

__all__ = ["train_and_evaluate", "TrainError", "Interrupted", "usable_workdir", "initialize_distributed", "held"]


class TrainError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the last good checkpoint."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state was checkpointed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


def initialize_distributed(config: Config) -> None:
    """Start JAX's multi-process runtime when the config asks for it (before any other JAX call)."""
    if not config.distributed:
        return
    # A process silent for `heartbeat_timeout_seconds` is declared dead and the others are stopped (their
    # report: train.stderr_watch), rather than waiting on a collective with it.
    kwargs = {"heartbeat_timeout_seconds": config.heartbeat_timeout_seconds}
    if config.coordinator:
        kwargs.update(coordinator_address=config.coordinator, num_processes=config.num_processes,
                      process_id=config.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the runtime raises, the run cannot start
        raise ConfigError(f"JAX's distributed runtime did not start ({error_phrase(error)}); check --coordinator, "
                          "--num-processes and --process-id.") from None


def _save_config(run: Run, workdir: str, history: list[dict]) -> None:
    """config.json: the settings the run trains with now, and the history of the changes allowed on resume
    (each with the step it applied from). Replaced whole, never half-written."""
    path = os.path.join(workdir, "config.json")
    # Beside the settings, the one consequence a reader of the file must not miss.
    text = run.config.to_json(best_checkpoint_selected_on=run.selection_split,
                              **({"history": history} if history else {}))
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
    """Hold ``workdir`` for this run (`train.workdir.Lock`, taken by process 0; every process learns the
    outcome), or raise `train.workdir.WorkdirBusy` naming the run that holds it."""
    lock = Lock(workdir)
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusy as error:
            refusal = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)) and refusal is None:
            refusal = WorkdirBusy(f"--workdir {workdir} is in use by another training run (process 0 found it locked).")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()


class _SignalFlag:
    """The first SIGINT/SIGTERM asks the loop to checkpoint and stop; handlers are restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train_and_evaluate(config: Config, *, stream=None) -> dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, resuming from ``config.workdir`` if it has checkpoints.

    Returns the final metrics. Raises `ConfigError`, `DataError`, `CheckpointError` or `TrainError`
    with one sentence for the user, and `Interrupted` after checkpointing on SIGINT/SIGTERM.
    """
    if config.lr_find:
        raise ValueError("--lr-find is a range test, not a training run: call train.lr_find.lr_find(config).")
    enable_compilation_cache()
    workdir = usable_workdir(config.workdir)
    created = not os.path.exists(workdir)
    if jax.process_index() == 0:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--workdir {config.workdir} cannot be made ({error.strerror}).") from None
    with held(workdir):
        checkpoints = None
        try:
            run = build_run(config)
            if config.init_from and not os.path.isdir(os.path.join(workdir, "checkpoints")):
                run.pretrained_variables()  # read and converted now: bad weights fail before anything is written
            checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints,
                                      warn=lambda message: print(message, file=sys.stderr, flush=True))
            return _train(run, workdir, checkpoints, stream)
        except Interrupted:
            raise
        except BaseException:
            # A workdir this call made that holds no checkpoint (a bad setting, a loss that diverged before
            # the first save) is not left behind half-made.
            if created and jax.process_index() == 0 and (checkpoints is None or not checkpoints.steps()):
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            if checkpoints is not None:
                checkpoints.close()


def usable_workdir(path: str) -> str:
    """``path`` as an absolute folder the run can write into (made later), or a `ConfigError` saying why not."""
    if not path or not path.strip():
        raise ConfigError("--workdir must name a folder for the run's checkpoints and logs; an empty one would fill "
                          "the current directory.")
    workdir = os.path.abspath(path)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {path} is a file, not a folder.")
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir {path} cannot be made: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {path} cannot be written: {existing} is read-only here.")
    check_layout(workdir)
    return workdir


def _train(run: Run, workdir: str, checkpoints: Checkpoints, stream) -> dict[str, Any]:
    # Decided before the Reporter opens its event and metrics files, so that a workdir of another run, or
    # one trained with other settings, is left exactly as it was.
    start = resume(run, workdir, checkpoints)
    reporter = Reporter(workdir, run.config.total_steps(run.steps_per_epoch), stream=stream)
    checkpoints.warn = reporter.warn
    try:
        if start.step is not None:
            where = (f", {start.position} of {run.steps_per_epoch} steps into epoch {start.epoch + 1}"
                     if start.position else "")
            reporter.info(f"resuming from {checkpoints.directory}/{start.step}: {start.epoch} of {run.config.epochs} "
                          f"epochs done{where}.")
        if start.changes:
            reporter.info(f"note: resuming with {flags({k: new for k, (_, new) in start.changes.items()})} "
                          "(--allow-changes), recorded in the run's history.")
        return _train_epochs(run, workdir, checkpoints, reporter, start.state, start.step, start.epoch_sums,
                             start.history)
    finally:
        reporter.close()


def _train_epochs(run: Run, workdir: str, checkpoints: Checkpoints, reporter: Reporter, state,
                  last_good: int | None, resumed_sums: dict | None, history: list[dict]) -> dict[str, Any]:
    config = run.config
    start_step = int(state.step)
    if jax.process_index() == 0:
        _save_config(run, workdir, history)

    def meta(epoch: int, position: int, **extra) -> dict:
        return {**run.meta(epoch, position), "history": history, **extra}

    driver, feed = run.driver, run.feed()
    state = driver.put_replicated(state)
    reporter.info(f"{config.arch} on {run.data.name}: {flaxnets.count_params(state.params):,} parameters, "
                  f"{run.image_side}x{run.image_side}x{run.data.image_shape[-1]} input, {driver.device_count} "
                  f"device(s) ({driver.kind}), {run.steps_per_epoch} steps per epoch, global batch {config.batch_size}.")
    if run.settings.describe():
        reporter.info(run.settings.describe())
    if config.warmup_epochs_used < config.warmup_epochs and jax.process_index() == 0:  # the run's, not a reader's
        print(f"note: --warmup-epochs {config.warmup_epochs:g} would take more than half of {config.epochs} epoch(s); "
              f"warming up over {config.warmup_epochs_used:g} instead, the rest for the {config.schedule} schedule.",
              file=sys.stderr, flush=True)

    total_steps = config.total_steps(run.steps_per_epoch)
    results: dict[str, Any] = {}
    reporter.start(start_step)
    with _SignalFlag() as stop:
        step = start_step
        while step < total_steps:
            epoch, position = divmod(step, run.steps_per_epoch)
            # An epoch resumed in its middle carries on from the sums its checkpoint recorded, so that its
            # record equals the one of a run never interrupted.
            pending, sums, started = [], resumed_sums, time.perf_counter()
            resumed_sums = None
            epoch_examples = 0
            for position, inputs in enumerate(feed.batches(epoch, position), start=position):
                state, metrics = feed.train(state, inputs)
                pending.append(metrics)
                step += 1
                epoch_examples += config.batch_size
                end_of_epoch = position == run.steps_per_epoch - 1
                if len(pending) >= config.log_every_steps or end_of_epoch or stop.signum:
                    sums = _absorb(pending, sums, step, last_good, checkpoints.directory)
                    pending = []
                    elapsed = time.perf_counter() - started
                    reporter.progress(step, epoch + 1, sums["loss_sum"] / sums["count"],
                                      sums["correct"] / sums["count"], float(run.schedule(step - 1)),
                                      epoch_examples / max(elapsed, 1e-9))
                if stop.signum and not end_of_epoch:  # at an epoch's end, the epoch is finished first
                    checkpoints.save(step, state, meta(epoch, position + 1, epoch_sums=sums))
                    _stopped(stop.signum, step, checkpoints, reporter)
            epoch_time = time.perf_counter() - started
            # A checkpoint is saved with the scores it is ranked by, so its epochs are always evaluated.
            saves = (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps
            scored = saves or (epoch + 1) % config.eval_every_epochs == 0
            results = {"epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
                       "train_loss": sums["loss_sum"] / sums["count"], "train_top1": sums["correct"] / sums["count"],
                       **(evaluate(run, feed, state) if scored else {}),
                       "images_per_sec": epoch_examples / epoch_time, "epoch_time_s": epoch_time}
            reporter.record(results)
            reporter.epoch(_epoch_line(results, config.epochs), results)
            if saves:
                checkpoints.save(step, state, meta(epoch + 1, 0), metrics=selection_metrics(run, results))
                last_good = step
            if stop.signum:
                checkpoints.save(step, state, meta(epoch + 1, 0))
                _stopped(stop.signum, step, checkpoints, reporter)
    if not results:
        reporter.info(f"{workdir} already holds a run of {count(config.epochs, 'epoch')} (step {start_step}); scoring it.")
        results = {"epoch": config.epochs, "step": start_step, **evaluate(run, feed, state)}
    best = checkpoints.best()
    if best is not None:
        results["best_step"], results["best_top1"] = best
        results["best_epoch"] = best[0] // run.steps_per_epoch
        results["best_selected_on"] = run.selection_split
        chosen = checkpoints.manager.metrics(best[0]) or {}
        if "chosen_test_top1" in chosen:  # checkpoints of earlier versions lack it
            results["best_test_top1"] = chosen["chosen_test_top1"]
            results["best_weights"] = "averaged" if chosen.get("chosen_ema") else "trained"  # as --weights names them
        if "chosen_test_top1_one_view" in chosen:
            results["best_test_top1_one_view"] = chosen["chosen_test_top1_one_view"]
    results["traces"] = dict(driver.traces)
    if config.plots and jax.process_index() == 0:  # drawn with the weights the last checkpoint is ranked by
        ranked = state.averaged() if config.ema_decay and selection_metrics(run, results)["chosen_ema"] else state
        _write_plots(run, workdir, ranked, results["epoch"], reporter)
    return results


def _stopped(signum: int, step: int, checkpoints: Checkpoints, reporter: Reporter) -> None:
    reporter.info(f"{signal.Signals(signum).name}: saved checkpoint {step} in {checkpoints.directory}; run the "
                  "same command to resume.")
    raise Interrupted(signum, step)


def _write_plots(run: Run, workdir: str, state, epoch: int, reporter: Reporter) -> None:
    """The run's plots into WORKDIR/plots (`train.figures`); a failure to plot is a warning, never the end of a run."""
    try:
        from train.figures import write_run_plots

        variables = host({"params": state.params, "batch_stats": state.batch_stats})
        written = write_run_plots(workdir, variables, run.meta(epoch, 0), run.data, schedule=run.schedule,
                                  warn=reporter.warn)
        if written:
            reporter.info(f"plots: {', '.join(os.path.relpath(path, workdir) for path in written)} in {workdir}")
    except Exception as error:  # noqa: BLE001 - plots are never worth losing a trained model over
        reporter.warn(f"warning: no plots ({error_phrase(error)}).")


def _absorb(pending: list, sums: dict | None, step: int, last_good: int | None, directory: str) -> dict:
    """Fetch the per-step metrics, stop on the first non-finite loss, and add them to the epoch's sums."""
    values = host(pending)
    first = step - len(values) + 1
    for offset, metrics in enumerate(values):
        if not np.isfinite(metrics["loss_sum"]):
            where = f"{directory}/{last_good}" if last_good is not None else "none (no checkpoint was saved yet)"
            raise TrainError(f"the loss became {float(metrics['loss_sum'])} at step {first + offset}; training "
                             f"stopped without saving. Last good checkpoint: {where}. Try a lower --lr or "
                             f"--clip-grad-norm.")
        sums = {k: float(v) for k, v in metrics.items()} if sums is None else {
            k: sums[k] + float(v) for k, v in metrics.items()}
    return sums


def _epoch_line(results: dict, epochs: int) -> str:
    parts = [f"epoch {results['epoch']}/{epochs}: train loss {results['train_loss']:.4f} acc {results['train_top1']:.2%}"]
    for split in ("val", "test"):
        if f"{split}_top1" in results:
            top5 = f" top-5 {results[f'{split}_top5']:.2%}" if f"{split}_top5" in results else ""
            ema = f" (EMA {results[f'ema_{split}_top1']:.2%})" if f"ema_{split}_top1" in results else ""
            parts.append(f"{split} loss {results[f'{split}_loss']:.4f} top-1 {results[f'{split}_top1']:.2%}{ema}{top5}")
    parts.append(f"{results['images_per_sec']:,.0f} img/s, {results['epoch_time_s']:.1f} s, lr {results['lr']:.3g}")
    return " | ".join(parts)
