"""``python -m train.predict --workdir W IMAGE...``: the top classes, with probabilities, for image files.

Needs only the checkpoint: its architecture, class names, input size and normalisation are recorded in it.
Images are converted to the training data's channels (grey or RGB) and size.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--workdir", required=True, help="a run's workdir, or one checkpoint folder in it")
    parser.add_argument("--checkpoint", default="best", help="latest, best, or a step number")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    def body() -> int:
        from train.inference import load_variables, locate, predict_images, read_images

        workdir, step = locate(args.workdir, args.checkpoint)
        variables, meta = load_variables(workdir, step)
        dataset = meta["dataset"]
        probabilities = predict_images(variables, meta, read_images(args.images, tuple(dataset["image_shape"]),
                                                                     side=meta["image_side"]))
        names = dataset["class_names"]
        for path, row in zip(args.images, probabilities):
            best = row.argsort()[::-1][: args.top_k]
            print(f"{path}: " + ", ".join(f"{names[i]} {row[i]:.1%}" for i in best))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
