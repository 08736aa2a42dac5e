"""`Run`: everything a training run is made of, built once from its `Config` by `build_run`.

The architecture's spec, the data, the model, the optimizer and its schedule, the input preprocessing,
the train and eval steps bound to them, and the data-parallel driver that runs those steps: each decided
here, once. The epoch loop (`train.loop`), the learning-rate range test (`train.lr_range`) and the
commands that evaluate a checkpoint take a `Run` and ask it, rather than deciding again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict

import flaxnets
from flaxnets.cli import error_phrase
from flaxnets.layers import BatchTooSmallError
from flaxnets.registry import ModelSpec, UnknownOptionError
from train.archs import check_user_model, resolve_arch
from train import step as steps
from train.config import STEPS_LIMIT, Config, ConfigError
from train.data import (Dataset, Streamed, ensure_statistics, fit_in_memory, load_dataset, parse_val_split,
                        with_validation)
from train.data.jpeg import resolve_backend
from train.data.stream import require_grain
from train.feed import MemoryFeed, StreamFeed, make_feed
from train.optim import after_fence, make_optimizer
from train.parallel import AXIS, Driver, make_driver
from train.tuning import StepSettings, step_settings

__all__ = ["Run", "build_run", "image_side", "run_optimizer", "recipe_step_options"]


def image_side(config: Config, data: Dataset | Streamed, arch: str) -> int:
    """The side images are resized to: --image-size, or the data's own (the architecture's native input
    size for images of varying size), raised to the model's minimum and to a fourteenth of its native side.

    That last floor is 16 pixels for the ImageNet architectures (224: their last feature maps are 1x1, the
    padding of their strided layers rounding up) and changes nothing for those made for small images.
    Without it an 8x8 digit would reach a ResNet's first stage as 2x2 pixels, after its stride-2 stem and
    max-pool: ResNet-18 with every other default reached 95.3% test top-1 on the digits at 8x8, 97.8% at
    16x16 and 98.1% at 32x32, where each epoch costs 2.3 times as much CPU time as at 16
    (benchmarks/RESULTS.md)."""
    spec = flaxnets.get_spec(arch)
    smallest = _smallest_training_side(config, arch, data.image_shape[-1])
    if config.image_size is not None:
        if config.image_size < smallest:
            raise ConfigError(f"--image-size {config.image_size} is smaller than {arch}'s minimum input of "
                              f"{smallest}x{smallest} pixels for training"
                              + (" (with its auxiliary head: --model-arg aux_logits=false drops it)."
                                 if "aux_logits" in flaxnets.registry.model_options(arch) else "."))
        return config.image_size
    height, width = data.image_shape[:2]
    if height is None or width is None:
        return max(spec.input_size, smallest)
    return max(height, width, smallest, spec.input_size // 14)


def _smallest_training_side(config: Config, arch: str, channels: int) -> int:
    """The smallest side ``arch`` trains on (Inception v3's auxiliary head needs more than its inference):
    recorded for the default build, searched for when --model-arg changes it."""
    if config.model_args:
        try:
            module = flaxnets.create_model(arch, num_classes=10, **config.model_args)
            return flaxnets.min_input_size(module, in_channels=channels, train=True)
        except Exception:  # noqa: BLE001 - build_run refuses such options itself, in one sentence
            pass
    return flaxnets.min_input_size(arch, in_channels=channels, train=True)


@dataclasses.dataclass
class Run:
    """The pieces of a run that do not change while it trains (built by `build_run`).

    The bound steps and the driver are made on first use and kept; `with_optimizer` gives the same run
    with another optimizer (and so other steps and driver).
    """

    config: Config
    spec: ModelSpec
    data: Dataset | Streamed
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    preprocess: steps.Preprocess
    steps_per_epoch: int
    image_side: int
    eval_batch_size: int
    overrides: dict
    settings: StepSettings = dataclasses.field(default_factory=StepSettings)  # the backend's (train.tuning)
    _pretrained: dict | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def train_step(self):
        """The per-device train step with this run's model, optimizer, preprocessing and loss settings."""
        return steps.bind(steps.train_step, model=self.model, tx=self.tx, preprocess=self.preprocess,
                          num_classes=self.data.num_classes, label_smoothing=self.config.label_smoothing,
                          aux_loss_weight=self.spec.aux_loss_weight, **recipe_step_options(self.config,
                                                                                           self.steps_per_epoch))

    @functools.cached_property
    def eval_step(self):
        """The per-device eval step with this run's model and preprocessing."""
        return steps.bind(steps.eval_step, model=self.model, preprocess=self.preprocess,
                          num_classes=self.data.num_classes, flip=self.config.eval_flip)

    @functools.cached_property
    def driver(self) -> Driver:
        """The data-parallel driver (``--parallel``) running this run's steps over every device."""
        return make_driver(self.config.parallel, self.train_step, self.eval_step, self.settings)

    def feed(self, with_train: bool = True) -> MemoryFeed | StreamFeed:
        """This run's data fed to its driver: from device memory or streamed, as the data says."""
        return make_feed(self, self.driver, with_train=with_train)


    def with_optimizer(self, tx: optax.GradientTransformation) -> "Run":
        """The same run with the optimizer ``tx`` (the range test's sweep), its own steps and driver."""
        return dataclasses.replace(self, tx=tx)

    @property
    def selection_split(self) -> str:
        """The split the best checkpoint is chosen on: "val" with a validation split, else "test"."""
        return "val" if self.data.val_size else "test"

    def meta(self, epoch: int, position: int) -> dict:
        """What a checkpoint records beside the state."""
        return {
            "best_selected_on": self.selection_split,
            "arch": self.config.arch,
            "num_classes": self.data.num_classes,
            "image_side": self.image_side,
            "dataset": self.data.describe(),
            **({"resize": self.data.cropped_to} if self.data.cropped_to else {}),  # see inference.file_resize
            "epoch": epoch, "position": position,
            "batch_size": self.config.batch_size, "seed": self.config.seed,
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
        return steps.with_ema(state) if self.config.ema_decay else state

    def state_shapes(self) -> steps.TrainState:
        """The structure of `init_state`'s state, its shapes and dtypes on this process's first device,
        computed without computing anything: the target a checkpoint is restored into."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shapes = jax.eval_shape(lambda: self.init_state(pretrained=False))
        return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                                      shapes)

    def pretrained_variables(self) -> dict:
        """The variables of ``--init-from`` for this model and class count (read and converted once)."""
        if self._pretrained is None:
            from flaxnets.convert import load_pretrained

            self._pretrained = load_pretrained(self.config.arch, self.config.init_from, self.data.num_classes,
                                               in_channels=self.data.image_shape[-1], rng=self.config.seed,
                                               **self.overrides)
        return self._pretrained

    def _with_pretrained(self, state: steps.TrainState) -> steps.TrainState:
        """``state`` with the parameters and statistics of ``--init-from``, a fresh head where classes differ,
        and first-layer kernels for the data's channels (`flaxnets.convert.input_kernel`: colour weights
        on grey images are summed over the colours)."""
        variables = self.pretrained_variables()
        for name in ("params", "batch_stats"):
            theirs = flatten_dict(dict(variables.get(name, {})))
            ours = flatten_dict(jax.tree_util.tree_map(jnp.shape, dict(getattr(state, name))))
            for key, shape in ours.items():
                given = np.shape(theirs.get(key))
                if given != shape:
                    raise ConfigError(
                        f"--init-from {self.config.init_from} does not fit this run: {'/'.join(key)} is "
                        f"{given} in the weights and {shape} here ({self.data.name} images have "
                        f"{self.data.image_shape[-1]} channel(s) at {self.image_side}x{self.image_side}).")
        params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
        return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                             opt_state=self.tx.init(params))


def build_run(config: Config, data: Dataset | None = None, device_count: int | None = None) -> Run:
    """Check the config against the data, the architecture and the devices; build model and optimizer."""
    spec = resolve_arch(config.arch)
    device_count = device_count or jax.device_count()
    if config.batch_size % device_count:
        raise ConfigError(f"--batch-size {config.batch_size} does not split evenly over {device_count} devices; "
                          f"use a multiple of {device_count}.")
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.val_split, config.seed)
    elif not data.val_size:
        data = with_validation(data, parse_val_split(config.val_split), config.seed)
    if (config.init_from or config.freeze_backbone) and spec.family == "user":
        raise ConfigError("--init-from and --freeze-backbone convert torchvision weights, which fit flaxnets' own "
                          f"architectures, not {config.arch}.")
    if spec.family == "user":  # before anything else builds or traces it
        check_user_model(config.arch, num_classes=data.num_classes, channels=data.image_shape[-1],
                         side=config.image_size or spec.input_size, overrides=dict(config.model_args))
    config = with_weights_defaults(config, data.image_shape[-1])
    side = image_side(config, data, config.arch)
    streamable = not data.in_memory  # before fit_in_memory may read it into memory
    data = fit_in_memory(data, side, config.pipeline)
    if not data.in_memory:
        require_grain()  # before the statistics and the compilations, not at the first batch
        resolve_backend(config.decoder)  # likewise: --decoder opencv without OpenCV
        if config.mean is None or config.std is None or config.lighting:  # else nothing would use them
            data = ensure_statistics(data, config.data_dir)
    elif config.ten_crop:
        raise ConfigError(f"--ten-crop applies to streamed datasets; {data.name} is held in memory"
                          + (" (--pipeline stream streams it)." if streamable else "."))
    if config.eval_flip and not data.flip:
        raise ConfigError(f"--eval-flip scores mirror images, whose labels in {data.name} would not be the "
                          "same (its training does not flip images either).")
    data = normalised(data, config)
    steps_per_epoch = data.train_size // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {data.train_size} training "
                          f"examples of {data.name}.")
    for flag, epochs in (("--epochs", config.epochs), ("--warmup-epochs", config.warmup_epochs),
                         ("--lr-decay-epochs", max(config.lr_decay_epochs, default=0))):
        if epochs * steps_per_epoch > STEPS_LIMIT:  # the step counter and the schedule count in int32
            shown = f"{epochs:g}" if isinstance(epochs, float) else str(epochs)
            raise ConfigError(f"{flag} {shown} makes {epochs * steps_per_epoch:,.0f} steps of {data.name}, more "
                              f"than a run counts ({STEPS_LIMIT:,}).")
    overrides = dict(config.model_args)
    for option, who in (("num_classes", "the dataset's class count"), ("dtype", "--dtype"),
                        ("bn_axis_name", "the trainer (its device axis)"), ("ops", "the trainer (train.tuning)")):
        if option in overrides:
            raise ConfigError(f"--model-arg {option} is set by {who}, not by --model-arg.")
    if config.zero_init_residual:
        if spec.family != "resnet":
            raise ConfigError(f"--zero-init-residual applies to ResNets, not {config.arch}.")
        overrides["zero_init_residual"] = True
    if config.drop_path_rate:
        if "drop_path_rate" not in flaxnets.registry.model_options(config.arch):
            raise ConfigError(f"--drop-path-rate (stochastic depth) applies to the ResNet families, not {config.arch}.")
        overrides["drop_path_rate"] = config.drop_path_rate
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    # The backend's kernel set (flaxnets.cpu's with its gradient fence on a CPU, flaxnets.gpu's on a GPU: the
    # same numbers, faster steps), for every model built from flaxnets' kernel set (a model of the user's own
    # may not take one).
    settings = step_settings()
    if "ops" not in flaxnets.registry.model_options(config.arch):
        settings = dataclasses.replace(settings, kernels="plain")
    kernels = {"ops": settings.ops()} if settings.kernels != "plain" else {}
    try:
        model = flaxnets.create_model(config.arch, num_classes=data.num_classes, dtype=dtype, bn_axis_name=AXIS,
                                      **{**kernels, **overrides})
    except UnknownOptionError as error:
        raise ConfigError(f"--model-arg: {error}") from None
    except (TypeError, ValueError) as error:  # a value the module refuses (or a user factory's own complaint)
        raise ConfigError(f"{config.arch} cannot be built with {overrides or 'its defaults'}: {error}") from None
    if config.model_args or spec.family == "user":  # options are read when the model is traced: trace it now
        _check_traces(model, config.arch, overrides, side, data.image_shape[-1])
    if config.batch_size == 1:
        _check_batch_of_one(model, config.arch, side, data.image_shape[-1])
    on_device = data.in_memory  # streamed examples arrive cropped and flipped by the host
    preprocess = steps.Preprocess(mean=data.mean, std=data.std, size=side, augment=config.augment,
                                  crop_padding=data.crop_padding if on_device else 0, flip=data.flip and on_device,
                                  dtype=dtype, lighting=config.lighting, eigval=data.eigval, eigvec=data.eigvec,
                                  auto_augment=config.auto_augment, ra_num_ops=config.ra_num_ops,
                                  ra_magnitude=config.ra_magnitude, random_erase=config.random_erase)
    tx, schedule = run_optimizer(config, steps_per_epoch, fence=settings.fence)
    # No larger than the largest split it scores: padding a 360-image test split to 500 costs 39% more.
    largest = max(data.test_size, data.val_size or 0, 1)
    eval_batch = math.ceil(min(config.eval_batch_size, largest) / device_count) * device_count
    return Run(config, spec, data, model, tx, schedule, preprocess, steps_per_epoch, side, eval_batch, overrides,
               settings)


def recipe_step_options(config: Config, steps_per_epoch: int) -> dict[str, Any]:
    """The train step's mixing and weight-averaging settings (`train.step.train_step`): the average follows
    the weights from the end of the learning-rate warm-up, as torchvision's recipe restarts it until then."""
    mixing = None
    if config.mixup_alpha or config.cutmix_alpha:
        mixing = steps.Mixing(config.mixup_alpha, config.cutmix_alpha, config.mix_prob, config.mix_switch_prob,
                              config.mix_mode)
    return {"mixing": mixing, "ema_decay": config.ema_decay,
            "ema_start_step": config.warmup_steps(steps_per_epoch)}


def with_weights_defaults(config: Config, channels: int) -> Config:
    """``config`` completed for published ``--init-from`` weights (a name, or a file named as torchvision
    publishes it; `flaxnets.hub.find_weights`): the model fields they were trained under (GoogLeNet's and
    Inception v3's ``transform_input``) and, where ``--mean``/``--std`` are not given, their normalisation.

    A backbone, above all a frozen one, sees its inputs as in its own training only when they are normalised
    as they were then. Grey images get the average of the RGB values, the normalisation under which the
    first layer, its kernel summed over RGB (`Run.init_state`), sees a grey image as the RGB one sees its
    colour copy, to within the small spread of those values. Everything lands in the config, so that
    config.json, a resumed run, evaluate and predict all read the same settings.
    """
    if not config.init_from:
        return config
    from flaxnets import hub

    weights = hub.find_weights(config.arch, config.init_from)
    if weights is None:
        return config

    def fitted(values: tuple[float, ...]) -> tuple[float, ...]:
        return (round(sum(values) / len(values), 6),) if channels == 1 else tuple(values)

    return dataclasses.replace(
        config,
        model_args={**flaxnets.pretrained_overrides(config.arch), **config.model_args},
        mean=config.mean if config.mean is not None else fitted(weights.mean),
        std=config.std if config.std is not None else fitted(weights.std))


def normalised(data: Dataset | Streamed, config: Config) -> Dataset | Streamed:
    """``data`` with ``--mean``/``--std`` in place of its own statistics, where given (one value for all
    channels, or one per channel); a checkpoint records them with the data, for evaluate and predict."""
    channels = data.image_shape[-1]
    changes = {}
    for name in ("mean", "std"):
        values = getattr(config, name)
        if values is None:
            continue
        if len(values) not in (1, channels):
            raise ConfigError(f"--{name} has {len(values)} values, but {data.name} images have {channels} "
                              f"channel(s): give one value per channel, or one for all.")
        changes[name] = tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)
    return dataclasses.replace(data, **changes) if changes else data


def _check_traces(model, arch: str, options: dict, side: int, channels: int) -> None:
    """Trace ``model`` once (nothing computed) so that an option it refuses is one sentence, not a traceback."""
    images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
    try:
        jax.eval_shape(functools.partial(model.init, train=False), {"params": jax.random.key(0)}, images)
    except Exception as error:  # noqa: BLE001 - whatever the module raises, it is about these options
        raise ConfigError(f"{arch} with {options or 'its defaults'} does not build ({error_phrase(error)}).") from None


def _check_batch_of_one(model, arch: str, side: int, channels: int) -> None:
    """Trace a training apply on one image (nothing computed): a BatchNorm whose map is then 1x1 would have
    one value per channel, which it refuses (`flaxnets.layers.BatchNorm`); one sentence now, not a traceback
    from the first step."""

    def trained(images):
        variables = model.init({"params": jax.random.key(0)}, images, train=False)
        return model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})

    images = jax.ShapeDtypeStruct((1, 1, side, side, channels), jnp.float32)  # one device of one image
    try:
        jax.eval_shape(jax.vmap(trained, axis_name=AXIS), images)
    except BatchTooSmallError:
        raise ConfigError(f"--batch-size 1 leaves a BatchNorm layer of {arch} one value per channel at {side}x{side} "
                          "input, which normalises to nothing; train with a batch of 2 or more.") from None


def run_optimizer(config: Config, steps_per_epoch: int, *, fence: bool) -> tuple[optax.GradientTransformation,
                                                                                  optax.Schedule]:
    """The optimizer of a run of ``config`` (`train.optim.make_optimizer`), with frozen layers held still
    (``--freeze-backbone``) and, with ``fence``, `flaxnets.cpu.tie_gradients` in front."""
    tx, schedule = make_optimizer(config, steps_per_epoch)
    if config.freeze_backbone:
        from flaxnets.convert import head_mask

        # The class layers train; every other parameter gets a zero update (and no optimizer state).
        labels = lambda params: jax.tree_util.tree_map(lambda head: "head" if head else "frozen",
                                                       head_mask(config.arch, params))
        tx = optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)
    if fence:
        import flaxnets.cpu

        tx = after_fence(flaxnets.cpu.tie_gradients(), tx)
    return tx, schedule
