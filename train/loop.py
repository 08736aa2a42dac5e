"""`train_and_evaluate`: the whole run, from a `Config` to a trained, evaluated, checkpointed model.

The order of examples is a pure function of (seed, epoch), the random numbers of each step a pure
function of (seed, step, example), and the checkpoint holds the step: so a run interrupted at any point
and resumed ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

import flaxnets
from flaxnets.models.googlenet import AUX_LOSS_WEIGHT
from train import step as steps
from train.checkpoint import CheckpointError, Checkpoints
from train.config import Config, ConfigError
from train.data import Dataset, Streamed, ensure_statistics, epoch_order, fit_in_memory, load_dataset
from train.data.stream import require_grain
from train.feed import make_feed
from train.optim import after_fence, make_optimizer
from train.parallel import AXIS, host, make_driver
from train.report import Reporter

__all__ = ["train_and_evaluate", "TrainError", "Run", "build_run", "epoch_order", "initialize_distributed"]


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


def image_side(config: Config, data: Dataset | Streamed, arch: str) -> int:
    """The side images are resized to: --image-size, or the data's own (the architecture's native input
    size for images of varying size), raised to the model's minimum."""
    smallest = flaxnets.min_input_size(arch, in_channels=data.image_shape[-1])
    if config.image_size is not None:
        if config.image_size < smallest:
            raise ConfigError(f"--image-size {config.image_size} is smaller than {arch}'s minimum input of "
                              f"{smallest}x{smallest} pixels.")
        return config.image_size
    height, width = data.image_shape[:2]
    if height is None or width is None:
        return max(flaxnets.get_spec(arch).input_size, smallest)
    return max(height, width, smallest)


@dataclasses.dataclass
class Run:
    """The pieces of a run that do not change while it trains (built by `build_run`)."""

    config: Config
    data: Dataset | Streamed
    model: Any
    tx: Any
    schedule: Any
    preprocess: steps.Preprocess
    steps_per_epoch: int
    image_side: int
    eval_batch_size: int
    overrides: dict

    def meta(self, epoch: int, position: int) -> dict:
        """What a checkpoint records beside the state."""
        return {
            "arch": self.config.arch,
            "num_classes": self.data.num_classes,
            "image_side": self.image_side,
            "dataset": self.data.describe(),
            "epoch": epoch,
            "position": position,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "config": json.loads(self.config.to_json()),
        }

    def init_state(self, pretrained: bool = True) -> steps.TrainState:
        """Fresh parameters, optimizer state and the run's base key, all from ``config.seed``; with
        ``pretrained`` and ``--init-from``, the parameters of those weights instead.

        Parameters are drawn with the "rbg" generator: XLA compiles threefry's unrolled rounds once per
        parameter tensor, which made ResNet-18's initialisation compile for 28 s on 2 CPU cores against
        9 s with rbg. The per-step randomness (augmentation, dropout) stays threefry, whose values do
        not depend on how a computation is sharded.
        """
        init_key = jax.random.key(self.config.seed, impl="rbg")
        run_key = jax.random.fold_in(jax.random.key(self.config.seed), 1)
        channels = self.data.image_shape[-1]
        sample = jnp.zeros((1, self.image_side, self.image_side, channels), self.preprocess.dtype)

        @jax.jit
        def init():
            variables = self.model.init({"params": init_key, "dropout": init_key}, sample, train=False)
            params = variables["params"]
            return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    batch_stats=variables.get("batch_stats", {}), opt_state=self.tx.init(params),
                                    rng=jax.random.key_data(run_key))
        state = init()
        if pretrained and self.config.init_from:
            state = self._with_pretrained(state)
        return state

    def _with_pretrained(self, state: steps.TrainState) -> steps.TrainState:
        """``state`` with the parameters and statistics of ``--init-from``, a fresh head where classes differ.

        Colour weights on grey images: a first-layer kernel made for 3 input channels is summed over them,
        which gives the same response to a grey image as the colour network gives to its RGB copy (the
        usual way to reuse ImageNet weights on MNIST-like data).
        """
        from flaxnets.convert import load_pretrained

        variables = load_pretrained(self.config.arch, self.config.init_from, self.data.num_classes,
                                    rng=self.config.seed, **self.overrides)
        for name in ("params", "batch_stats"):
            theirs = flatten_dict(dict(variables.get(name, {})))
            ours = flatten_dict(jax.tree_util.tree_map(jnp.shape, dict(getattr(state, name))))
            for key, shape in ours.items():
                given = np.shape(theirs.get(key))
                if given == shape:
                    continue
                if len(shape) == 4 and given[:2] + given[3:] == shape[:2] + shape[3:] and (given[2], shape[2]) == (3, 1):
                    theirs[key] = np.asarray(theirs[key]).sum(axis=2, keepdims=True)
                    continue
                raise ConfigError(
                    f"--init-from {self.config.init_from} does not fit this run: {'/'.join(key)} is "
                    f"{given} in the weights and {shape} here ({self.data.name} images have "
                    f"{self.data.image_shape[-1]} channel(s) at {self.image_side}x{self.image_side}).")
            variables[name] = unflatten_dict(theirs)
        params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
        return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                             opt_state=self.tx.init(params))


def build_run(config: Config, data: Dataset | None = None, device_count: int | None = None) -> Run:
    """Check the config against the data, the architecture and the devices; build model and optimizer."""
    spec = flaxnets.get_spec(config.arch)
    device_count = device_count or jax.device_count()
    if config.batch_size % device_count:
        raise ConfigError(f"--batch-size {config.batch_size} does not split evenly over {device_count} devices; "
                          f"use a multiple of {device_count}.")
    data = data or load_dataset(config.dataset, config.data_dir)
    side = image_side(config, data, config.arch)
    data = fit_in_memory(data, side, config.pipeline)
    if isinstance(data, Streamed):
        require_grain()  # before the statistics and the compilations, not at the first batch
        data = ensure_statistics(data, config.data_dir)
    elif config.ten_crop:
        raise ConfigError(f"--ten-crop applies to streamed datasets; {data.name} is held in memory "
                          "(--pipeline stream streams it).")
    steps_per_epoch = data.train_size // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {data.train_size} training "
                          f"examples of {data.name}.")
    overrides = {}
    if config.zero_init_residual:
        if spec.family != "resnet":
            raise ConfigError(f"--zero-init-residual applies to ResNets, not {config.arch}.")
        overrides["zero_init_residual"] = True
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    # On a CPU the run takes flaxnets.cpu's kernels and gradient fence: same numbers, faster steps.
    cpu = flaxnets.cpu.is_cpu_backend()
    model = flaxnets.create_model(config.arch, num_classes=data.num_classes, dtype=dtype, bn_axis_name=AXIS,
                                  cpu_kernels=cpu, **overrides)
    in_memory = isinstance(data, Dataset)  # streamed examples arrive cropped and flipped by the host
    preprocess = steps.Preprocess(mean=data.mean, std=data.std, size=side, augment=config.augment,
                                  crop_padding=data.crop_padding if in_memory else 0, flip=data.flip and in_memory,
                                  dtype=dtype, lighting=config.lighting, eigval=data.eigval, eigvec=data.eigvec)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    if config.freeze_backbone:
        from flaxnets.convert import head_mask

        # The class layers train; every other parameter gets a zero update (and no optimizer state).
        labels = lambda params: jax.tree_util.tree_map(lambda head: "head" if head else "frozen",
                                                       head_mask(config.arch, params))
        tx = optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)
    if cpu:
        tx = after_fence(flaxnets.cpu.tie_gradients(), tx)
    eval_batch = math.ceil(config.eval_batch_size / device_count) * device_count
    return Run(config, data, model, tx, schedule, preprocess, steps_per_epoch, side, eval_batch, overrides)


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


def _save_config(run: Run, workdir: str, step: int) -> None:
    """config.json on the first run; a changed config on resume goes beside it, never over it."""
    path = os.path.join(workdir, "config.json")
    text = run.config.to_json()
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
    """Loss, top-1 and top-5 over every test example."""
    sums = feed.evaluate(state)
    count = float(sums["count"])
    out = {"eval_loss": float(sums["loss_sum"]) / count, "eval_top1": float(sums["correct"]) / count}
    if run.data.num_classes > 5:
        out["eval_top5"] = float(sums["correct5"]) / count
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
    driver = make_driver(run.config.parallel, steps.train_step,
                         steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess,
                                    num_classes=run.data.num_classes))
    return evaluate(run, make_feed(run, driver, with_train=False), driver.put_replicated(state))


def train_and_evaluate(config: Config, *, stream=None) -> dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, resuming from ``config.workdir`` if it has checkpoints.

    Returns the final metrics. Raises `ConfigError`, `DataError`, `CheckpointError` or `TrainError`
    with one sentence for the user, and `Interrupted` after checkpointing on SIGINT/SIGTERM.
    """
    enable_compilation_cache()
    if config.lr_find:  # a range test from a copy of the initial state; the run itself is not touched
        from train.lr_find import lr_find

        return lr_find(config, stream=stream)
    run = build_run(config)
    workdir = os.path.abspath(config.workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    total_steps = config.epochs * run.steps_per_epoch
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints,
                              warn=lambda message: print(message, file=stream or sys.stdout, flush=True))
    try:
        # Checked before the Reporter opens its event and metrics files: a workdir of another run is left
        # exactly as it was. A newest checkpoint whose meta cannot be read is set aside like any unreadable one.
        latest = checkpoints.latest_meta()
        if latest is not None:
            _check_compatible(latest[1], run, workdir)
        reporter = Reporter(workdir, total_steps, stream=stream)
        checkpoints.warn = reporter.info
        try:
            return _train(run, workdir, checkpoints, reporter)
        finally:
            reporter.close()
    finally:
        checkpoints.close()


def _train(run: Run, workdir: str, checkpoints: Checkpoints, reporter: Reporter) -> dict[str, Any]:
    config = run.config
    spec = flaxnets.get_spec(config.arch)
    existing = checkpoints.steps()  # compatibility was checked by train_and_evaluate
    state = run.init_state(pretrained=not existing)  # a resume only needs the structure
    if existing:
        state, meta, saved_step = checkpoints.restore(state)
        reporter.info(f"resuming from {checkpoints.directory}/{saved_step} (epoch {meta['epoch']}, step {saved_step}).")
    start_step = int(state.step)
    if jax.process_index() == 0:
        _save_config(run, workdir, start_step)

    aux_weight = AUX_LOSS_WEIGHT if spec.family == "googlenet" else 0.0
    driver = make_driver(
        config.parallel,
        steps.bind(steps.train_step, model=run.model, tx=run.tx, preprocess=run.preprocess,
                   num_classes=run.data.num_classes, label_smoothing=config.label_smoothing,
                   aux_loss_weight=aux_weight),
        steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess, num_classes=run.data.num_classes),
    )
    feed = make_feed(run, driver)
    state = driver.put_replicated(state)
    reporter.info(f"{config.arch} on {run.data.name}: {flaxnets.count_params(state.params):,} parameters, "
                  f"{run.image_side}x{run.image_side}x{run.data.image_shape[-1]} input, {driver.device_count} "
                  f"device(s) ({driver.kind}), {run.steps_per_epoch} steps per epoch, global batch {config.batch_size}.")

    total_steps = config.epochs * run.steps_per_epoch
    last_good = saved_step if existing else None
    results: dict[str, Any] = {}
    reporter.start(start_step)
    with _SignalFlag() as stop:
        step = start_step
        while step < total_steps:
            epoch, position = divmod(step, run.steps_per_epoch)
            pending, sums, started = [], None, time.perf_counter()
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
                if stop.signum:
                    checkpoints.save(step, state, run.meta(*divmod(step, run.steps_per_epoch)))
                    reporter.info(f"{signal.Signals(stop.signum).name}: saved checkpoint {step} in "
                                  f"{checkpoints.directory}; run the same command to resume.")
                    raise Interrupted(stop.signum, step)
            epoch_time = time.perf_counter() - started
            results = {"epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
                       "train_loss": sums["loss_sum"] / sums["count"], "train_top1": sums["correct"] / sums["count"],
                       **evaluate(run, feed, state),
                       "images_per_sec": epoch_examples / epoch_time, "epoch_time_s": epoch_time}
            reporter.record(results)
            reporter.info(_epoch_line(results, config.epochs))
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps:
                checkpoints.save(step, state, run.meta(epoch + 1, 0), metrics={"eval_top1": results["eval_top1"]})
                last_good = step
    if not results:
        reporter.info(f"{workdir} already holds a run of {config.epochs} epochs (step {start_step}); scoring it.")
        results = {"epoch": config.epochs, "step": start_step, **evaluate(run, feed, state)}
    results["traces"] = dict(driver.traces)
    if config.plots and jax.process_index() == 0:
        _write_plots(run, workdir, state, results["epoch"], reporter)
    return results


def _write_plots(run: Run, workdir: str, state, epoch: int, reporter: Reporter) -> None:
    """The run's plots into WORKDIR/plots (`train.plots`); a failure to plot is a warning, never the end of a run."""
    try:
        from train.plots import write_run_plots

        variables = host({"params": state.params, "batch_stats": state.batch_stats})
        written = write_run_plots(workdir, variables, run.meta(epoch, 0), run.data, schedule=run.schedule,
                                  warn=reporter.info)
        if written:
            reporter.info(f"plots: {', '.join(os.path.relpath(path, workdir) for path in written)} in {workdir}")
    except Exception as error:  # noqa: BLE001 - plots are never worth losing a trained model over
        reporter.info(f"warning: no plots ({type(error).__name__}: {error}).")


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
    top5 = f" top-5 {results['eval_top5']:.2%}" if "eval_top5" in results else ""
    return (f"epoch {results['epoch']}/{epochs}: train loss {results['train_loss']:.4f} acc {results['train_top1']:.2%}"
            f" | test loss {results['eval_loss']:.4f} top-1 {results['eval_top1']:.2%}{top5} | "
            f"{results['images_per_sec']:,.0f} img/s, {results['epoch_time_s']:.1f} s, lr {results['lr']:.3g}")
