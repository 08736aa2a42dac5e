"""The command line of ``python -m train``: one flag per `train.config.Config` setting, in groups.

`build_parser` declares the flags, each in one titled group (what ``--help`` shows together); `parse_args`
lays the defaults, then ``--recipe``, then ``--config``, then the flags given over each other and returns
the checked `Config`. `CommandParser` is the parser of every command of ``train`` and of the benchmarks:
one-sentence errors and help without reST markup. Nothing the run imports (loop, step, data, checkpoint,
config) imports this module: parsing is the commands' business.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

from train.config import (AUTO_AUGMENT, CROPS, DECODERS, DTYPES, MIX_MODES, OPTIMIZERS, PARALLEL, PIPELINES,
                          SCHEDULES, Config)

__all__ = ["CommandParser", "GROUPS", "build_parser", "parse_args"]


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one sentence and exits 2, as it does, but without usage noise,
    and whose help is plain words (`flaxnets.cli.plain`)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {message} (see --help)\n")

    def format_help(self) -> str:  # noqa: D102
        from flaxnets.cli import plain  # here, not at the top: flaxnets imports flax, and parsing stays light

        return plain(super().format_help())


# The groups of --help, in the order shown: (title, what its flags decide).
GROUPS = (
    ("settings", "where settings come from before the flags below"),
    ("model", "the network and the weights it starts from"),
    ("data", "the images, how they are read, normalised and augmented"),
    ("optimisation", "the optimizer and what it minimises"),
    ("schedule", "how long, and the learning rate over time; or a learning-rate range test instead"),
    ("recipe primitives", "the training tricks of modern recipes, all off by default"),
    ("checkpoints and resume", "where the run is kept and how it carries on"),
    ("output", "what the run shows and writes besides checkpoints"),
    ("distributed", "devices and processes"),
)


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    """The parser of ``python -m train``: every `Config` setting is one flag of one of `GROUPS`. Its values
    are None unless given, so that `parse_args` can tell a flag given from a default."""
    parser = CommandParser(prog=prog, usage="%(prog)s [--recipe NAME] [--config FILE] [--arch ARCH] [--dataset NAME] "
                           "[FLAG ...] (the flags, by group, below)",
                           description="Train a flaxnets architecture, data-parallel over all devices.")
    groups = {title: parser.add_argument_group(title, about) for title, about in GROUPS}
    defaults = Config()

    def add(group: str, flag: str, help: str, **kwargs) -> None:
        """One flag with one line of help ending in its real default (the Config's, not argparse's None)."""
        value = getattr(defaults, kwargs.get("dest", flag[2:].replace("-", "_")))
        if value is None or isinstance(value, bool):
            shown = {None: "none", True: "on", False: "off"}[value]
        elif isinstance(value, (tuple, dict)):
            shown = ",".join(map(str, value)) or "none"
        else:
            shown = value
        groups[group].add_argument(flag, help=f"{help} (default: {shown})", **kwargs)

    switch = {"action": argparse.BooleanOptionalAction}
    groups["settings"].add_argument("--config", metavar="FILE", help="settings as a JSON file, or a JSON object in quotes; flags "
                                    "given on the command line win")
    add("settings", "--recipe", "a named recipe (python -m train.recipes lists them) or a recipe file: its "
        "settings first, then --config's, then the flags given", metavar="NAME")

    add("model", "--arch", "architecture name (python -m flaxnets lists them), or a model of your own as "
        "FILE.py:FACTORY or MODULE:FACTORY")
    add("model", "--model-arg", "an option of the architecture (repeatable; VALUE as JSON, else a string), e.g. "
        "dropout=0.3 or activation=relu; kept in config.json for resume, evaluate and predict", dest="model_args",
        action="append", type=_model_arg, metavar="KEY=VALUE")
    add("model", "--zero-init-residual", "ResNets: start each residual branch's last BatchNorm scale at zero", **switch)
    add("model", "--init-from", "start from torchvision weights: a published set of --arch (IMAGENET1K_V1, "
        "IMAGENET1K_V2, DEFAULT; downloaded once into ~/.cache/flaxnets), a URL, or a .pth/.safetensors/.npz file; "
        "a new head if the classes differ")
    add("model", "--freeze-backbone", "with --init-from: train the class layer(s) only", **switch)

    add("data", "--dataset", "digits (ships with the install), mnist, fashion_mnist, cifar10, cifar100, folder, or "
        "any tensorflow-datasets image-classification name (imagenet2012, imagenette, ...)")
    add("data", "--data-dir", "the dataset's original files (IDX .gz, CIFAR tarballs), a folder of class folders "
        "(--dataset folder), or where tensorflow-datasets keeps prepared datasets")
    add("data", "--val-split", "data to choose the best checkpoint on: a FRACTION of the training split (e.g. 0.1, "
        "held out per class with a fixed seed) or the NAME of the dataset's own split (e.g. validation); without "
        "it the test split chooses")
    add("data", "--image-size", "resize images to this side (none: the data's own, raised to the model's minimum)",
        type=int)
    add("data", "--eval-batch-size", "global batch of evaluation (every example is scored, the last batch padded)",
        type=int)
    add("data", "--pipeline", "memory: on the devices; stream: Grain workers; auto: by size", choices=PIPELINES)
    add("data", "--workers", "Grain worker processes for a streamed dataset (none: one per core)", type=int)
    add("data", "--decoder", "streamed JPEGs: decoded straight to the crop, at reduced size where it allows, by "
        "opencv (pip install opencv-python-headless) or pillow; auto: opencv when installed", choices=DECODERS)
    add("data", "--mean", "per-channel mean of pixels in [0, 1] to normalise with, e.g. 0.485,0.456,0.406 (none: "
        "the published --init-from weights' own, else the data's)", type=_floats_list)
    add("data", "--std", "per-channel standard deviation to normalise with (none: as --mean)", type=_floats_list)
    add("data", "--augment", "random crops with padding, and flips where the dataset allows them", **switch)
    add("data", "--crop", "streamed training crop: random-resized (inception) or 224-of-256 (alexnet)", choices=CROPS)
    add("data", "--lighting", "standard deviation of AlexNet's PCA colour noise (0.1 in the paper; 0: off)",
        type=float)
    add("data", "--ten-crop", "streamed evaluation over ten crops per image", **switch)
    add("data", "--eval-flip", "evaluation averages each image with its mirror image (where training flips "
        "images); the one-view top-1 is recorded beside it", **switch)

    add("optimisation", "--batch-size", "global batch, split over all devices and processes", type=int)
    add("optimisation", "--optimizer", "sgd (with momentum), nesterov, adam or adamw", choices=OPTIMIZERS)
    add("optimisation", "--lr", "peak learning rate, for the global batch", type=float)
    add("optimisation", "--momentum", "momentum of sgd and nesterov", type=float)
    add("optimisation", "--weight-decay", "L2 penalty on kernels (not biases nor BatchNorm), applied by the "
        "optimizer", type=float)
    add("optimisation", "--label-smoothing", "weight of the uniform distribution mixed into the one-hot targets",
        type=float)
    add("optimisation", "--clip-grad-norm", "clip the gradients' global norm to this", type=float)
    add("optimisation", "--dtype", "computation dtype; parameters and optimizer state stay float32", choices=DTYPES)
    add("optimisation", "--seed", "seed of the initialisation, the data order and the augmentation", type=int)

    add("schedule", "--epochs", "passes over the training split", type=int)
    add("schedule", "--schedule", "learning rate after the warm-up: constant, step, cosine or onecycle",
        choices=SCHEDULES)
    add("schedule", "--warmup-epochs", "linear warm-up from 0 to --lr (onecycle: a cosine rise from --lr/25); "
        "at most half the run", type=float)
    add("schedule", "--lr-decay-epochs", "step schedule: epochs from the run's start, none inside the warm-up, "
        "after which the rate is multiplied by --lr-decay-factor, e.g. 30,60", type=_epochs_list)
    add("schedule", "--lr-decay-factor", "step schedule: the factor applied at each of --lr-decay-epochs",
        type=float)
    add("schedule", "--lr-find", "instead of training, a learning-rate range test: a plot of loss against rate and "
        "a suggested --lr", **switch)
    add("schedule", "--lr-find-steps", "steps of the range test", type=int)
    add("schedule", "--lr-find-start", "first rate of the range test", type=float)
    add("schedule", "--lr-find-end", "last rate of the range test (it stops earlier if the loss diverges)",
        type=float)

    add("recipe primitives", "--auto-augment", "TrivialAugment Wide (ta_wide) or RandAugment (ra) on every "
        "training image, torchvision's operations", choices=AUTO_AUGMENT)
    add("recipe primitives", "--ra-num-ops", "RandAugment: operations per image", type=int)
    add("recipe primitives", "--ra-magnitude", "RandAugment: magnitude bin, 0-30", type=int)
    add("recipe primitives", "--random-erase", "probability of erasing a random rectangle of a training image "
        "(torchvision's RandomErasing)", type=float)
    add("recipe primitives", "--mixup-alpha", "mixup's Beta(alpha, alpha); 0: off", type=float)
    add("recipe primitives", "--cutmix-alpha", "cutmix's Beta(alpha, alpha); 0: off", type=float)
    add("recipe primitives", "--mix-prob", "probability that a batch (or example) is mixed", type=float)
    add("recipe primitives", "--mix-switch-prob", "with mixup and cutmix both on: probability of cutmix", type=float)
    add("recipe primitives", "--mix-mode", "one mixing draw per batch, or per example (elem)", choices=MIX_MODES)
    add("recipe primitives", "--ema-decay", "per-step decay of a moving average of the weights, evaluated and "
        "checkpointed beside them (e.g. 0.999); 0: none", type=float)
    add("recipe primitives", "--drop-path-rate", "ResNets: stochastic depth, the last block's drop probability "
        "(linear from 0)", type=float)
    add("recipe primitives", "--decay-norm-and-bias", "weight decay on biases and normalisation parameters too",
        **switch)

    add("checkpoints and resume", "--workdir", "checkpoints, metrics, plots and config go here; rerun the same "
        "command to resume")
    add("checkpoints and resume", "--checkpoint-every-epochs", "save a checkpoint every this many epochs (and at "
        "the last)", type=int)
    add("checkpoints and resume", "--eval-every-epochs", "score the validation and test splits every this many "
        "epochs (and whenever a checkpoint is saved, and at the last); the training is the same", type=int)
    add("checkpoints and resume", "--keep-checkpoints", "how many of the latest checkpoints to keep, besides the "
        "best", type=int)
    add("checkpoints and resume", "--allow-changes", "resume with settings that change the result (seed, rates, "
        "schedule, augmentation, ...) although the workdir's run was trained with others; the change is recorded "
        "in its history", **switch)

    add("output", "--log-every-steps", "progress line every this many steps", type=int)
    add("output", "--plots", "write WORKDIR/plots/*.png at the end of the run", **switch)

    add("distributed", "--parallel", "data-parallel driver: shard_map or pmap (the same numbers)", choices=PARALLEL)
    add("distributed", "--distributed", "call jax.distributed.initialize() (cluster environment detected, or the "
        "three flags below)", **switch)
    add("distributed", "--coordinator", "host:port of process 0, for multi-process runs")
    add("distributed", "--num-processes", "number of processes of a multi-process run", type=int)
    add("distributed", "--process-id", "this process's index in a multi-process run", type=int)
    add("distributed", "--heartbeat-timeout-seconds", "multi-process runs: a process silent for this long is "
        "declared dead and the others stop", type=int)
    parser.set_defaults(**{f.name: None for f in dataclasses.fields(Config)})
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m train") -> Config:
    """Command line -> validated `Config`: defaults, then ``--recipe``, then ``--config FILE``, then the flags
    given."""
    args = vars(build_parser(prog).parse_args(argv))
    config_file = args.pop("config")
    recipe = args.pop("recipe")
    base = Config.from_recipe(recipe) if recipe else Config()
    config = Config.from_file(config_file, base=base) if config_file else base
    given = {k: v for k, v in args.items() if v is not None}
    if given.get("coordinator") or given.get("num_processes") is not None:
        given.setdefault("distributed", True)
    if "model_args" in given:  # each --model-arg adds to (or overrides) the config file's
        given["model_args"] = {**config.model_args, **dict(given["model_args"])}
    config = dataclasses.replace(config, **given)
    return dataclasses.replace(config, arch=absolute_arch(config.arch)).validate()


def absolute_arch(arch: str) -> str:
    """``arch`` with a factory file's path (``FILE.py:FACTORY``, `train.archs`) made absolute, so that the
    saved config finds the file from any working directory."""
    where, sep, name = arch.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{os.path.abspath(where)}:{name}"
    return arch


def _model_arg(text: str) -> tuple[str, Any]:
    from flaxnets.registry import parse_model_arg

    try:
        return parse_model_arg(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _floats_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.485,0.456,0.406; got {text!r}") from None


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 30,60; got {text!r}") from None
