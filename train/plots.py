"""``python -m train.plots``: the pictures of a dataset or of a trained checkpoint, as PNG files.

``python -m train.plots samples --dataset NAME``: one training image per class, titled with its class name.
``python -m train.plots run WORKDIR [--checkpoint latest|best|STEP]``: every plot of a run (`train.figures`:
curves, confusion matrix, predictions, first-layer filters), from its checkpoint and ``metrics.jsonl``, into
``WORKDIR/plots``; the run's data, as its config describes it, is read again for the confusion matrix and
the predictions. Plots already there are kept: the new ones go to the next free ``plots-2``, ``plots-3``, ...
beside them, unless ``--overwrite`` replaces them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from flaxnets.cli import unwritable
from train.arguments import CommandParser
from train.exits import run_command
from train.figures import plot_samples, write_run_plots

__all__ = ["main"]


def _samples(args: argparse.Namespace) -> int:
    from train.data import load_dataset, sample_in_memory

    if args.out:
        _check_out_file(args.out, args.overwrite)  # before the data is read
    data = sample_in_memory(load_dataset(args.dataset, args.data_dir), 128, test_limit=0)
    path = args.out or f"samples_{data.name}.png"
    _check_out_file(path, args.overwrite)
    plot_samples(data.train_images, data.train_labels, data.class_names, path,
                 title=f"{data.name}: one training image per class ({data.num_classes} classes, "
                       f"{data.image_shape[0]}x{data.image_shape[1]} pixels)")
    print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from train.config import Config, ConfigError
    from train.data import DataError
    from train.inference import choose_weights, open_checkpoint
    from train.run import build_run

    workdir, step, loaded = open_checkpoint(args.workdir, args.checkpoint)
    variables, meta = choose_weights(loaded, "chosen", f"checkpoint {step} in {workdir}")
    if "config" not in meta:
        raise ConfigError(f"checkpoint {step} in {workdir} does not record its run's config.")
    config = Config.recorded(meta["config"])
    if args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    try:  # the run as it trained: its data (validation split included) and its schedule
        run = build_run(config.validate())
        data, schedule = run.data, run.schedule
    except (DataError, ValueError) as error:
        print(f"warning: no confusion matrix nor predictions: {error}", file=sys.stderr)
        data, schedule = None, None
    out_dir, kept = _out_dir(args.out or os.path.join(workdir, "plots"), args.overwrite)
    problem = unwritable(out_dir)
    if problem:
        raise ConfigError(f"--out {out_dir}: {problem}.")
    written = write_run_plots(workdir, variables, meta, data, schedule=schedule, out_dir=out_dir,
                              warn=lambda message: print(message, file=sys.stderr))
    if kept:
        print(f"{kept} already holds plots, kept as they are (--overwrite replaces them); the new ones go to {out_dir}")
    verb = "replaced" if args.overwrite and written else "wrote"
    weights = " (the moving average of its weights, which it was ranked by)" if meta["weights"] == "averaged" else ""
    print(f"checkpoint {step} of {workdir}{weights}: {verb} " + ", ".join(written))
    return 0 if written else 1


def _check_out_file(path: str, overwrite: bool) -> None:
    """Refuse, in one sentence, a PNG destination that is a folder, a file already there (without
    ``overwrite``), or in a folder that does not exist or cannot be written."""
    from train.config import ConfigError

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--out {path} is a folder; give the PNG file to write, e.g. "
                          f"{os.path.join(path, 'samples.png')}.")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"{path} already exists; --overwrite replaces it, or give another --out.")
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {path}: the folder {folder} does not exist.")
    problem = unwritable(folder)  # by trying: root passes every permission check, /proc refuses all the same
    if problem:
        raise ConfigError(f"--out {path}: {problem}.")


def _out_dir(folder: str, overwrite: bool) -> tuple[str, str | None]:
    """Where the plots go: ``folder``, unless it holds PNG files and ``overwrite`` is off; then the first of
    ``folder-2``, ``folder-3``, ... that does not exist. Returns it and the folder kept (None: none)."""
    if overwrite or not os.path.isdir(folder) or not any(name.endswith(".png") for name in os.listdir(folder)):
        return folder, None
    base, number = folder.rstrip(os.sep), 2
    while os.path.exists(f"{base}-{number}"):
        number += 1
    return f"{base}-{number}", folder


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.plots samples|run ...``; returns the exit status."""
    parser = CommandParser(prog="python -m train.plots", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    samples = commands.add_parser("samples", help="one training image per class of a dataset")
    samples.add_argument("--dataset", required=True, help="digits, mnist, fashion_mnist, ...")
    samples.add_argument("--data-dir", help="folder with the dataset's files")
    samples.add_argument("--out", help="PNG file to write (default: samples_NAME.png here)")
    samples.add_argument("--overwrite", action="store_true", help="replace the PNG file if it exists")
    run = commands.add_parser("run", help="curves, confusion matrix, predictions and filters of a checkpoint")
    run.add_argument("workdir", help="a run's workdir, or one checkpoint folder in it")
    run.add_argument("--checkpoint", default="latest", help="latest, best, or a step number")
    run.add_argument("--data-dir", help="where the dataset's files are, if not where training found them")
    run.add_argument("--out", help="folder for the PNG files (default: WORKDIR/plots; if it holds plots, the next "
                     "free WORKDIR/plots-N)")
    run.add_argument("--overwrite", action="store_true", help="replace the plots already in the folder")
    args = parser.parse_args(argv)
    return run_command(lambda: _samples(args) if args.command == "samples" else _run(args))


if __name__ == "__main__":
    sys.exit(main())
