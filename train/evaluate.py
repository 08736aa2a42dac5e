"""``python -m train.evaluate --workdir W [--checkpoint latest|best|STEP]``: re-score a checkpoint on every
example of its run's validation and test splits, with the trainer's own data path and eval step; the
moving average of the weights too, where the run kept one (``--ema-decay``), and ``--eval-flip`` adds each
image's mirror where the run did not.

``python -m train.evaluate --arch resnet50 --weights IMAGENET1K_V2 --dataset imagenet2012 --data-dir D``
scores torchvision's published weights (or a URL or .pth file of them) on every example of a prepared
dataset of ImageNet's classes (its validation split by default; a folder of class folders works too), with
the preprocessing the weights' reported accuracy was measured with, and prints it beside that accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from train.exits import run_command
from train.arguments import CommandParser
from train.config import PARALLEL, WORKERS_LIMIT, Config, ConfigError


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--workdir", help="a run's workdir, or one checkpoint folder in it")
    parser.add_argument("--checkpoint", default="latest", help="with --workdir: latest, best, or a step number")
    parser.add_argument("--data-dir", help="where the dataset's files are (with --workdir: if not where training "
                        "found them)")
    parser.add_argument("--parallel", choices=PARALLEL)
    parser.add_argument("--eval-flip", action="store_true", help="with --workdir: average each image with its "
                        "mirror image, as python -m train --eval-flip scores (the one-view figure beside)")
    parser.add_argument("--arch", help="with --weights: the architecture they are for")
    parser.add_argument("--weights", help="instead of --workdir: published torchvision weights of --arch "
                        "(IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT), a URL or a .pth/.safetensors/.npz file")
    parser.add_argument("--dataset", help="with --weights: imagenet2012 (or another tensorflow-datasets name "
                        "prepared in --data-dir) or folder")
    parser.add_argument("--split", help="with --weights: the split to score (default: validation, val or test, "
                        "the first that exists)")
    parser.add_argument("--batch-size", type=int, default=256, help="with --weights: images per batch")
    parser.add_argument("--workers", type=int, default=0, help="with --weights: Grain processes decoding images "
                        "(0: threads of this process)")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.weights is None):
        parser.error("give either --workdir (a trained run) or --arch, --weights and --dataset (published weights)")
    if args.weights is not None and (args.arch is None or args.dataset is None):
        parser.error("--weights needs --arch (the architecture the weights are for) and --dataset")
    published_only = [flag for flag, value in (("--arch", args.arch), ("--dataset", args.dataset),
                                               ("--split", args.split)) if value is not None]
    if args.workdir is not None and published_only:
        verb = "goes" if len(published_only) == 1 else "go"
        parser.error(f"{', '.join(published_only)} {verb} with --weights; a run's checkpoint knows its architecture "
                     "and data (--data-dir says where its files are now)")
    if not 1 <= args.batch_size <= 65536 or not 0 <= args.workers <= WORKERS_LIMIT:
        parser.error(f"--batch-size must be from 1 to 65536 and --workers from 0 to {WORKERS_LIMIT}")

    def body() -> int:
        return _published(args) if args.weights is not None else _checkpoint(args)

    return run_command(body, memory_advice="a smaller --batch-size needs less")


def _checkpoint(args) -> int:
    from train.inference import open_checkpoint
    from train.run import build_run
    from train.scores import evaluate_checkpoint

    workdir, step, (variables, averaged, chosen, meta) = open_checkpoint(args.workdir, args.checkpoint)
    if "config" not in meta:
        raise ConfigError(f"checkpoint {step} in {workdir} does not record its run's config.")
    config = Config.recorded(meta["config"])  # checked when the checkpoint was read (train.checkpoint_checks.check_meta)
    changes = {k: v for k, v in (("data_dir", args.data_dir), ("parallel", args.parallel),
                                 ("eval_flip", args.eval_flip)) if v}
    # --eval-flip changes what is reported, not the checkpoint: allowed, as data_dir and parallel are anyway.
    config = dataclasses.replace(config, workdir=workdir, allow_changes=True, **changes).validate()
    run = build_run(config)
    results = evaluate_checkpoint(run, workdir, step, variables, meta, averaged)
    print(json.dumps({"workdir": workdir, "step": step, "arch": config.arch, "dataset": config.dataset,
                      **results, **({"ranked_by": chosen} if averaged is not None else {})}, indent=2))
    return 0


def _published(args) -> int:
    from train.data import DataError, load_split
    from train.inference import published_variables, score_split

    data = load_split(args.dataset, args.data_dir, args.split)  # before the download: a typo fails at once
    variables, meta = published_variables(args.arch, args.weights)
    if data.num_classes != meta["num_classes"]:
        raise DataError(f"{args.dataset} has {data.num_classes} classes and the weights {meta['num_classes']}: "
                        "they score a dataset of the classes they were trained on (ImageNet's 1,000 for the "
                        "published ones).")
    results = score_split(variables, meta, data, batch_size=args.batch_size, workers=args.workers)
    published = meta["published"]
    print(json.dumps({"arch": args.arch, "weights": meta["weights"], "dataset": args.dataset,
                      "split": data.test_split, "resize": meta["resize"], "crop": meta["image_side"], **results,
                      **({"published_top1": published["acc1"] / 100, "published_top5": published["acc5"] / 100}
                         if published else {})}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
