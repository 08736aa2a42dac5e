"""Everything a run depends on, in one dataclass with units in the names, checked before anything starts.

The command line (parsed by `train.arguments`), a ``--config FILE`` (JSON) and the saved
``WORKDIR/config.json`` all go through `Config`; epochs become steps in one place (`Config.total_steps` and
`Config.warmup_steps`, at the steps per epoch `train.run.build_run` finds for the data).

Over 400 lines: `Config` is one table of every setting of a run, each with its unit and a comment, and
`RESUME` classifies the same fields; the checks below it read those fields and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any

__all__ = ["Config", "ConfigError"]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
DTYPES = ("float32", "bfloat16")
PARALLEL = ("shard_map", "pmap")
PIPELINES = ("auto", "memory", "stream")
CROPS = ("inception", "alexnet")
DECODERS = ("auto", "opencv", "pillow")
AUTO_AUGMENT = ("ta_wide", "ra")
MIX_MODES = ("batch", "elem")
# Which weights of a checkpoint the commands use (train.inference.load_variables): those it was ranked by
# ("chosen": the better of the trained and the averaged ones on the selection split, for a run with
# --ema-decay), the trained ones, or their moving average.
WEIGHT_SETS = ("chosen", "trained", "averaged")


# Facts a saved config.json states about its run but that are not settings: ignored when it is read back.
DERIVED = ("best_checkpoint_selected_on", "history")

SEED_LIMIT = 2**32  # seeds are 0 to 2**32 - 1, as numpy's and PyTorch's generators take them
IMAGE_SIDE_LIMIT = 4096  # the largest side flaxnets.min_input_size searches; far beyond any classic CNN's input
WORKERS_LIMIT = 256
LR_FIND_STEPS_LIMIT = 100_000
STEPS_LIMIT = 2**31 - 1  # TrainState.step is an int32


class ConfigError(ValueError):
    """A setting that makes no sense; the message is one sentence meant for the person who typed it."""


@dataclasses.dataclass
class Config:
    """A training run. Defaults train LeNet-5 (ReLU) on the embedded digits set to about 98% in a minute."""

    arch: str = "lenet5_relu"  # a registry name, or FILE.py:FACTORY / MODULE:FACTORY (train.archs)
    # Options of the architecture (create_model keywords), from --model-arg KEY=VALUE.
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    # A fraction of the training split held out per class (seeded), or the name of the dataset's own
    # validation split: the best checkpoint is chosen on it. None: chosen on the test split (a leak).
    val_split: str | float | None = None
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
    # one per core (train.data.stream.default_workers).
    workers: int | None = None
    # How streamed JPEGs are decoded to their crops (train.data.jpeg): auto (opencv when installed, the
    # faster; else pillow), opencv or pillow; both decode at reduced size where the crop allows.
    decoder: str = "auto"
    crop: str = "inception"  # streamed training crop: inception (random-resized) or alexnet (224 from 256)
    lighting: float = 0.0  # std of AlexNet's PCA colour noise (the paper uses 0.1); 0 turns it off
    ten_crop: bool = False  # streamed evaluation: average the softmax of 4 corner + centre crops and mirrors
    # Evaluation averages the softmax of each image and its mirror (datasets whose training flips images).
    eval_flip: bool = False
    seed: int = 0
    checkpoint_every_epochs: int = 1
    # Evaluate every this many epochs; the epochs that save a checkpoint and the last are always evaluated.
    eval_every_epochs: int = 1
    keep_checkpoints: int = 3
    log_every_steps: int = 20
    zero_init_residual: bool = False
    # Recipe primitives (flaxnets.augment, flaxnets.autoaugment, flaxnets.training; train.recipes); all off.
    recipe: str | None = None  # the named recipe these settings started from (train/recipes/NAME.json)
    auto_augment: str | None = None  # ta_wide (TrivialAugment Wide) or ra (RandAugment), each training image
    ra_num_ops: int = 2
    ra_magnitude: int = 9  # bin of 31
    random_erase: float = 0.0  # probability of erasing a random rectangle of each training image
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix_alpha: float = 0.0  # the same for cutmix
    mix_prob: float = 1.0  # probability that a batch (or example) is mixed at all
    mix_switch_prob: float = 0.5  # with both on: probability of cutmix rather than mixup
    mix_mode: str = "batch"  # one lambda per batch, or per example (elem)
    ema_decay: float = 0.0  # per-step decay of the weights' moving average; 0: none
    drop_path_rate: float = 0.0  # ResNets: stochastic depth of the last block (0 for the first, linear between)
    decay_norm_and_bias: bool = False  # weight decay on biases and normalisation parameters too
    # torchvision weights to start from: a published set's name (IMAGENET1K_V1, flaxnets.hub), a URL or a
    # .pth/.safetensors/.npz file.
    init_from: str | None = None
    freeze_backbone: bool = False  # train the class layer(s) only; needs init_from
    # Normalisation of pixels scaled to [0, 1]: one value per channel, or one for all. None: the published
    # --init-from weights' own (averaged over RGB for grey images), else the training data's statistics.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
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
    # Resume with settings that change the result (RESUME below) all the same, recording the change in the
    # run's history (config.json and the checkpoints' metadata).
    allow_changes: bool = False
    # Multi-host: a process that sends no heartbeat for this long is declared dead, and the others stop
    # (JAX's own default is 100 s).
    heartbeat_timeout_seconds: int = 30

    def validate(self) -> "Config":
        """Raise `ConfigError` for the first setting that cannot work; returns self for chaining."""
        _check_types(self)
        for name in ("lr", "momentum", "warmup_epochs", "lr_decay_factor", "weight_decay", "label_smoothing",
                     "clip_grad_norm", "lighting", "lr_find_start", "lr_find_end", "random_erase", "mixup_alpha",
                     "cutmix_alpha", "mix_prob", "mix_switch_prob", "ema_decay", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
        if not self.workdir or not str(self.workdir).strip():
            raise ConfigError("--workdir must name a folder for the run's checkpoints and logs; an empty one would "
                              "fill the current directory.")
        positive = ("epochs", "batch_size", "eval_batch_size", "checkpoint_every_epochs", "eval_every_epochs",
                    "keep_checkpoints", "log_every_steps")
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
        _check_ranges(self)
        _check_recipe_settings(self)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("dtype", DTYPES),
                              ("parallel", PARALLEL), ("pipeline", PIPELINES), ("crop", CROPS),
                              ("decoder", DECODERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if self.schedule == "step" and not self.lr_decay_epochs:
            raise ConfigError("--schedule step needs --lr-decay-epochs (e.g. 30,60).")
        early = [epoch for epoch in self.lr_decay_epochs if epoch < self.warmup_epochs_used]
        if self.schedule == "step" and early:
            raise ConfigError(f"--lr-decay-epochs {','.join(map(str, early))} would decay the rate within the "
                              f"{self.warmup_epochs_used:g}-epoch warm-up, which rises to --lr; decay at its end or "
                              "later, or shorten --warmup-epochs.")
        if self.eval_flip and self.ten_crop:
            raise ConfigError("--ten-crop already scores the mirror image of each crop; drop --eval-flip.")
        if self.freeze_backbone and not self.init_from:
            raise ConfigError("--freeze-backbone needs --init-from WEIGHTS: a random backbone is not worth freezing.")
        if self.init_from:
            _check_init_from(self.arch, self.init_from)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (not values or not all(math.isfinite(v) for v in values)):
                raise ConfigError(f"--{name} takes one finite number per channel (or one for all), got {values!r}.")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std must be positive, got {','.join(f'{v:g}' for v in self.std)}.")
        if not isinstance(self.lr_find_steps, int) or self.lr_find_steps < 10:
            raise ConfigError(f"--lr-find-steps must be a whole number of at least 10, got {self.lr_find_steps!r}.")
        if not 0 < self.lr_find_start < self.lr_find_end:
            raise ConfigError(f"--lr-find-start ({self.lr_find_start}) must be positive and below --lr-find-end "
                              f"({self.lr_find_end}).")
        return self

    def changes(self, recorded: "Config") -> dict[str, tuple[Any, Any]]:
        """``{name: (recorded value, this value)}`` of the settings that change a run's result (`RESUME`)
        and differ between ``recorded`` and this config."""
        return {name: (getattr(recorded, name), getattr(self, name)) for name, kind in RESUME.items()
                if kind != "free" and getattr(recorded, name) != getattr(self, name)}

    @property
    def warmup_epochs_used(self) -> float:
        """The warm-up the schedule runs: `warmup_epochs`, but at most half the run, so that the schedule
        has the other half (a constant one reaches --lr, a decaying one has room to decay)."""
        return min(self.warmup_epochs, self.epochs / 2)

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in steps, at ``steps_per_epoch`` (`train.run.Run.steps_per_epoch`)."""
        return self.epochs * steps_per_epoch

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """The learning-rate warm-up in steps (`warmup_epochs_used`), at ``steps_per_epoch``."""
        return int(round(self.warmup_epochs_used * steps_per_epoch))

    def to_json(self, **derived: Any) -> str:
        """The settings as JSON, with ``derived`` facts of the run beside them (keys of `DERIVED`)."""
        return json.dumps({**dataclasses.asdict(self), **derived}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """The settings of a JSON object (a config file's, or one recorded in a checkpoint); `ConfigError`
        for a key that is no setting or a value of the wrong type."""
        values = {k: v for k, v in values.items() if k not in DERIVED}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}.")
        values = dict(values)
        for name in ("lr_decay_epochs", "mean", "std"):  # JSON has lists where the config holds tuples
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        config = cls(**values)
        _check_types(config)
        return config

    @classmethod
    def recorded(cls, values: dict[str, Any]) -> "Config":
        """The settings a checkpoint recorded (`train.run.Run.meta`): as `from_dict`, but keys this version no
        longer has are left out, so that a run of an earlier version still resumes, evaluates and predicts."""
        if not isinstance(values, dict):
            raise ConfigError("the recorded settings are not a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in values.items() if k in known})

    @classmethod
    def from_recipe(cls, name: str) -> "Config":
        """The defaults with the settings of recipe ``name`` (`train.recipes`) over them, ``recipe`` set."""
        from train.recipes import RecipeError, load_recipe

        try:
            recipe = load_recipe(name)
        except RecipeError as error:
            raise ConfigError(str(error)) from None
        if "recipe" in recipe.settings:
            raise ConfigError(f"recipe file {recipe.path}: settings cannot name another recipe.")
        try:
            config = cls.from_dict({**dataclasses.asdict(cls()), **recipe.settings})
            _check_types(config)
        except ConfigError as error:
            raise ConfigError(f"recipe file {recipe.path}: {error}") from None
        return dataclasses.replace(config, recipe=recipe.label)

    @classmethod
    def from_file(cls, path: str, base: "Config | None" = None) -> "Config":
        """Settings from a JSON file, or from a JSON object given in place of a file name (``'{"lr": 0.1}'``),
        over those of ``base`` (default: the defaults)."""
        where = f"config file {path}"
        try:
            if path.lstrip().startswith(("{", "[")):
                where = "--config's JSON"
                values = json.loads(path)
            else:
                with open(path) as handle:
                    values = json.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; give a JSON file of settings.") from None
        except (UnicodeDecodeError, OSError) as error:
            raise ConfigError(f"{where} cannot be read ({error}).") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where} is not valid JSON ({error.msg}, line {error.lineno}).") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must hold a JSON object of settings, not a JSON {type(values).__name__}.")
        if isinstance(values.get("recipe"), str) and (base is None or base.recipe != values["recipe"]):
            base = cls.from_recipe(values["recipe"])  # under the file's own settings, as --recipe would put it
        try:
            config = cls.from_dict({**(dataclasses.asdict(base) if base else {}), **values})
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        return config


# What each setting is to a run resumed from its checkpoints (`Config.changes`, checked by train.loop):
# - "fixed": what the checkpoint is made of (its shapes, its data, the order of examples an epoch in progress
#   follows); never changes in a workdir;
# - "result": changes the numbers the run produces; a resume with another value is refused unless
#   --allow-changes, which records the change in the run's history;
# - "free": how the run is executed, stored or watched, not what it computes; changes freely (evaluation
#   batches and the device count change sums only in their last bits).
RESUME: dict[str, str] = {
    "arch": "fixed", "model_args": "fixed", "dataset": "fixed", "val_split": "fixed", "batch_size": "fixed",
    "image_size": "fixed",
    "epochs": "result", "optimizer": "result", "lr": "result", "momentum": "result", "schedule": "result",
    "warmup_epochs": "result", "lr_decay_epochs": "result", "lr_decay_factor": "result",
    "weight_decay": "result", "label_smoothing": "result", "clip_grad_norm": "result", "dtype": "result",
    "augment": "result", "pipeline": "result", "decoder": "result", "crop": "result", "lighting": "result",
    "ten_crop": "result", "eval_flip": "result",
    "seed": "result", "zero_init_residual": "result", "init_from": "result", "freeze_backbone": "result",
    "mean": "result", "std": "result",
    "auto_augment": "result", "ra_num_ops": "result", "ra_magnitude": "result", "random_erase": "result",
    "mixup_alpha": "result", "cutmix_alpha": "result", "mix_prob": "result", "mix_switch_prob": "result",
    "mix_mode": "result", "drop_path_rate": "result", "decay_norm_and_bias": "result",
    # Whether the checkpoints hold a moving average of the weights is their make-up; its decay a result.
    "ema_decay": "result", "recipe": "free",
    "data_dir": "free", "workdir": "free", "eval_batch_size": "free", "parallel": "free", "workers": "free",
    "checkpoint_every_epochs": "free", "eval_every_epochs": "free", "keep_checkpoints": "free",
    "log_every_steps": "free",
    "distributed": "free", "coordinator": "free", "num_processes": "free", "process_id": "free",
    "heartbeat_timeout_seconds": "free", "plots": "free", "lr_find": "free", "lr_find_steps": "free",
    "lr_find_start": "free", "lr_find_end": "free", "allow_changes": "free",
}


def _check_ranges(config: Config) -> None:
    """Raise `ConfigError` for a number outside what the run can use (each flag's own range)."""
    if not 0 <= config.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {config.seed}.")
    if config.image_size is not None and config.image_size > IMAGE_SIDE_LIMIT:
        raise ConfigError(f"--image-size must be at most {IMAGE_SIDE_LIMIT}, got {config.image_size}.")
    if config.workers is not None and config.workers > WORKERS_LIMIT:
        raise ConfigError(f"--workers must be at most {WORKERS_LIMIT}, got {config.workers}.")
    if config.lr_find_steps > LR_FIND_STEPS_LIMIT:
        raise ConfigError(f"--lr-find-steps must be at most {LR_FIND_STEPS_LIMIT:,}, got {config.lr_find_steps}.")
    if config.epochs > STEPS_LIMIT:
        raise ConfigError(f"--epochs must be at most {STEPS_LIMIT:,}, got {config.epochs}.")
    if any(epoch < 1 for epoch in config.lr_decay_epochs):
        raise ConfigError(f"--lr-decay-epochs must be positive epochs, got "
                          f"{','.join(map(str, config.lr_decay_epochs))}.")
    if not 1 <= config.heartbeat_timeout_seconds <= 3600:
        raise ConfigError(f"--heartbeat-timeout-seconds must be from 1 to 3600, got "
                          f"{config.heartbeat_timeout_seconds}.")
    if config.num_processes is not None and config.num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {config.num_processes}.")
    if config.process_id is not None and not 0 <= config.process_id < (config.num_processes or 1):
        raise ConfigError(f"--process-id must be from 0 to --num-processes - 1 ({(config.num_processes or 1) - 1}), "
                          f"got {config.process_id}.")
    if config.coordinator is not None:
        host, _, port = config.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be HOST:PORT with a port from 1 to 65535, got "
                              f"{config.coordinator!r}.")


def _check_recipe_settings(config: "Config") -> None:
    """Raise `ConfigError` for the first recipe primitive set out of its range."""
    for name in ("random_erase", "mix_prob", "mix_switch_prob"):
        if not 0 <= getattr(config, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} is a probability in [0, 1], got {getattr(config, name)}.")
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} cannot be negative (0 turns it off), got {getattr(config, name)}.")
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"--ema-decay must be in [0, 1) (0: no moving average), got {config.ema_decay}.")
    if not 0 <= config.drop_path_rate < 1:
        raise ConfigError(f"--drop-path-rate must be in [0, 1), got {config.drop_path_rate}.")
    if config.auto_augment is not None and config.auto_augment not in AUTO_AUGMENT:
        raise ConfigError(f"--auto-augment must be one of {', '.join(AUTO_AUGMENT)}; got {config.auto_augment!r}.")
    if config.mix_mode not in MIX_MODES:
        raise ConfigError(f"--mix-mode must be one of {', '.join(MIX_MODES)}; got {config.mix_mode!r}.")
    if not isinstance(config.ra_num_ops, int) or config.ra_num_ops < 1:
        raise ConfigError(f"--ra-num-ops must be a positive whole number, got {config.ra_num_ops!r}.")
    if not 0 <= config.ra_magnitude <= 30:
        raise ConfigError(f"--ra-magnitude is a bin of 31, 0 to 30; got {config.ra_magnitude}.")
    if (config.mixup_alpha or config.cutmix_alpha) and config.batch_size % 2:
        raise ConfigError(f"mixup and cutmix pair each example with another: --batch-size must be even, got "
                          f"{config.batch_size}.")


def _type_name(hint: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return "a list of numbers" if typing.get_args(hint)[0] is float else "a list of whole numbers"
    if typing.get_origin(hint) is dict:
        return "an object of names to values"
    if args:
        return " or ".join(_type_name(a) for a in args) + " or null"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _conforms(value: Any, hint: Any) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (tuple, list)) and all(_conforms(v, typing.get_args(hint)[0]) for v in value)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    args = typing.get_args(hint)
    if args:  # X | None
        return any(value is None if a is type(None) else _conforms(value, a) for a in args)
    return True


def _check_types(config: "Config") -> None:
    """Raise `ConfigError` for the first setting of the wrong type (a JSON config can hold anything)."""
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        if not _conforms(value, hints[field.name]):
            raise ConfigError(f"{field.name} must be {_type_name(hints[field.name])}, got {value!r}.")


def _check_init_from(arch: str, source: str) -> None:
    """Raise `ConfigError` unless ``source`` is a file, a URL, or a weight set ``arch`` has (flaxnets.hub)."""
    from flaxnets import hub
    from flaxnets.convert import supported_models
    from flaxnets.registry import list_models

    if hub.is_url(source) or os.path.isfile(source):
        if arch in list_models() and arch not in supported_models():
            raise ConfigError(f"--init-from converts torchvision weights, and {arch} has no torchvision counterpart "
                              f"(those that do: {', '.join(supported_models()[:6])}, ...).")
        return
    if hub.is_weights_name(source):
        try:
            hub.get_weights(arch, source)
        except hub.WeightsFileError as error:
            raise ConfigError(f"--init-from {source}: {error}") from None
        return
    names = ", ".join(hub.list_weights(arch) + ["DEFAULT"]) if hub.list_weights(arch) else "IMAGENET1K_V1, ..."
    raise ConfigError(f"--init-from {source} is neither a file, a URL nor the name of published weights ({names}).")
