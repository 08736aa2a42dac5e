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
from train.config import _Parser
from train.data import DataError, Dataset, ensure_statistics, load_dataset
from train.data.optional import require
from train.data.stats import stats_path, write_stats


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> str:
    """Download (or take from ``manual_dir``) and convert ``name`` to ArrayRecord; returns where it went.

    Files in ``manual_dir`` named as tensorflow-datasets records them (the original distribution files:
    ``train-images-idx3-ubyte.gz``, ``cifar-10-binary.tar.gz``, ImageNet's tars) are used instead of
    downloading, after the same checksum check a download gets.
    """
    if manual_dir and not os.path.isdir(manual_dir):
        raise DataError(f"--manual-dir {manual_dir} is not a folder.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner is not for this user
    try:
        import tensorflow  # noqa: F401  (tensorflow-datasets' builders need it to write)
    except ImportError:
        raise DataError("preparing a tensorflow-datasets dataset needs TensorFlow: pip install -e \".[prepare]\" "
                        "(training on the prepared data does not).") from None
    tfds = require("tensorflow_datasets", f"preparing {name}")
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tensorflow-datasets has no dataset called {name!r}.") from None
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as error:  # network, checksum and manual-file errors all end here
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"preparing {name} failed: {message}") from None
    return str(builder.data_dir)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
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
            if isinstance(data, Dataset):
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
        described["source"] = "original files" if isinstance(data, Dataset) else (
            "a folder of images" if data.name == "folder" else f"tensorflow-datasets, split {data.test_split} for testing")
        print(json.dumps(described, indent=1))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
