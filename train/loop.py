"""`train_and_evaluate`: the whole run, from a `Config` to a trained, evaluated, checkpointed model.

The order of examples is a pure function of (seed, epoch), the random numbers of each step a pure
function of (seed, step, example), and the checkpoint holds the step: so a run interrupted at any point
and resumed ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

import flaxnets
from train.checkpoint import CheckpointError, Checkpoints
from train.config import Config, ConfigError
from train.parallel import host
from train.report import Reporter
from train.run import Run, build_run

__all__ = ["train_and_evaluate", "TrainError", "Interrupted", "evaluate", "evaluate_checkpoint", "usable_workdir",
           "initialize_distributed"]


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
    kwargs = {}
    if config.coordinator:
        kwargs = {"coordinator_address": config.coordinator, "num_processes": config.num_processes,
                  "process_id": config.process_id}
    jax.distributed.initialize(**kwargs)


def enable_compilation_cache() -> str | None:
    """Keep compiled steps on disk so a rerun (a resume, the next run of the same model) starts at once.

    XLA takes 10-30 s to compile a CNN's train step on a 2-core CPU and more on large models; the cache
    turns a rerun's wait into a file read. The folder is ``$JAX_COMPILATION_CACHE_DIR`` when set (an
    empty value turns the cache off), else ``~/.cache/flaxnets/xla``.
    """
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if folder is None:
        folder = os.path.join(os.path.expanduser("~"), ".cache", "flaxnets", "xla")
    if not folder:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def _check_compatible(meta: dict, run: Run, directory: str) -> None:
    ours = (run.config.arch, run.data.num_classes)
    theirs = (meta.get("arch"), meta.get("num_classes"))
    if ours != theirs:
        raise CheckpointError(f"{directory} holds a checkpoint of {theirs[0]} with {theirs[1]} classes, not "
                              f"{ours[0]} with {ours[1]}; use another --workdir.")
    if meta.get("batch_size") != run.config.batch_size:
        raise CheckpointError(f"{directory} was trained with --batch-size {meta.get('batch_size')}; resume with the "
                              "same batch size (the data order depends on it) or use another --workdir.")
    if meta.get("image_side") != run.image_side:
        raise CheckpointError(f"{directory} was trained on {meta.get('image_side')}-pixel images, this run would "
                              f"use {run.image_side}; use the same --image-size or another --workdir.")
    theirs_args = (meta.get("config") or {}).get("model_args") or {}
    if theirs_args != dict(run.config.model_args):
        raise CheckpointError(f"{directory} was trained with --model-arg {theirs_args or '(none)'}, not "
                              f"{dict(run.config.model_args) or '(none)'}; use the same or another --workdir.")
    theirs_val = (meta.get("config") or {}).get("val_split")
    if str(theirs_val or "") != str(run.config.val_split or ""):
        raise CheckpointError(f"{directory} was trained with --val-split {theirs_val or '(none)'}; resume with the same "
                              "(the training examples depend on it) or use another --workdir.")


def _save_config(run: Run, workdir: str, step: int) -> None:
    """config.json on the first run; a changed config on resume goes beside it, never over it."""
    path = os.path.join(workdir, "config.json")
    # Beside the settings, the one consequence a reader of the file must not miss.
    text = run.config.to_json(best_checkpoint_selected_on=run.selection_split)
    if os.path.exists(path):
        with open(path) as handle:
            if handle.read() == text:
                return
        path = os.path.join(workdir, f"config.resumed-at-step-{step}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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


def evaluate(run: Run, feed, state) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of the validation split (``val_*``, when the run has one)
    and of the test split (``test_*``)."""
    out = {}
    for split in ("val", "test") if run.data.val_size else ("test",):
        sums = feed.evaluate(state, split)
        count = float(sums["count"])
        out[f"{split}_loss"] = float(sums["loss_sum"]) / count
        out[f"{split}_top1"] = float(sums["correct"]) / count
        if run.data.num_classes > 5:
            out[f"{split}_top5"] = float(sums["correct5"]) / count
    return out


def evaluate_checkpoint(run: Run, workdir: str, step: int) -> dict[str, float]:
    """Score checkpoint ``step`` of ``workdir`` on every test example, as training did."""
    checkpoints = Checkpoints(workdir, warn=lambda message: None)
    try:
        meta = checkpoints.read_meta(step)
        _check_compatible(meta, run, workdir)
        state, _, _ = checkpoints.restore(run.init_state(pretrained=False), step=step)
    finally:
        checkpoints.close()
    return evaluate(run, run.feed(with_train=False), run.driver.put_replicated(state))


def train_and_evaluate(config: Config, *, stream=None) -> dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, resuming from ``config.workdir`` if it has checkpoints.

    Returns the final metrics. Raises `ConfigError`, `DataError`, `CheckpointError` or `TrainError`
    with one sentence for the user, and `Interrupted` after checkpointing on SIGINT/SIGTERM.
    """
    enable_compilation_cache()
    if config.lr_find:  # a range test from a copy of the initial state; the run itself is not touched
        from train.lr_find import lr_find

        return lr_find(build_run(config), stream=stream)
    workdir = usable_workdir(config.workdir)
    run = build_run(config)
    fresh = not os.path.isdir(os.path.join(workdir, "checkpoints"))
    if fresh and config.init_from:
        run.pretrained_variables()  # read and converted now: a bad weights file fails before anything is written
    created = not os.path.exists(workdir)
    if jax.process_index() == 0:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--workdir {config.workdir} cannot be made ({error.strerror}).") from None
    total_steps = config.epochs * run.steps_per_epoch
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints,
                              warn=lambda message: print(message, file=sys.stderr, flush=True))
    try:
        # Checked before the Reporter opens its event and metrics files: a workdir of another run is left
        # exactly as it was. A newest checkpoint whose meta cannot be read is set aside like any unreadable one.
        latest = checkpoints.latest_meta()
        if latest is not None:
            _check_compatible(latest[1], run, workdir)
        reporter = Reporter(workdir, total_steps, stream=stream)
        checkpoints.warn = reporter.warn
        try:
            return _train(run, workdir, checkpoints, reporter)
        finally:
            reporter.close()
    except (TrainError, Interrupted):
        raise
    except BaseException:
        # A workdir this call made and that holds no checkpoint yet is not left half-made behind an error.
        if created and jax.process_index() == 0 and not checkpoints.steps():
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
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
    return workdir


def _train(run: Run, workdir: str, checkpoints: Checkpoints, reporter: Reporter) -> dict[str, Any]:
    config = run.config
    existing = checkpoints.steps()  # compatibility was checked by train_and_evaluate
    state = run.init_state(pretrained=not existing)  # a resume only needs the structure
    resumed_sums = None
    if existing:
        state, meta, saved_step = checkpoints.restore(state)
        done, position = meta["epoch"], meta.get("position", 0)
        where = f", {position} of {run.steps_per_epoch} steps into epoch {done + 1}" if position else ""
        reporter.info(f"resuming from {checkpoints.directory}/{saved_step}: {done} of {config.epochs} epochs "
                      f"done{where}.")
        resumed_sums = meta.get("epoch_sums") if position else None
    start_step = int(state.step)
    if jax.process_index() == 0:
        _save_config(run, workdir, start_step)

    driver, feed = run.driver, run.feed()
    state = driver.put_replicated(state)
    reporter.info(f"{config.arch} on {run.data.name}: {flaxnets.count_params(state.params):,} parameters, "
                  f"{run.image_side}x{run.image_side}x{run.data.image_shape[-1]} input, {driver.device_count} "
                  f"device(s) ({driver.kind}), {run.steps_per_epoch} steps per epoch, global batch {config.batch_size}.")
    if run.settings.describe():
        reporter.info(run.settings.describe())

    total_steps = config.epochs * run.steps_per_epoch
    last_good = saved_step if existing else None
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
                    checkpoints.save(step, state, {**run.meta(epoch, position + 1), "epoch_sums": sums})
                    _stopped(stop.signum, step, checkpoints, reporter)
            epoch_time = time.perf_counter() - started
            results = {"epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
                       "train_loss": sums["loss_sum"] / sums["count"], "train_top1": sums["correct"] / sums["count"],
                       **evaluate(run, feed, state),
                       "images_per_sec": epoch_examples / epoch_time, "epoch_time_s": epoch_time}
            reporter.record(results)
            reporter.info(_epoch_line(results, config.epochs))
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps:
                selection = f"{run.selection_split}_top1"
                checkpoints.save(step, state, run.meta(epoch + 1, 0), metrics={selection: results[selection]})
                last_good = step
            if stop.signum:
                checkpoints.save(step, state, run.meta(epoch + 1, 0))
                _stopped(stop.signum, step, checkpoints, reporter)
    if not results:
        reporter.info(f"{workdir} already holds a run of {config.epochs} epochs (step {start_step}); scoring it.")
        results = {"epoch": config.epochs, "step": start_step, **evaluate(run, feed, state)}
    best = checkpoints.best()
    if best is not None:
        results["best_step"], results["best_top1"] = best
        results["best_epoch"] = best[0] // run.steps_per_epoch
        results["best_selected_on"] = run.selection_split
    results["traces"] = dict(driver.traces)
    if config.plots and jax.process_index() == 0:
        _write_plots(run, workdir, state, results["epoch"], reporter)
    return results


def _stopped(signum: int, step: int, checkpoints: Checkpoints, reporter: Reporter) -> None:
    reporter.info(f"{signal.Signals(signum).name}: saved checkpoint {step} in {checkpoints.directory}; run the "
                  "same command to resume.")
    raise Interrupted(signum, step)


def _write_plots(run: Run, workdir: str, state, epoch: int, reporter: Reporter) -> None:
    """The run's plots into WORKDIR/plots (`train.plots`); a failure to plot is a warning, never the end of a run."""
    try:
        from train.figures import write_run_plots

        variables = host({"params": state.params, "batch_stats": state.batch_stats})
        written = write_run_plots(workdir, variables, run.meta(epoch, 0), run.data, schedule=run.schedule,
                                  warn=reporter.warn)
        if written:
            reporter.info(f"plots: {', '.join(os.path.relpath(path, workdir) for path in written)} in {workdir}")
    except Exception as error:  # noqa: BLE001 - plots are never worth losing a trained model over
        reporter.warn(f"warning: no plots ({type(error).__name__}: {error}).")


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
            parts.append(f"{split} loss {results[f'{split}_loss']:.4f} top-1 {results[f'{split}_top1']:.2%}{top5}")
    parts.append(f"{results['images_per_sec']:,.0f} img/s, {results['epoch_time_s']:.1f} s, lr {results['lr']:.3g}")
    return " | ".join(parts)
