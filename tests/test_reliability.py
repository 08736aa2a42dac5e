"""Reliability of the trainer and the commands around it: one training run per workdir, resume that keeps
the experiment, every file of a workdir (and every weights file, image and flag) treated as untrusted, and
a process of a multi-process run that dies without hanging the others.

One tiny trained workdir serves most tests (`trained`: LeNet-5 on the digits at 12x12 pixels, one epoch of
22 steps, one checkpoint; a subprocess on one CPU device); each test works on its own copy. The commands run
in this process where they can (8 CPU devices, compiled programs cached for the module), the trainer in a
subprocess where a run must train or die.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_train_cli import (ROOT, _describe, _finish, _finish_together, _start, assert_ok, free_port, run_cli,
                            snapshot)

ARGS = ("--arch", "lenet5", "--dataset", "digits", "--batch-size", "64", "--schedule", "constant", "--warmup-epochs",
        "0", "--lr", "0.05", "--seed", "0", "--no-plots", "--epochs", "1")
STEP = 1437 // 64  # the one checkpoint of `trained`


@pytest.fixture(scope="module")
def trained(compile_cache, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_cli(compile_cache, (*ARGS, "--workdir", workdir)))
    return workdir


@pytest.fixture
def copy(trained, tmp_path):
    return lambda name="run": shutil.copytree(trained, tmp_path / name)


@pytest.fixture
def command(capsys):
    """``(module, *args) -> (exit code, stdout, stderr)``: a command of `train` run in this process (with
    the session's compile cache, tests/conftest.py)."""

    def run(module: str, *args) -> tuple[int, str, str]:
        import importlib

        capsys.readouterr()
        try:
            code = importlib.import_module(module).main([str(a) for a in args])
        except SystemExit as exit:  # argparse's own refusal
            code = exit.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out, err
    return run


def one_error(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> pathlib.Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    return path


# -- one run per workdir ----------------------------------------------------------------------------------

HOLD = ("import sys, time; from train.workdir import Lock; Lock(sys.argv[1]).acquire(); print('held', flush=True); "
        "time.sleep(300)")


def test_a_second_run_is_refused_naming_the_holder_while_readers_read(copy, command, image):
    """A run holds its workdir (here a process that takes the lock as a run does); a second run, even one
    with other settings, is refused in one sentence that names it and changes nothing; evaluate and predict
    read meanwhile. Once the holder is killed (SIGKILL: its lock file stays behind, stale), the lock is free."""
    workdir = copy()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(workdir)
        code, _, err = command("train.__main__", *ARGS, "--lr", "0.1", "--workdir", workdir)
        line = one_error(err)
        assert code == 2 and re.fullmatch(
            rf"error: --workdir {re.escape(str(workdir))} is in use by another training run \(pid {holder.pid} on "
            rf"{re.escape(socket.gethostname())}, started [\d:T-]+\); wait for it to end or stop it, or train into "
            r"another --workdir\.", line), line
        assert command("train.evaluate", "--workdir", workdir)[0] == 0
        assert command("train.predict", "--workdir", workdir, image)[0] == 0
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    assert (workdir / ".lock").exists()  # stale: its process is gone
    from train.workdir import Lock

    with Lock(str(workdir)):
        assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    assert not (workdir / ".lock").exists(), "the lock is freed on exit"


def test_the_lock_is_exclusive_between_open_files_and_reports_an_unreadable_holder(tmp_path):
    from train.workdir import Lock, WorkdirBusy

    with Lock(str(tmp_path)):
        with pytest.raises(WorkdirBusy, match=rf"\(pid {os.getpid()} on "):
            Lock(str(tmp_path)).acquire()
        (tmp_path / ".lock").write_bytes(b"\xff garbage")
        with pytest.raises(WorkdirBusy, match=r"\(an unknown process: its lock file holds no readable holder\)"):
            Lock(str(tmp_path)).acquire()
    assert not (tmp_path / ".lock").exists()
    with Lock(str(tmp_path)):  # and free again
        pass


# -- resume keeps the experiment -------------------------------------------------------------------------

def test_every_setting_is_classified_for_resume():
    from train.config import RESUME, Config

    assert set(RESUME) == {field.name for field in dataclasses.fields(Config)}
    assert set(RESUME.values()) == {"fixed", "result", "free"}


def test_resume_with_settings_that_change_the_result_is_refused_naming_them(copy, command):
    workdir = copy()
    before = snapshot(workdir)
    code, _, err = command("train.__main__", *ARGS, "--seed", "1", "--lr", "0.1", "--label-smoothing", "0.1",
                           "--workdir", workdir)
    assert code == 2
    one_error(err, f"{workdir} holds a run trained with --lr 0.05, --label-smoothing 0.0, --seed 0 (this run: --lr "
                   "0.1, --label-smoothing 0.1, --seed 1), settings that change the result", "--allow-changes")
    code, _, err = command("train.__main__", *ARGS, "--batch-size", "32", "--allow-changes", "--workdir", workdir)
    assert code == 2
    one_error(err, "--batch-size 64 (this run: --batch-size 32)", "use another --workdir")
    assert snapshot(workdir) == before, "a refused run changes nothing"
    # How the run is executed, stored or watched changes freely.
    free = ("--log-every-steps", "5", "--keep-checkpoints", "4", "--eval-batch-size", "100", "--parallel", "pmap",
            "--workers", "3", "--checkpoint-every-epochs", "2", "--heartbeat-timeout-seconds", "60")
    assert resumes(workdir, *ARGS, *free) == {}


def resumes(workdir: pathlib.Path, *args) -> dict:
    """The settings a run of ``args`` would change (`train.resume.check_resume`) resuming ``workdir``'s latest
    checkpoint; raises as that run would."""
    from train.arguments import parse_args
    from train.inference import load_variables, locate
    from train.resume import check_resume
    from train.run import build_run

    _, meta = load_variables(*locate(str(workdir)))
    return check_resume(meta, build_run(parse_args([*args, "--workdir", str(workdir)])), str(workdir))


def test_allow_changes_records_the_change_in_the_history(copy, compile_cache):
    workdir = copy()
    changed = ("--seed", "1", "--epochs", "2")
    result = run_cli(compile_cache, (*ARGS, *changed, "--allow-changes", "--workdir", workdir))
    assert_ok(result)
    assert "note: resuming with --epochs 2, --seed 1 (--allow-changes), recorded in the run's history." in result.stdout
    history = [{"step": STEP, "changes": {"epochs": [1, 2], "seed": [0, 1]}}]
    config = json.loads((workdir / "config.json").read_text())
    assert (config["seed"], config["epochs"], config["history"]) == (1, 2, history)
    from train.inference import load_variables

    assert load_variables(str(workdir), 2 * STEP)[1]["history"] == history
    assert resumes(workdir, *ARGS, *changed) == {}, "the checkpoint records those settings now: no flag needed"


# -- every file untrusted ----------------------------------------------------------------------------------

def _garbage(data: bytes) -> bytes:
    return bytes(np.random.default_rng(len(data)).integers(128, 256, max(len(data), 16), dtype=np.uint8))


DAMAGES = {"emptied": lambda data: b"", "truncated": lambda data: data[: len(data) // 2], "garbage": _garbage}


@pytest.fixture(scope="module")
def resumer(trained):
    """``workdir -> outcome`` of what a training run does first in ``workdir`` (`train.resume.resume`, then the
    records' `Reporter.start`): the state it resumes from, or the `CheckpointError` that stops it."""
    from train.checkpoint import CheckpointError, Checkpoints
    from train.arguments import parse_args
    from train.resume import resume
    from train.report import Reporter
    from train.run import build_run

    run = build_run(parse_args([*ARGS, "--workdir", str(trained)]))

    def outcome(workdir: pathlib.Path):
        warnings: list[str] = []
        checkpoints = Checkpoints(str(workdir), warn=warnings.append)
        try:
            start = resume(run, str(workdir), checkpoints)
        except CheckpointError as error:
            return error, warnings
        finally:
            checkpoints.close()
        reporter = Reporter(str(workdir), 1, tensorboard=False)
        reporter.start(start.step or 0)
        reporter.close()
        return start, warnings
    return outcome


def _variables(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def original(trained, resumer, tmp_path_factory):
    """What every command reads from the undamaged workdir: the trainer's state, the readers' variables."""
    from train.inference import load_variables

    workdir = shutil.copytree(trained, tmp_path_factory.mktemp("original") / "run")
    start, warnings = resumer(workdir)
    assert start.step == STEP and warnings == []
    variables, meta = load_variables(str(workdir), STEP)
    return _variables(start.state), _variables(variables), meta


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_file_of_a_workdir_damaged_is_used_set_aside_or_refused(trained, resumer, original, damage, tmp_path,
                                                                   caplog):
    """Each file of a trained workdir, damaged in turn (emptied, cut in half, replaced by binary garbage):

    - evaluate and predict (`locate`, `load_variables`) read the same variables as from the intact workdir,
      or refuse in one sentence; they change nothing;
    - the trainer resumes from the same state, or sets the checkpoint aside whole (the damaged bytes kept
      under corrupt_checkpoints/) and, having no other, stops in one sentence; metrics.jsonl lines it cannot
      read move to metrics.superseded.jsonl. Nothing else is changed, nothing lost.
    """
    from train.checkpoint import CheckpointError
    from train.figures import read_metrics
    from train.inference import load_variables, locate

    state, variables, meta = original
    files = sorted(p.relative_to(trained) for p in trained.rglob("*") if p.is_file())
    assert len(files) > 15 and pathlib.Path("metrics.jsonl") in files
    outcomes = {}
    for index, name in enumerate(files):
        workdir = shutil.copytree(trained, tmp_path / str(index))
        path = workdir / name
        path.write_bytes(DAMAGES[damage](path.read_bytes()))
        damaged = snapshot(workdir)
        try:
            read = _variables(load_variables(*locate(str(workdir), "latest"))[0])
            assert all(np.array_equal(a, b) for a, b in zip(read, variables)), f"{name}: other values read"
            reader = "same"
        except CheckpointError as error:
            reader = f"refused: {error}"
        assert snapshot(workdir) == damaged, f"{name}: a reader changed the workdir"
        read_metrics(str(workdir / "metrics.jsonl"))  # the plots' reading never fails either

        start, warnings = resumer(workdir)
        after = snapshot(workdir)
        if isinstance(start, CheckpointError):
            assert re.fullmatch(rf"no checkpoint in \S+ can be read \(checkpoint {STEP}: .+\); they were moved to "
                                r"\S+corrupt_checkpoints, so the next run starts afresh\.", str(start)), str(start)
            moved = {key.replace(f"corrupt_checkpoints/{STEP}", f"checkpoints/{STEP}", 1): value
                     for key, value in after.items() if key.startswith("corrupt_checkpoints/")}
            assert moved == {k: v for k, v in damaged.items() if k.startswith(f"checkpoints/{STEP}")}, name
            trainer = "set aside"
        else:
            assert start.step == STEP and warnings == [], (name, warnings)
            assert all(np.array_equal(a, b) for a, b in zip(_variables(start.state), state)), f"{name}: other state"
            trainer = "resumed"
        unchanged = {k: v for k, v in damaged.items() if not k.startswith(("checkpoints", "metrics"))}
        assert {k: after[k] for k in unchanged} == unchanged, name
        if name == pathlib.Path("metrics.jsonl"):  # every byte kept, the unreadable ones set aside
            kept = after["metrics.jsonl"] + after.get("metrics.superseded.jsonl", b"")
            assert sorted(kept.splitlines()) == sorted(damaged["metrics.jsonl"].splitlines()), kept
        outcomes[str(name)] = (reader, trainer)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [], "no echo on stderr"
    print(json.dumps(outcomes, indent=1))
    assert {trainer for _, trainer in outcomes.values()} == {"resumed", "set aside"}


META_DAMAGES = {
    "a list": [1, 2],
    "num_classes a string": {"num_classes": "10"},
    "class names of another count": {"dataset": "class_names[:3]"},
    "a config of the wrong type": {"config": {"lr": "fast"}},
    "epoch sums without their count": {"position": 3, "epoch_sums": {"loss_sum": 1.0}},
}


@pytest.mark.parametrize("damage", META_DAMAGES)
def test_a_checkpoint_meta_of_the_wrong_shape_is_one_sentence(trained, resumer, tmp_path, damage):
    """Valid JSON of the wrong shape in a checkpoint's meta item: readers refuse it in one sentence naming the
    key, the trainer sets the checkpoint aside."""
    from train.checkpoint import CheckpointError
    from train.inference import load_variables

    workdir = shutil.copytree(trained, tmp_path / "run")
    path = workdir / "checkpoints" / str(STEP) / "meta" / "metadata"
    meta, change = json.loads(path.read_text()), META_DAMAGES[damage]
    if isinstance(change, list):
        meta = change
    elif change.get("dataset") == "class_names[:3]":
        meta["dataset"]["class_names"] = meta["dataset"]["class_names"][:3]
    else:
        meta.update(change)
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {STEP} in \S+ cannot be read \(its meta item .+\)\.$"):
        load_variables(str(workdir), STEP)
    start, _ = resumer(workdir)
    assert isinstance(start, CheckpointError) and (workdir / "corrupt_checkpoints" / str(STEP)).is_dir()


def test_files_larger_than_any_run_writes_are_set_aside_or_refused(trained, resumer, tmp_path):
    """Oversized content (sparse files of 100 MiB: nothing is written to disk): a checkpoint's meta item is
    skipped by the readers and set aside by the trainer; a metrics.jsonl is refused in one sentence."""
    from train.checkpoint import CheckpointError
    from train.figures import read_metrics
    from train.inference import locate
    from train.report import Reporter
    from train.workdir import Unreadable, WorkdirError

    workdir = shutil.copytree(trained, tmp_path / "meta")
    os.truncate(workdir / "checkpoints" / str(STEP) / "meta" / "metadata", 100 << 20)
    with pytest.raises(CheckpointError, match=rf"checkpoint {STEP}: meta/metadata is larger than 67,108,864 bytes"):
        locate(str(workdir))
    start, _ = resumer(workdir)
    assert isinstance(start, CheckpointError) and (workdir / "corrupt_checkpoints" / str(STEP)).is_dir()

    workdir = shutil.copytree(trained, tmp_path / "records")
    os.truncate(workdir / "metrics.jsonl", 100 << 20)
    reporter = Reporter(str(workdir), 1, tensorboard=False)
    with pytest.raises(WorkdirError, match=r"metrics.jsonl holds 104,857,600 bytes, more than a run writes"):
        reporter.start(STEP)
    with pytest.raises(Unreadable):  # the plots leave the curves out, with a warning
        read_metrics(str(workdir / "metrics.jsonl"))


def test_unreadable_checkpoints_give_the_same_answer_to_every_command(copy, command, image):
    """Every checkpoint's meta garbled: train, evaluate and predict all answer in one sentence (exit 2), none
    with a traceback nor, for the trainer, a silent start from step 0; the next run starts afresh, and
    TensorBoard's restart marker then hides the events of the first run (restart at step 0)."""
    workdir = copy()
    (workdir / "checkpoints" / str(STEP) / "metrics" / "metrics").write_bytes(b"\xff\xfe not JSON")
    for module, args in (("train.evaluate", ()), ("train.predict", (image,))):
        code, _, err = command(module, "--workdir", workdir, *args)
        assert code == 2
        one_error(err, f"no checkpoint in {workdir} can be read (checkpoint {STEP}: metrics/metrics is not text")
    code, _, err = command("train.__main__", *ARGS, "--workdir", workdir)
    assert code == 2
    one_error(err, f"checkpoint {STEP}: metrics/metrics is not text (UTF-8)", "so the next run starts afresh")
    assert (workdir / "corrupt_checkpoints" / str(STEP) / "metrics" / "metrics").read_bytes() == b"\xff\xfe not JSON"


def test_a_restart_from_step_0_marks_tensorboard_so_no_step_shows_twice(tmp_path):
    """A run that starts again from step 0 (its only checkpoint set aside, say) writes TensorBoard's restart
    marker too, so the first run's events of the steps it trains again are hidden."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.report import Reporter

    for run in range(2):
        reporter = Reporter(str(tmp_path), 10)
        reporter.start(0)
        reporter.record({"step": 5, "test_top1": 0.5 + run / 4})
        reporter.close()
        if run == 0:  # file names sort by the second they were made in: make the first one older
            (first,) = (tmp_path / "tensorboard").iterdir()
            first.rename(first.with_name("events.out.tfevents.0000000001.host.1"))
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(event.step, event.value) for event in accumulator.Scalars("test_top1")] == [(5, 0.75)]


# -- bad input: flags, factories, weights ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("--seed", "-1"), "--seed must be a whole number from 0 to 4294967295, got -1."),
    (("--seed", "100000000000000000000000"), "--seed must be a whole number from 0 to 4294967295"),
    (("--seed", "1e23"), "argument --seed: invalid int value: '1e23'"),
    (("--image-size", "100000"), "--image-size must be at most 4096, got 100000."),
    (("--workers", "100000"), "--workers must be at most 256"),
    (("--epochs", "10000000000"), "--epochs must be at most 2,147,483,647"),
    (("--epochs", "100000000"), "--epochs 100000000 makes 2,200,000,000 steps of digits, more than a run counts"),
    (("--warmup-epochs", "1e300"), "--warmup-epochs 1e+300 makes"),
    (("--lr-decay-epochs", "100000000000", "--schedule", "step"), "--lr-decay-epochs 100000000000 makes"),
    (("--lr-decay-epochs", "-5", "--schedule", "step"), "--lr-decay-epochs must be positive epochs, got -5."),
    (("--lr-find-steps", "1000000000"), "--lr-find-steps must be at most 100,000"),
    (("--heartbeat-timeout-seconds", "0"), "--heartbeat-timeout-seconds must be from 1 to 3600, got 0."),
    (("--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1234"),
     "--process-id must be from 0 to --num-processes - 1 (1), got 2."),
    (("--coordinator", "localhost:99999", "--num-processes", "2", "--process-id", "0"),
     "--coordinator must be HOST:PORT with a port from 1 to 65535"),
    (("--config", '{"seed": 1e23}'), "seed must be a whole number, got 1e+23."),
    (("--init-from", "IMAGENET1K_V1"), "lenet5 has no published weights"),
])
def test_every_numeric_flag_is_range_checked_in_one_sentence(args, message, command, tmp_path):
    code, _, err = command("train.__main__", *ARGS, *args, "--workdir", tmp_path / "run")
    assert code == 2
    one_error(err, message)
    assert not (tmp_path / "run").exists()


def test_init_from_weights_of_an_architecture_torchvision_lacks_is_one_sentence(tmp_path):
    """ResNet weights into LeNet-5: refused by the trainer's settings and by the library's converter."""
    import flaxnets
    from flaxnets.convert import save_state_dict
    from train.arguments import parse_args
    from train.config import ConfigError

    weights = tmp_path / "resnet18.npz"
    save_state_dict({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, weights)
    with pytest.raises(ConfigError, match="lenet5 has no torchvision counterpart"):
        parse_args([*ARGS, "--init-from", str(weights)])
    with pytest.raises(ValueError, match="lenet5 has no torchvision counterpart"):
        flaxnets.convert.from_torch("lenet5", {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})


@pytest.mark.parametrize("dtype", ["U1", "complex64"])
def test_a_weights_file_of_text_or_complex_numbers_is_one_sentence(dtype, tmp_path):
    from flaxnets.convert import WeightsFileError, load_state_dict

    path = tmp_path / "weights.npz"
    np.savez(path, **{"fc.weight": np.zeros(2, dtype)})
    with pytest.raises(WeightsFileError, match=rf"tensor 'fc.weight' holds {np.dtype(dtype)} values, not real numbers"):
        load_state_dict(path)


FACTORIES = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int = 10
    out: int = 10
    dtype: object = None
    param_dtype: object = None
    bn_axis_name: object = None

    @nn.compact
    def __call__(self, x, train):
        if self.out < 0:
            raise ZeroDivisionError("no forward pass today")
        return nn.Dense(self.out)(x.reshape((x.shape[0], -1)))


def raises(num_classes, **fields):
    raise RuntimeError("the factory is broken")


def wide(num_classes, **fields):
    return Net(num_classes=num_classes, out=num_classes + 3, **fields)


def number(num_classes, **fields):
    return 42


def fails(num_classes, **fields):
    return Net(num_classes=num_classes, out=-1, **fields)


for factory in (raises, wide, number, fails):
    factory.input_size, factory.in_channels = 8, 1
'''


@pytest.mark.parametrize("factory, message", [
    ("raises", "the factory failed (RuntimeError: the factory is broken)."),
    ("wide", "returns logits of shape (2, 13) in inference for 2 images; 10 classes need logits of shape (batch, 10)."),
    ("number", "the factory returned a value of type int, not a flax.linen Module."),
    ("fails", "fails on 8x8x1 images (ZeroDivisionError: no forward pass today)."),
])
def test_a_user_factory_that_fails_is_named_in_one_sentence(factory, message, command, tmp_path):
    (tmp_path / "nets.py").write_text(FACTORIES)
    arch = f"{tmp_path / 'nets.py'}:{factory}"
    code, _, err = command("train.__main__", *ARGS, "--arch", arch, "--workdir", tmp_path / "run")
    assert code == 2
    one_error(err, f"error: --arch {arch}", message)
    assert not (tmp_path / "run").exists()


def _png_header(width: int, height: int) -> bytes:
    """The start of a grey PNG of ``width`` x ``height`` pixels: enough for PIL to read its size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_too_large_to_decode_safely_is_one_sentence(trained, command, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(20000, 10000))  # 200 million pixels (PIL refuses more than 179 million)
    code, _, err = command("train.predict", "--workdir", trained, big)
    assert code == 2
    one_error(err, f"{big} is too large to decode safely")


# -- many processes, one dies ------------------------------------------------------------------------------

def test_the_watcher_passes_the_trainer_lines_and_turns_the_runtime_fatal_into_one_sentence(tmp_path):
    """`train.stderr_watch`: what a process whose peer died writes to stderr, through the watcher."""
    runtime = (
        "E1204 15:59:00.845449   29183 coordination_service_agent.cc:289] Polled an error from coordination service.\n"
        "F1204 15:59:00.845496   29183 client.h:80] Terminating process because the JAX distributed service detected "
        "fatal errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: The following "
        "tasks are unhealthy (stopped sending heartbeats):\n"
        "1\n"
        "*** Check failure stack trace: ***\n"
        "    @     0x7f5664e40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n")
    (tmp_path / "run").mkdir()
    watched = subprocess.run([sys.executable, "-m", "train.stderr_watch", "1", "2", str(tmp_path / "run")], cwd=ROOT,
                             input="warning: something the trainer says.\n" + runtime, capture_output=True, text=True,
                             timeout=60)
    log = tmp_path / "run" / "logs" / "runtime.process-1.log"
    assert watched.stderr.splitlines() == [
        "warning: something the trainer says.",
        "error: process 1 of 2 was stopped by JAX's distributed runtime: another process died or cannot be reached "
        f"(UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats)); its log is in {log}; start "
        "every process again with the same command to resume from the last checkpoint."]
    assert log.read_text() == runtime
    # A process that said why it stopped is not contradicted.
    watched = subprocess.run([sys.executable, "-m", "train.stderr_watch", "1", "2", str(tmp_path / "run")], cwd=ROOT,
                             input="error: process 1 of 2 stopped: ...\n" + runtime, capture_output=True, text=True,
                             timeout=60)
    assert watched.stderr.splitlines() == ["error: process 1 of 2 stopped: ..."]


def _pair(cache, args, port: int) -> list[subprocess.Popen]:
    return [_start(cache, (*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i))
            for i in range(2)]


def _steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_a_killed_process_stops_the_other_in_one_sentence_and_both_resume_to_the_same_checkpoints(
        compile_cache, tmp_path):
    """Two processes of one CPU device each (JAX's distributed runtime, coordinator on 127.0.0.1). Process 0,
    which hosts the coordination service, is killed once the first epoch's checkpoint exists: process 1 exits
    within 60 s with one sentence, and the pair started again resumes. Its checkpoints end bitwise equal to
    those of a pair never interrupted (the same programs, the same all-reduce order), run alongside."""
    args = (*ARGS[:-1], "2", "--heartbeat-timeout-seconds", "10")
    reference = _pair(compile_cache, (*args, "--workdir", tmp_path / "reference"), free_port())
    workdir = tmp_path / "killed"
    procs = _pair(compile_cache, (*args, "--workdir", workdir), free_port())
    deadline = time.monotonic() + 300
    while STEP not in _steps(workdir) and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.01)
    assert STEP in _steps(workdir)
    procs[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = _finish(procs[1], timeout=120)
    elapsed = time.monotonic() - killed_at
    _finish(procs[0])
    if survivor.returncode != 0:  # (0: it finished the run before its peer's death reached it)
        assert elapsed < 60, f"the survivor took {elapsed:.0f} s"
        assert "Traceback" not in survivor.stderr, _describe(survivor)
        lines = survivor.stderr.strip().splitlines()
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], _describe(survivor)
        assert lines[-1].endswith("start every process again with the same command to resume from the last "
                                  "checkpoint."), lines[-1]
        assert not re.search(r"^[EWF]\d{4} ", survivor.stderr, re.M), "the runtime's records go to the log"
    for result in _finish_together(_pair(compile_cache, (*args, "--workdir", workdir), free_port())):
        assert_ok(result)
    for result in _finish_together(reference):
        assert_ok(result)
    from train.inference import load_variables

    assert _steps(workdir) == _steps(tmp_path / "reference") == [STEP, 2 * STEP]
    for step in _steps(workdir):
        ours, theirs = (_variables(load_variables(str(w), step)[0]) for w in (workdir, tmp_path / "reference"))
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), f"checkpoint {step} differs"


def test_a_folder_that_would_lose_files_to_a_new_run_is_refused_before_it_starts(tmp_path):
    """`train.workdir.check_layout`, run by the trainer and the range test before anything is read or made."""
    from train.loop import usable_workdir
    from train.workdir import WorkdirError, check_layout

    run = tmp_path / "run"
    (run / "checkpoints" / "11").mkdir(parents=True)
    (run / "config.json").write_text('{"arch": "lenet5_relu", "dataset": "digits", "epochs": 1, "batch_size": 8, '
                                     '"workdir": "run"}')
    check_layout(str(run))  # a run: resumed or refused by its own settings
    check_layout(str(run / "finetune"))  # a folder of its own beside the run's
    for inside in (run / "checkpoints", run / "checkpoints" / "11", run / "plots" / "x"):
        folder = inside.relative_to(run).parts[0]
        with pytest.raises(WorkdirError, match=f"inside the {folder} folder of the run in {run}"):
            usable_workdir(str(inside))
    damaged = tmp_path / "damaged"
    for name, make in ((".lock", "mkdir"), ("config.json", "mkdir"), ("checkpoints", "touch")):
        shutil.rmtree(damaged, ignore_errors=True)
        damaged.mkdir()
        getattr(damaged / name, make)()
        kind = "a folder" if make == "mkdir" else "a file"
        with pytest.raises(WorkdirError, match=f"holds {kind} named {re.escape(name)} where a run keeps"):
            check_layout(str(damaged))
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "lr_find.png").write_bytes(b"a range test's")
    check_layout(str(mine))  # a range test first, then the run
    (mine / "plots" / "curves.png").write_bytes(b"mine")
    with pytest.raises(WorkdirError, match="holds plots/ but no run"):
        check_layout(str(mine))
    (mine / "config.json").write_text('{"learning_rate": 3}')
    with pytest.raises(WorkdirError, match="a config.json that is not a run's"):
        check_layout(str(mine))
    (mine / "config.json").write_text((run / "config.json").read_text())  # an earlier start of a run
    check_layout(str(mine))
    assert (mine / "plots" / "curves.png").read_bytes() == b"mine"


def test_out_of_memory_ends_a_command_in_one_line_saying_what_needs_less(capsys):
    """A batch the device cannot hold is the user's setting, not a defect: the trainer's commands and the
    benchmarks say so in one sentence (XLA's own words on a GPU, then on a CPU), and any other runtime error
    keeps its traceback."""
    from benchmarks.common import run_cli as run_benchmark
    from train.exits import run_command

    def fails(text):
        def body():
            raise jax.errors.JaxRuntimeError(text)
        return body

    gpu = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.00GiB."
    assert run_command(fails(gpu), memory_advice="a smaller --batch-size needs less") == 1
    assert capsys.readouterr().err == f"error: out of memory (JaxRuntimeError: {gpu}); a smaller --batch-size needs less.\n"
    cpu = "INTERNAL: Error dispatching computation: Out of memory allocating 60211201348 bytes."
    assert run_benchmark(fails(cpu)) == 1
    assert capsys.readouterr().err == f"error: out of memory (JaxRuntimeError: {cpu}); a smaller --batch needs less.\n"
    for command in (run_command, run_benchmark):
        with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: a defect"):
            command(fails("INTERNAL: a defect"))


def test_an_error_in_a_sentence_is_its_kind_and_first_line_without_xla_source_paths():
    """`flaxnets.cli.error_phrase`, which every one-sentence message quoting an exception uses."""
    from flaxnets.cli import error_phrase

    xla = jax.errors.JaxRuntimeError("INTERNAL: Failed to launch [external/xla/xla/service/gpu/x.cc:12] kernel\n"
                                     "stack frame 1\nstack frame 2")
    assert error_phrase(xla) == "JaxRuntimeError: INTERNAL: Failed to launch kernel"
    assert error_phrase(ValueError("\n  storage is truncated  \nmore")) == "ValueError: storage is truncated"
    assert error_phrase(KeyError()) == "KeyError"
    assert error_phrase(OSError("x" * 500), limit=10) == "OSError: xxxxxxxxxx"


def test_a_refused_path_and_a_closed_pipe_end_a_command_in_one_line(capsys, tmp_path):
    """`train.exits.run_command`: an OSError is the path and the system's reason; a reader that went away
    (``| head``) ends the command quietly with SIGPIPE's status, as POSIX tools end."""
    from train.exits import run_command

    assert run_command(lambda: open(tmp_path / "none" / "x.png", "wb")) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'none' / 'x.png'}: No such file or directory.\n"
    script = ("import sys; from train.exits import run_command; "
              "sys.exit(run_command(lambda: [print('x' * 99, flush=True) for _ in range(10**6)] and 0))")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"x" * 99 + b"\n"
    process.stdout.close()
    assert process.wait(timeout=120) == 141 and process.stderr.read() == b""
