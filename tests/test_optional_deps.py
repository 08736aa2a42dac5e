"""Without tensorflow-datasets, Grain and array_record (an accelerator host set up with ``pip install
--no-deps -e .``): the project imports, trains on data held in memory, and names the missing package for
the datasets that need it.

One subprocess, whose import system refuses those packages and records every attempt to import them:
the imports and the training run must not even try; the tfds name and the streamed folder must fail
with one sentence and exit status 2.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from compiling import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow_datasets", "grain", "array_record")

SCRIPT = r'''
import contextlib, importlib, importlib.abc, io, json, sys

BLOCKED = set(sys.argv[1].split(","))
attempts = []

class Refuse(importlib.abc.MetaPathFinder):
    """Every import of a blocked package fails, as on a machine without it, and is recorded."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Refuse())
modules = ["flaxnets", "flaxnets.convert", "train", "train.data", "train.loop", "train.exits", "train.evaluate",
           "train.predict", "train.plots", "train.lr_find", "train.lr_range", "train.data.__main__", "benchmarks", "benchmarks.common",
           "benchmarks.throughput", "benchmarks.flops", "benchmarks.profile", "benchmarks.vs_torch",
           "benchmarks.cpu_kernels", "benchmarks.input_pipeline", "benchmarks.stream_train", "benchmarks.tfds_parity",
           "benchmarks.gpu.runner", "benchmarks.gpu.checks", "benchmarks.peers", "benchmarks.step_variants",
           "train.tuning"]
for name in modules:
    importlib.import_module(name)
report = {"import_attempts": list(attempts)}

from train.__main__ import main

workdir, folder = sys.argv[2], sys.argv[3]
report["digits_rc"] = main(["--arch", "lenet5_relu", "--dataset", "digits", "--epochs", "1", "--warmup-epochs", "0",
                            "--batch-size", "128", "--image-size", "12", "--workdir", workdir, "--no-plots"])
report["train_attempts"] = list(attempts)
metrics = [json.loads(line) for line in open(workdir + "/metrics.jsonl")]
report["test_top1"] = metrics[-1]["test_top1"]
for key, args in (("tfds", ["--dataset", "imagenette", "--workdir", workdir + "-tfds"]),
                  ("stream", ["--dataset", "folder", "--data-dir", folder, "--pipeline", "stream", "--image-size", "16",
                              "--batch-size", "2", "--workdir", workdir + "-stream"])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report[key + "_rc"] = main(args)
    report[key + "_err"] = err.getvalue()
print("REPORT " + json.dumps(report))
'''


def test_imports_and_in_memory_training_need_neither_tensorflow_datasets_nor_grain(tmp_path):
    for label in ("a", "b"):  # a tiny folder of images, streamed on request
        (tmp_path / "folder" / label).mkdir(parents=True)
        for index in range(3):
            pixels = np.full((16, 16, 3), 60 * index + (100 if label == "b" else 0), np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / label / f"{index}.png")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "",
           "XLA_FLAGS": xla_flags(1), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED), str(tmp_path / "run"),
                             str(tmp_path / "folder")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["import_attempts"] == [] and report["train_attempts"] == []
    assert report["digits_rc"] == 0 and report["test_top1"] > 0.1  # one epoch: better than chance
    assert report["tfds_rc"] == 2
    assert report["tfds_err"] == ("error: --dataset imagenette needs tensorflow-datasets, which is not installed "
                                  "here: pip install tensorflow-datasets (pip install -e . installs it with the rest "
                                  "of flaxnets).\n")
    assert report["stream_rc"] == 2
    assert report["stream_err"].startswith("error: streaming a dataset through worker processes")
    assert "pip install grain" in report["stream_err"] and report["stream_err"].count("\n") == 1
