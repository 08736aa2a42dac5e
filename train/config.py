"""Everything a run depends on, in one dataclass with units in the names, checked before anything starts.

The command line, a ``--config FILE`` (JSON) and the saved ``WORKDIR/config.json`` all go through
`Config`; epochs, steps and examples are converted in one place (`Config.steps_per_epoch` and the
schedule built from it in `train.optim`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Sequence

__all__ = ["Config", "ConfigError", "parse_args"]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
DTYPES = ("float32", "bfloat16")
PARALLEL = ("shard_map", "pmap")
PIPELINES = ("auto", "memory", "stream")
CROPS = ("inception", "alexnet")


# Facts a saved config.json states about its run but that are not settings: ignored when it is read back.
DERIVED = ("best_checkpoint_selected_on",)


class ConfigError(ValueError):
    """A setting that makes no sense; the message is one sentence meant for the person who typed it."""


@dataclasses.dataclass
class Config:
    """A training run. Defaults train LeNet-5 (ReLU) on the embedded digits set to about 98% in a minute."""

    arch: str = "lenet5_relu"
    dataset: str = "digits"
    data_dir: str | None = None
    # A fraction of the training split held out per class (seeded), or the name of the dataset's own
    # validation split: the best checkpoint is chosen on it. None: chosen on the test split (a leak).
    val_split: str | None = None
    workdir: str = "workdir"
    epochs: int = 20
    batch_size: int = 128  # global, over all devices and processes
    eval_batch_size: int = 500  # global
    optimizer: str = "sgd"  # sgd (momentum), nesterov, adam, adamw
    lr: float = 0.05  # peak learning rate, for the global batch
    momentum: float = 0.9
    schedule: str = "cosine"  # constant, step, cosine, onecycle
    warmup_epochs: float = 1.0
    lr_decay_epochs: tuple[int, ...] = ()  # step schedule: epochs at which lr is multiplied by lr_decay_factor
    lr_decay_factor: float = 0.1
    weight_decay: float = 5e-4  # applied by the optimizer to kernels (not biases nor BatchNorm)
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    dtype: str = "float32"  # computation dtype; parameters and optimizer state stay float32
    parallel: str = "shard_map"
    image_size: int | None = None  # resize to this side; default: the data's, raised to the model's minimum
    augment: bool = True  # random crop with padding, plus flips where the dataset allows them
    # auto: datasets whose training images fit in MEMORY_LIMIT_BYTES live on the devices; larger ones
    # (ImageNet, big folders) stream through Grain with `workers` processes decoding and augmenting.
    pipeline: str = "auto"  # auto, memory, stream
    # Grain worker processes of the streamed pipeline; 0 decodes in this process (with two threads); None:
    # one per core, at most 8 (on 2 cores 0, 1 and 2 workers measured within noise of each other, 2 best).
    workers: int | None = None
    crop: str = "inception"  # streamed training crop: inception (random-resized) or alexnet (224 from 256)
    lighting: float = 0.0  # std of AlexNet's PCA colour noise (the paper uses 0.1); 0 turns it off
    ten_crop: bool = False  # streamed evaluation: average the softmax of 4 corner + centre crops and mirrors
    seed: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    log_every_steps: int = 20
    zero_init_residual: bool = False
    init_from: str | None = None  # torchvision weights (.pth, .safetensors, .npz) to start from
    freeze_backbone: bool = False  # train the class layer(s) only; needs init_from
    # Multi-host: JAX's own distributed runtime; None means a single process unless --distributed.
    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    plots: bool = True  # curves, confusion matrix, predictions and filters in WORKDIR/plots at the end of a run
    # --lr-find: a learning-rate range test instead of training (train.lr_find); the rate grows
    # exponentially from lr_find_start to lr_find_end over lr_find_steps steps.
    lr_find: bool = False
    lr_find_steps: int = 200
    lr_find_start: float = 1e-7
    lr_find_end: float = 10.0

    def validate(self) -> "Config":
        """Raise `ConfigError` for the first setting that cannot work; returns self for chaining."""
        positive = ("epochs", "batch_size", "eval_batch_size", "checkpoint_every_epochs", "keep_checkpoints",
                    "log_every_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}.")
        for name in ("weight_decay", "warmup_epochs", "momentum", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} cannot be negative, got {getattr(self, name)}.")
        if self.label_smoothing >= 1:
            raise ConfigError(f"--label-smoothing must be below 1, got {self.label_smoothing}.")
        if self.momentum >= 1:
            raise ConfigError(f"--momentum must be below 1, got {self.momentum}.")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"--clip-grad-norm must be positive, got {self.clip_grad_norm}.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size must be positive, got {self.image_size}.")
        if not 0 < self.lr_decay_factor <= 1:
            raise ConfigError(f"--lr-decay-factor must be in (0, 1], got {self.lr_decay_factor}.")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"--workers must be a whole number, 0 or more; got {self.workers!r}.")
        if self.lighting < 0:
            raise ConfigError(f"--lighting cannot be negative, got {self.lighting}.")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("dtype", DTYPES),
                              ("parallel", PARALLEL), ("pipeline", PIPELINES), ("crop", CROPS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if self.schedule == "step" and not self.lr_decay_epochs:
            raise ConfigError("--schedule step needs --lr-decay-epochs (e.g. 30,60).")
        if self.freeze_backbone and not self.init_from:
            raise ConfigError("--freeze-backbone needs --init-from WEIGHTS: a random backbone is not worth freezing.")
        if self.init_from and not os.path.isfile(self.init_from):
            raise ConfigError(f"--init-from {self.init_from} is not a file.")
        if not isinstance(self.lr_find_steps, int) or self.lr_find_steps < 10:
            raise ConfigError(f"--lr-find-steps must be a whole number of at least 10, got {self.lr_find_steps!r}.")
        if not 0 < self.lr_find_start < self.lr_find_end:
            raise ConfigError(f"--lr-find-start ({self.lr_find_start}) must be positive and below --lr-find-end "
                              f"({self.lr_find_end}).")
        if self.warmup_epochs >= self.epochs and self.schedule != "constant":
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs}) must be shorter than --epochs ({self.epochs}).")
        return self

    def to_json(self, **derived: Any) -> str:
        """The settings as JSON, with ``derived`` facts of the run beside them (keys of `DERIVED`)."""
        return json.dumps({**dataclasses.asdict(self), **derived}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        values = {k: v for k, v in values.items() if k not in DERIVED}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}.")
        values = dict(values)
        if "lr_decay_epochs" in values:
            values["lr_decay_epochs"] = tuple(values["lr_decay_epochs"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str) -> "Config":
        try:
            with open(path) as handle:
                values = json.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"config file {path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of settings.")
        return cls.from_dict(values)


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 30,60; got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one sentence and exits 2, as it does, but without usage noise."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Train a flaxnets architecture, data-parallel over all devices.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    parser.add_argument("--config", help="JSON file of settings; flags given on the command line win")
    add = parser.add_argument
    add("--arch", help="architecture name (python -m flaxnets lists them)")
    add("--dataset", help="digits (embedded), mnist, fashion_mnist, cifar10, cifar100, folder, or any "
        "tensorflow-datasets image-classification name (imagenet2012, imagenette, ...)")
    add("--data-dir", help="the dataset's original files (IDX .gz, CIFAR tarballs), a folder of class folders "
        "(--dataset folder), or where tensorflow-datasets keeps prepared datasets")
    add("--val-split", help="validation data for choosing the best checkpoint: a FRACTION of the training split "
        "(e.g. 0.1, held out per class with a fixed seed) or the NAME of the dataset's own split (e.g. validation); "
        "without it the best checkpoint is chosen on the test split")
    add("--workdir", help="checkpoints, metrics, plots and config go here; rerun to resume")
    add("--epochs", type=int)
    add("--batch-size", type=int, help="global batch, split over all devices")
    add("--eval-batch-size", type=int)
    add("--optimizer", choices=OPTIMIZERS)
    add("--lr", type=float, help="peak learning rate")
    add("--momentum", type=float)
    add("--schedule", choices=SCHEDULES)
    add("--warmup-epochs", type=float)
    add("--lr-decay-epochs", type=_epochs_list, help="step schedule: e.g. 30,60")
    add("--lr-decay-factor", type=float)
    add("--weight-decay", type=float)
    add("--label-smoothing", type=float)
    add("--clip-grad-norm", type=float)
    add("--dtype", choices=DTYPES)
    add("--parallel", choices=PARALLEL)
    add("--image-size", type=int)
    add("--augment", action=argparse.BooleanOptionalAction)
    add("--pipeline", choices=PIPELINES, help="memory: on the devices; stream: Grain workers; auto: by size")
    add("--workers", type=int, help="Grain worker processes for a streamed dataset (default: one per core, at most 8)")
    add("--crop", choices=CROPS, help="streamed training crop: random-resized (inception) or 224-of-256 (alexnet)")
    add("--lighting", type=float, help="std of AlexNet's PCA colour noise (0.1 in the paper; 0: off)")
    add("--ten-crop", action=argparse.BooleanOptionalAction, help="streamed evaluation over ten crops")
    add("--seed", type=int)
    add("--checkpoint-every-epochs", type=int)
    add("--keep-checkpoints", type=int)
    add("--log-every-steps", type=int)
    add("--zero-init-residual", action=argparse.BooleanOptionalAction)
    add("--init-from", help="start from torchvision weights (.pth, .safetensors, .npz); a new head if classes differ")
    add("--freeze-backbone", action=argparse.BooleanOptionalAction, help="with --init-from: train the head only")
    add("--distributed", action=argparse.BooleanOptionalAction,
        help="call jax.distributed.initialize() (cluster environment detected, or the three flags below)")
    add("--coordinator", help="host:port of process 0, for multi-process runs")
    add("--num-processes", type=int)
    add("--process-id", type=int)
    add("--plots", action=argparse.BooleanOptionalAction, help="write WORKDIR/plots/*.png at the end of the run")
    add("--lr-find", action=argparse.BooleanOptionalAction,
        help="instead of training, a learning-rate range test: plot of loss vs rate and a suggested --lr")
    add("--lr-find-steps", type=int, help="steps of the range test")
    add("--lr-find-start", type=float, help="first rate of the range test")
    add("--lr-find-end", type=float, help="last rate of the range test (it stops earlier if the loss diverges)")
    parser.set_defaults(**{f.name: None for f in dataclasses.fields(Config)})
    parser.epilog = f"Defaults: {json.dumps({k: v for k, v in dataclasses.asdict(defaults).items() if v is not None})}"
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m train") -> Config:
    """Command line -> validated `Config`: defaults, then ``--config FILE``, then the flags given."""
    args = vars(build_parser(prog).parse_args(argv))
    config_file = args.pop("config")
    config = Config.from_file(config_file) if config_file else Config()
    given = {k: v for k, v in args.items() if v is not None}
    if given.get("coordinator") or given.get("num_processes") is not None:
        given.setdefault("distributed", True)
    config = dataclasses.replace(config, **given)
    return config.validate()

