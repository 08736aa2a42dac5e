"""``python -m train.data``: prepare a tensorflow-datasets dataset or a resized copy of an image folder,
compute a dataset's statistics, or list what a dataset holds.

    python -m train.data prepare fashion_mnist --manual-dir ../shared/datasets/fashion_mnist --data-dir ~/tfds
    python -m train.data prepare imagenet2012 --manual-dir /data/imagenet-tars
    python -m train.data prepare folder --data-dir /data/imagenet --output /data/imagenet-256 --shorter-side 256
    python -m train.data stats imagenet2012 --sample 10000
    python -m train.data info cifar10 --data-dir ~/cifar

Preparing runs tensorflow-datasets' own builder (download, checksums, conversion to ArrayRecord), which
needs TensorFlow: ``pip install -e ".[prepare]"``. Training reads the result without TensorFlow.
``prepare folder`` writes a copy of a folder of class folders with every image's shorter side at most
``--shorter-side``, as JPEGs in ArrayRecord files (`train.data.resized`); train on it with
``python -m train --dataset folder --data-dir COPY``.
"""

from __future__ import annotations

import json
import os
import sys

from flaxnets.hub import cache_dir
from train.arguments import CommandParser
from train.data import DataError, ensure_statistics, load_dataset
from train.data.prepare import prepare
from train.data.resized import write_copy
from train.data.stats import stats_path, streamed_stats_path, write_stats


def main(argv=None) -> int:
    # Imported here: the processes of prepare folder import this module again, and need no JAX.
    from train.exits import run_command

    parser = CommandParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="download/convert a tensorflow-datasets dataset to ArrayRecord, or "
                            "(folder) write a resized copy of an image folder")
    p.add_argument("name", help="a tensorflow-datasets name, or folder")
    p.add_argument("--data-dir", help="where prepared datasets live (default: tensorflow-datasets' own); for "
                   "folder, the image folder to copy")
    p.add_argument("--manual-dir", help="folder holding the original files, used instead of downloading")
    p.add_argument("--output", help="folder: where the copy goes (a new folder, or an earlier copy with --overwrite)")
    p.add_argument("--shorter-side", type=int, help="folder: the largest shorter side of the copy's images, e.g. 256")
    p.add_argument("--quality", type=int, default=90, help="folder: JPEG quality of resized images (default: 90)")
    p.add_argument("--workers", type=int, help="folder: processes resizing images (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="folder: replace an earlier copy at --output")
    s = commands.add_parser("stats", help="mean, std and colour PCA of the training images, stored beside the data")
    s.add_argument("name")
    s.add_argument("--data-dir")
    s.add_argument("--sample", type=int, default=10000, help="training images to sample (streamed datasets)")
    i = commands.add_parser("info", help="what the dataset holds")
    i.add_argument("name")
    i.add_argument("--data-dir")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.command == "prepare" and args.name == "folder":
            return _prepare_folder(args)
        if args.command == "prepare":
            given = [f"--{k.replace('_', '-')}" for k in ("output", "shorter_side", "workers", "overwrite")
                     if getattr(args, k)]
            if given:
                raise DataError(f"{', '.join(given)} apply to prepare folder (a resized copy of an image folder), "
                                f"not to a tensorflow-datasets dataset such as {args.name}.")
            where = prepare(args.name, args.data_dir, args.manual_dir)
            print(f"{args.name} is prepared in {where}; train on it with "
                  f"python -m train --dataset {args.name}{' --data-dir ' + args.data_dir if args.data_dir else ''}.")
            return 0
        data = load_dataset(args.name, args.data_dir)
        if args.command == "stats":
            if data.in_memory:
                folder = args.data_dir or os.fspath(cache_dir())  # flaxnets' cache folder
                path = stats_path(folder, data.name)
                write_stats(path, {k: getattr(data, k) for k in ("mean", "std", "eigval", "eigvec")},
                            dataset=data.name, sample=data.train_size, seed=0)
            else:
                if args.sample < 1:
                    raise DataError(f"--sample must be positive, got {args.sample}.")
                path = streamed_stats_path(data.name, args.data_dir)
                if os.path.exists(path):
                    os.replace(path, path + ".previous")
                data = ensure_statistics(data, args.data_dir, sample=args.sample)
            print(json.dumps({k: getattr(data, k) for k in ("mean", "std", "eigval", "eigvec")}, indent=1))
            if os.path.exists(path):  # else the warning said why it could not be
                print(f"stored in {path}", file=sys.stderr)
            return 0
        described = {k: v for k, v in data.describe().items() if v != []}  # statistics not computed yet
        described["source"] = "original files" if data.in_memory else (
            "a folder of images" if data.name == "folder" else f"tensorflow-datasets, split {data.test_split} for testing")
        print(json.dumps(described, indent=1))
        return 0

    return run_command(body)


def _prepare_folder(args) -> int:
    if args.manual_dir:
        raise DataError("--manual-dir applies to tensorflow-datasets datasets; prepare folder reads --data-dir.")
    needed = (("--data-dir", args.data_dir), ("--output", args.output), ("--shorter-side", args.shorter_side))
    for flag, value in needed:
        if value is None:
            raise DataError(f"prepare folder needs {flag}, e.g. python -m train.data prepare folder --data-dir IMAGES "
                            "--output COPY --shorter-side 256.")
    index = write_copy(args.data_dir, args.output, shorter_side=args.shorter_side, quality=args.quality,
                       workers=args.workers, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {entry['images']:,}" for split, entry in index["splits"].items())
    print(f"a copy of {args.data_dir} at shorter side {args.shorter_side} (JPEG quality {args.quality}) is in "
          f"{args.output}: {counts} images ({index['resized']:,} resized, {index['kept']:,} kept as they were, "
          f"{len(index['skipped']):,} skipped); train on it with python -m train --dataset folder --data-dir "
          f"{args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
