"""benchmarks/gpu_run.sh: its dry run (every step at toy sizes on the CPU) end to end, and the pieces of
the run that need no JAX: the order of the throughput table and the summary of steps that did not finish.

The dry run takes 1.5-2 minutes on 2 CPU cores shared with other work (70 s of CPU time).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from benchmarks.gpu import runner, throughput
from compiling import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_prints_the_summary(tmp_path):
    out = tmp_path / "run"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path), "XLA_FLAGS": FAST_COMPILE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # as tests/conftest.py sets it
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for step in runner.STEPS:
        data = json.loads((out / f"{step}.json").read_text())
        assert data["status"] == "ok" and data["ok"] and data["dry_run"], (step, data.get("headline"), data.get("error"))
        assert (out / f"{step}.log").read_text().strip()
    table = "".join(line for line in result.stdout[result.stdout.index("| step | status"):].splitlines(keepends=True)
                    if line.startswith("|"))
    assert f"results: {out}/results.tgz" in result.stdout
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == list(runner.STEPS)
    assert all(line.split("|")[2].strip() == "ok" for line in table.splitlines()[2:])
    assert (out / "summary.md").read_text().endswith(table)
    with tarfile.open(out / "results.tgz") as packed:
        names = set(packed.getnames())
    assert names >= {"summary.md"} | {f"{s}.{e}" for s in runner.STEPS for e in ("json", "log")}
    assert all(name.endswith((".json", ".log", ".md")) for name in names)  # no checkpoints, no cache
    correctness = json.loads((out / "correctness.json").read_text())
    assert {row["check"] for row in correctness["steps"]} == {"float32", "bfloat16"}
    assert correctness["parity"][0]["logits_error"] < correctness["parity"][0]["tolerance"]
    accuracy = json.loads((out / "accuracy.json").read_text())  # candidates screened with seed 0 on validation
    assert [(r["seed"], r["val_top1"] is not None) for r in accuracy["runs"]] == [(0, True), (0, True), (1, True)]
    assert accuracy["runs"][2]["candidate"] == accuracy["chosen"] == max(accuracy["runs"][:2],
                                                                         key=lambda r: r["val_top1"])["candidate"]
    assert accuracy["settings_over_baseline"] == ({} if accuracy["chosen"] == "as given" else {"label_smoothing": 0.1})
    tune = json.loads((out / "tune.json").read_text())
    assert tune["gpu_settings_line"].startswith("GPU_SETTINGS = StepSettings(")
    assert any(row["xla_flags"] and "images_per_s" in row for row in tune["rows"])  # the variant in its own process


def test_throughput_order_puts_the_first_architecture_then_bfloat16_training_first():
    order = throughput.throughput_order(["resnet50", "resnet18", "vgg16"])
    assert order[:4] == [("resnet50", "train", "bfloat16"), ("resnet50", "infer", "bfloat16"),
                         ("resnet50", "train", "float32"), ("resnet50", "infer", "float32")]
    assert order[4:6] == [("resnet18", "train", "bfloat16"), ("vgg16", "train", "bfloat16")]
    assert len(order) == len(set(order)) == 12


def test_summary_names_steps_that_timed_out_crashed_or_never_ran(tmp_path):
    runner.Record(tmp_path, "environment", dry=True, budget=10).finish(True, "fine")
    runner.Record(tmp_path, "correctness", dry=True, budget=10)  # killed while running
    runner.Record(tmp_path, "parallel", dry=True, budget=10)
    killed = runner.Record(tmp_path, "throughput", dry=True, budget=10)
    killed.data["rows"] = [{"arch": "resnet50"}, {"arch": "vgg16"}, {"arch": "alexnet", "error": "boom"}]
    killed.doing("googlenet train bfloat16")
    text = runner.summary(tmp_path, {"environment": 0, "correctness": 124, "parallel": 1, "throughput": 124},
                           dry=True)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| ")}
    assert rows["environment"] == "ok" and rows["correctness"] == "timeout" and rows["parallel"] == "crashed (exit 1)"
    assert rows["tune"] == "missing" and (tmp_path / "summary.md").read_text() == text
    results = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in text.splitlines()
               if line.startswith("| ")}
    assert results["throughput"] == "stopped during googlenet train bfloat16; 2 rows saved before"
    assert results["correctness"] == "stopped"


def test_the_settings_line_names_a_setting_and_a_candidate_kernel_set_as_the_gpu_set_to_become():
    from benchmarks.gpu import tune
    from train.tuning import StepSettings

    settings = StepSettings(compiler_options={"xla_gpu_autotune_level": 0}, kernels="gpu")
    assert tune.settings_line(settings, "plain") == (
        "GPU_SETTINGS = StepSettings(compiler_options={'xla_gpu_autotune_level': 0}, matmul_precision=None, "
        "kernels='plain')")
    line = tune.settings_line(settings, "gpu, max-pool by phase")
    assert "kernels='gpu')  # once flaxnets.gpu.ops() is the 'gpu, max-pool by phase' set" in line


def test_the_accuracy_step_reads_the_chosen_checkpoints_figures_off_the_trainers_last_line():
    from benchmarks.gpu.accuracy import REAL, chosen_figures
    from train.report import done_line
    from train.config import Config

    results = {"test_top1": 0.9561, "epoch": 72, "best_step": 7560, "best_epoch": 72, "best_top1": 0.9583,
               "best_selected_on": "val", "best_test_top1": 0.9574, "best_weights": "averaged"}
    line = done_line(Config(arch="resnet18_cifar", dataset="fashion_mnist"), results)
    assert chosen_figures(line) == {"test_top1": pytest.approx(0.9574), "chosen_weights": "averaged",
                                    "test_top1_one_view": None, "val_top1": pytest.approx(0.9583)}
    with_mirrors = done_line(Config(), {**results, "test_top1_one_view": 0.9552, "best_test_top1_one_view": 0.9549})
    assert chosen_figures(with_mirrors)["test_top1_one_view"] == pytest.approx(0.9549)
    assert chosen_figures("done: lenet5_relu on digits, test top-1 97.50% after 1 epoch.")["test_top1"] is None
    assert "--eval-flip" in REAL.train  # every candidate scored alike, the one-view figures beside


def test_the_accuracy_step_states_the_winners_settings_as_changes_to_the_recipe():
    from benchmarks.gpu.accuracy import REAL, recipe_changes

    cutmix = next(c for c in REAL.candidates if "cutmix" in c.name)
    assert recipe_changes(REAL.baseline, [*REAL.train, *cutmix.args]) == {
        "epochs": 72, "cutmix_alpha": 1.0, "mix_prob": 0.5, "eval_flip": True}
