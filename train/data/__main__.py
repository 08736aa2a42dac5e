"""``python -m train.data``: prepare a tensorflow-datasets dataset, compute a dataset's statistics, or list
what a dataset holds.

    python -m train.data prepare fashion_mnist --manual-dir ../shared/datasets/fashion_mnist --data-dir ~/tfds
    python -m train.data prepare imagenet2012 --manual-dir /data/imagenet-tars
    python -m train.data stats imagenet2012 --sample 10000
    python -m train.data info cifar10 --data-dir ~/cifar

Preparing runs tensorflow-datasets' own builder (download, checksums, conversion to ArrayRecord), which
needs TensorFlow: ``pip install -e ".[prepare]"``. Training reads the result without TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys

from train.cli import run_command
from train.config import CommandParser
from train.data import DataError, ensure_statistics, load_dataset
from train.data.prepare import prepare
from train.data.stats import stats_path, write_stats


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="download/convert a tensorflow-datasets dataset to ArrayRecord")
    p.add_argument("name")
    p.add_argument("--data-dir", help="where prepared datasets live (default: tensorflow-datasets' own)")
    p.add_argument("--manual-dir", help="folder holding the original files, used instead of downloading")
    s = commands.add_parser("stats", help="mean, std and colour PCA of the training images, stored beside the data")
    s.add_argument("name")
    s.add_argument("--data-dir")
    s.add_argument("--sample", type=int, default=10000, help="training images to sample (streamed datasets)")
    i = commands.add_parser("info", help="what the dataset holds")
    i.add_argument("name")
    i.add_argument("--data-dir")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.command == "prepare":
            where = prepare(args.name, args.data_dir, args.manual_dir)
            print(f"{args.name} is prepared in {where}; train on it with "
                  f"python -m train --dataset {args.name}{' --data-dir ' + args.data_dir if args.data_dir else ''}.")
            return 0
        data = load_dataset(args.name, args.data_dir)
        if args.command == "stats":
            if data.in_memory:
                folder = args.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "flaxnets")
                path = stats_path(folder, data.name)
                write_stats(path, {k: getattr(data, k) for k in ("mean", "std", "eigval", "eigvec")},
                            dataset=data.name, sample=data.train_size, seed=0)
            else:
                if args.sample < 1:
                    raise DataError(f"--sample must be positive, got {args.sample}.")
                folder = args.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
                    os.path.expanduser("~"), "tensorflow_datasets")
                path = stats_path(args.data_dir if data.name == "folder" else folder, data.name)
                if os.path.exists(path):
                    os.replace(path, path + ".previous")
                data = ensure_statistics(data, args.data_dir, sample=args.sample)
            print(json.dumps({k: getattr(data, k) for k in ("mean", "std", "eigval", "eigvec")}, indent=1))
            print(f"stored in {path}", file=sys.stderr)
            return 0
        described = {k: v for k, v in data.describe().items() if v != []}  # statistics not computed yet
        described["source"] = "original files" if data.in_memory else (
            "a folder of images" if data.name == "folder" else f"tensorflow-datasets, split {data.test_split} for testing")
        print(json.dumps(described, indent=1))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
