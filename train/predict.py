"""``python -m train.predict --workdir W IMAGE...``: the top classes, with probabilities, for image files.

Needs only the checkpoint: its architecture, class names, input size and normalisation are recorded in it.
Images are converted to the training data's channels (grey or RGB) and size. A run with ``--ema-decay``
keeps a moving average of the weights beside them: the checkpoint predicts with the set it was ranked by
(``--weight-set chosen``), or the one asked for.

``python -m train.predict --arch resnet50 --weights IMAGENET1K_V2 IMAGE...`` does the same with torchvision's
published weights (downloaded once into ~/.cache/flaxnets; a URL or a .pth file works too): ImageNet's class
names, and the preprocessing the weights' accuracy was measured with (resize, centre crop, mean and std).
"""

from __future__ import annotations

import sys

from train.exits import run_command
from train.arguments import CommandParser
from train.config import WEIGHT_SETS


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m train.predict", description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--workdir", help="a run's workdir, or one checkpoint folder in it")
    parser.add_argument("--checkpoint", default="best", help="with --workdir: latest, best, or a step number")
    parser.add_argument("--weight-set", choices=WEIGHT_SETS, default="chosen",
                        help="with --workdir: the weights the checkpoint was ranked by, the trained ones, or their "
                        "moving average (runs with --ema-decay)")
    parser.add_argument("--arch", help="with --weights: the architecture they are for")
    parser.add_argument("--weights", help="instead of --workdir: published torchvision weights of --arch "
                        "(IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT), a URL or a .pth/.safetensors/.npz file")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if (args.workdir is None) == (args.weights is None):
        parser.error("give either --workdir (a trained run) or --arch and --weights (published weights)")
    if args.weights is not None and args.arch is None:
        parser.error("--weights needs --arch, the architecture the weights are for")

    def body() -> int:
        from train.inference import (choose_weights, file_resize, open_checkpoint, predict_images, published_variables,
                                     read_images)

        if args.weights is not None:
            variables, meta = published_variables(args.arch, args.weights)
        else:
            workdir, step, loaded = open_checkpoint(args.workdir, args.checkpoint)
            variables, meta = choose_weights(loaded, args.weight_set, f"checkpoint {step} in {workdir}")
            if meta["weights"] == "averaged":
                print("predicting with the moving average of the weights", file=sys.stderr)
        dataset = meta["dataset"]
        images = read_images(args.images, tuple(dataset["image_shape"]), side=meta["image_side"],
                             resize=file_resize(meta))
        probabilities = predict_images(variables, meta, images)
        names = dataset["class_names"]
        for path, row in zip(args.images, probabilities):
            best = row.argsort()[::-1][: args.top_k]
            print(f"{path}: " + ", ".join(f"{names[i]} {row[i]:.1%}" for i in best))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
