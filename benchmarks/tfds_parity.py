"""Does the tensorflow-datasets route give the trainer the same data as the original files?

    python -m benchmarks.tfds_parity --files ../shared/datasets/fashion_mnist --tfds-dir /tmp/tfds --prepare

Loads MNIST or Fashion-MNIST twice, as the trainer does: from the four original IDX files (``--files``) and
from a tensorflow-datasets copy in ``--tfds-dir`` (prepared first from those same files with ``--prepare``,
offline, through tensorflow-datasets' own builder; that step needs the ``prepare`` extra). It prints, per
split, whether the two hold the same (image, label) pairs and whether in the same order, and compares the
class names and the computed statistics. tensorflow-datasets shuffles examples when it writes them, so the
order differs; the trainer draws its own permutation every epoch either way.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

from train.exits import run_command
from train.arguments import CommandParser


def _pairs(images: np.ndarray, labels: np.ndarray) -> list[str]:
    return sorted(hashlib.sha256(image.tobytes() + int(label).to_bytes(2, "little")).hexdigest()
                  for image, label in zip(images, labels))


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks.tfds_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("mnist", "fashion_mnist"))
    parser.add_argument("--files", required=True, help="folder of the four original IDX .gz files")
    parser.add_argument("--tfds-dir", required=True, help="tensorflow-datasets data folder")
    parser.add_argument("--prepare", action="store_true", help="prepare the tfds copy from --files first")
    args = parser.parse_args(argv)

    def body() -> int:
        from train.data import fit_in_memory, load_dataset

        if args.prepare:
            from train.data.prepare import prepare

            started = time.perf_counter()
            where = prepare(args.dataset, args.tfds_dir, args.files)
            print(f"prepared {where} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        direct = load_dataset(args.dataset, args.files)
        direct_s = time.perf_counter() - started
        started = time.perf_counter()
        via_tfds = fit_in_memory(load_dataset(args.dataset, args.tfds_dir), direct.image_shape[0])
        tfds_s = time.perf_counter() - started
        same = True
        for split in ("train", "test"):
            a = (getattr(direct, f"{split}_images"), getattr(direct, f"{split}_labels"))
            b = (getattr(via_tfds, f"{split}_images"), getattr(via_tfds, f"{split}_labels"))
            pairs = _pairs(*a) == _pairs(*b)
            order = a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            same &= pairs
            print(f"{split}: {len(a[1]):,} files / {len(b[1]):,} tfds examples; identical (image, label) pairs: "
                  f"{pairs}; same order: {order}")
        statistics = all(np.allclose(getattr(direct, k), getattr(via_tfds, k), rtol=0, atol=1e-12)
                         for k in ("mean", "std", "eigval", "eigvec"))
        names = direct.class_names == via_tfds.class_names
        print(f"class names equal: {names}; mean, std and colour PCA equal: {statistics}")
        print(f"load time: original files {direct_s:.1f} s, tensorflow-datasets {tfds_s:.1f} s")
        return 0 if same and names and statistics else 1

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
