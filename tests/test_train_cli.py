"""The trainer end to end through its command line: ``python -m train``, ``train.evaluate``, ``train.predict``.

Every run is a subprocess (``sys.executable -m train ...`` from the checkout) with its own ``XLA_FLAGS``
(one CPU device unless the test is about several) and the session's ``JAX_COMPILATION_CACHE_DIR``
(tests/conftest.py), so the runs of one configuration compile once. The configurations are few on purpose: LeNet-5 (ReLU) on
the embedded digits set, global batch 64 (22 steps per epoch), constant learning rate without warm-up
(so the number of epochs does not change the compiled step). On 2 CPU cores a cold compile costs
10-30 s, a warm run about 5 s, most of it Python and JAX start-up; independent runs go side by side.
The whole file: 2.5 min of CPU, 3.7 min wall on 2 cores shared with other work (2026-11).

Data comes from scikit-learn's bundled digits and from small IDX files written here; no test uses the
network or ../shared.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from compiling import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1437 // 64  # digits: 1,437 training images, global batch 64
REF_EPOCHS = 6
REF_STEPS = REF_EPOCHS * STEPS_PER_EPOCH
# The one training configuration most tests share (its compiled programs are cached for the session).
BASE = ("--arch", "lenet5_relu", "--dataset", "digits", "--batch-size", "64", "--schedule", "constant",
        "--warmup-epochs", "0", "--lr", "0.05", "--seed", "0", "--keep-checkpoints", "10", "--no-plots")
TIMEOUT = 300  # seconds for any one run: far above what they take, so a hang fails instead of blocking


# -- running the CLI ------------------------------------------------------------------------------------

def _env(cache: pathlib.Path, devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _command(args, module: str = "train") -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _start(cache, args, *, devices: int = 1, module: str = "train") -> subprocess.Popen:
    return subprocess.Popen(_command(args, module), cwd=ROOT, env=_env(cache, devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} ran past {timeout} s.\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(cache, args, *, devices: int = 1, module: str = "train") -> subprocess.CompletedProcess:
    return _finish(_start(cache, args, devices=devices, module=module))


def run_many(cache, jobs: list[dict], parallel: int = 4) -> list[subprocess.CompletedProcess]:
    """Run ``jobs`` (keyword arguments of `_start`) at most ``parallel`` at a time; results in order.

    Most of a short run is Python and JAX start-up, so overlapping runs saves wall time even on 2 cores.
    """
    results: list = [None] * len(jobs)
    running: list[tuple[int, subprocess.Popen]] = []
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            index, job = pending.pop(0)
            running.append((index, _start(cache, **job)))
        index, proc = running.pop(0)
        results[index] = _finish(proc)
    return results


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(result.args[2:])}\nexit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, _describe(result)
    assert "Traceback" not in result.stderr, _describe(result)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, stderr one line ``error: ...`` holding every fragment, no traceback; returns the line."""
    assert result.returncode == code, _describe(result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, _describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), _describe(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


class Live:
    """A trainer running in the background whose stdout lines can be waited for as they come."""

    def __init__(self, cache, args, devices: int = 1):
        self.proc = _start(cache, args, devices=devices)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._queue.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._err.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line)
        sink(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first new stdout line matching ``pattern``; fails if the run ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.lines)}")
            if line is None:
                self.proc.wait()
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before a line matching {pattern!r}:\n"
                            f"{''.join(self.lines)}\nstderr:\n{''.join(filter(None, self._err))}")
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def finish(self, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not end within {timeout} s")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # drain what the reader threads still hold
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        while self._err[-1:] != [None] and time.monotonic() < deadline:
            time.sleep(0.01)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.lines),
                                           "".join(filter(None, self._err)))


# -- reading what a run leaves ------------------------------------------------------------------------

def snapshot(folder: pathlib.Path) -> dict[str, bytes | None]:
    """Every file's bytes (and every folder, as None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def metrics_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def load_variables(workdir: pathlib.Path, step: int) -> dict:
    """Checkpoint ``step``'s params and batch_stats as NumPy, read in this process."""
    import jax

    from train.inference import load_variables as load

    variables, _ = load(str(workdir), step)
    return jax.tree_util.tree_map(np.asarray, variables)


def max_abs_difference(a: dict, b: dict) -> float:
    import jax

    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import jax

    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(a)]
    unequal = [p for p, x, y in zip(paths, jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
               if not np.array_equal(x, y)]
    assert not unequal, f"not bitwise equal: {unequal} (max |difference| {max_abs_difference(a, b):.3g})"


def read_tfevents(path: pathlib.Path) -> list:
    """The Event protos of a TensorBoard event file, checking the TFRecord framing and both CRCs of each
    record (8-byte length, masked CRC-32C of it, payload, masked CRC-32C of the payload)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        assert len(header) == 8, f"{path}: truncated record header at byte {offset}"
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert header_crc == masked_crc32c(header), f"{path}: bad length CRC at byte {offset}"
        payload = data[offset + 12:offset + 12 + length]
        assert len(payload) == length, f"{path}: truncated record at byte {offset}"
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert payload_crc == masked_crc32c(payload), f"{path}: bad payload CRC at byte {offset}"
        events.append(Event.FromString(payload))
        offset += 16 + length
    return events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


# -- shared runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def base_runs(compile_cache, tmp_path_factory) -> dict[str, tuple[pathlib.Path, subprocess.CompletedProcess]]:
    """The three runs most tests build on, side by side (each compiles its own programs):

    - ``shard_map``, ``pmap``: one epoch of `BASE` on 8 CPU devices with each driver;
    - ``reference``: `REF_EPOCHS` epochs of `BASE` on one device, uninterrupted, a checkpoint after each.

    Tests that need a trained workdir copy one; none writes into these.
    """
    root = tmp_path_factory.mktemp("base_runs")
    jobs = {
        driver: dict(args=(*BASE, "--epochs", 1, "--parallel", driver, "--workdir", root / driver), devices=8)
        for driver in ("shard_map", "pmap")}
    jobs["reference"] = dict(args=(*BASE, "--epochs", REF_EPOCHS, "--checkpoint-every-epochs", 1,
                                   "--workdir", root / "reference"))
    results = run_many(compile_cache, list(jobs.values()), parallel=3)
    return {name: (root / name, result) for name, result in zip(jobs, results)}


@pytest.fixture(scope="session")
def eight_device_runs(base_runs):
    return {driver: base_runs[driver] for driver in ("shard_map", "pmap")}


@pytest.fixture(scope="session")
def reference_run(base_runs) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    workdir, result = base_runs["reference"]
    assert_ok(result)
    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH * e for e in range(1, REF_EPOCHS + 1)]
    return workdir, result


def copy_workdir(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


# -- 1. one epoch with each driver --------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["shard_map", "pmap"])
def test_one_epoch_on_eight_devices_writes_config_metrics_events_and_checkpoint(eight_device_runs, driver):
    workdir, result = eight_device_runs[driver]
    assert_ok(result)
    assert f"8 device(s) ({driver})" in result.stdout
    assert "done: lenet5_relu on digits" in result.stdout

    config = json.loads((workdir / "config.json").read_text())
    assert (config["arch"], config["parallel"], config["epochs"], config["batch_size"]) == (
        "lenet5_relu", driver, 1, 64)

    (line,) = metrics_lines(workdir)
    assert {"test_top1", "test_loss", "train_loss", "images_per_sec", "lr"} <= set(line)
    assert (line["epoch"], line["step"]) == (1, STEPS_PER_EPOCH)
    assert line["lr"] == pytest.approx(0.05)  # constant schedule
    assert 0.2 < line["test_top1"] <= 1.0, "one epoch lifts digits well above chance (10%)"
    assert 0 < line["train_loss"] < np.log(10) and 0 < line["test_loss"] < np.log(10)
    assert line["images_per_sec"] > 0

    (events_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    events = read_tfevents(events_file)
    assert events[0].file_version == "brain.Event:2"
    scalars = {value.tag: (event.step, value.simple_value) for event in events[1:] for value in event.summary.value}
    for key in ("test_top1", "test_loss", "train_loss", "images_per_sec", "lr", "epoch"):
        assert scalars[key] == (STEPS_PER_EPOCH, pytest.approx(line[key], rel=1e-6)), key

    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH]
    assert (workdir / "checkpoints" / str(STEPS_PER_EPOCH) / "state").is_dir()


def test_both_drivers_and_one_device_agree(eight_device_runs, reference_run):
    """Same seed, same global batch: shard_map and pmap on 8 devices give the same run, and the same as one
    device up to float32 rounding (8 partial sums and a psum add in another order than one sum: after 22
    steps the parameters differed by 9e-8 at most when measured)."""
    (shard_dir, shard_result), (pmap_dir, pmap_result) = eight_device_runs["shard_map"], eight_device_runs["pmap"]
    assert_ok(shard_result)
    assert_ok(pmap_result)
    (shard,), (pmap,) = metrics_lines(shard_dir), metrics_lines(pmap_dir)
    # The two drivers run the same per-device program with the same collectives: equal to the bit.
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "train_top1"):
        assert shard[key] == pmap[key], key
    shard_vars, pmap_vars = load_variables(shard_dir, STEPS_PER_EPOCH), load_variables(pmap_dir, STEPS_PER_EPOCH)
    assert_bitwise_equal(shard_vars, pmap_vars)

    ref_dir, _ = reference_run
    one_device = metrics_lines(ref_dir)[0]
    assert one_device["step"] == STEPS_PER_EPOCH
    assert shard["test_top1"] == pytest.approx(one_device["test_top1"], abs=1 / 360 + 1e-9)  # at most one image
    assert shard["train_loss"] == pytest.approx(one_device["train_loss"], rel=1e-6)
    assert max_abs_difference(shard_vars, load_variables(ref_dir, STEPS_PER_EPOCH)) < 1e-6


# -- 2. resume after SIGKILL ------------------------------------------------------------------------

TIMINGS = ("time", "images_per_sec", "epoch_time_s")


def assert_same_records(workdir: pathlib.Path, reference_dir: pathlib.Path, where: str = "") -> None:
    """metrics.jsonl: one line per epoch, each equal to the uninterrupted run's but for its timings."""
    got, expected = metrics_lines(workdir), metrics_lines(reference_dir)
    assert [r["epoch"] for r in got] == list(range(1, len(expected) + 1)), where
    for record, reference in zip(got, expected):
        assert {k: v for k, v in record.items() if k not in TIMINGS} == {
            k: v for k, v in reference.items() if k not in TIMINGS}, where


def test_runs_killed_three_times_at_random_points_end_bitwise_equal_with_each_epoch_logged_once(
        compile_cache, reference_run, tmp_path):
    """The data order is a function of (seed, epoch) and each step's randomness of (seed, step, example),
    so a run killed anywhere (even between its metrics line and its checkpoint, or mid-save) and rerun with
    the same command ends where the uninterrupted `reference_run` ended, to the bit, and its metrics.jsonl
    holds each epoch once, as the uninterrupted run's does."""
    reference_dir, _ = reference_run
    workdir = tmp_path / "killed"
    args = (*BASE, "--epochs", REF_EPOCHS, "--checkpoint-every-epochs", 1, "--workdir", workdir)
    seed = random.randrange(1 << 30)
    chooser = random.Random(seed)
    kills = []
    for _ in range(3):
        done = max(checkpoint_steps(workdir), default=0) // STEPS_PER_EPOCH
        if done >= REF_EPOCHS - 1:
            break
        after_epochs = chooser.randint(done + 1, REF_EPOCHS - 1)  # kill once this epoch's checkpoint exists ...
        delay = chooser.uniform(0.0, 0.25)  # ... plus up to about an epoch (train + eval + save, warm)
        kills.append(f"after checkpoint {after_epochs * STEPS_PER_EPOCH} + {delay:.3f} s")
        where = f"kills {kills} (random seed {seed})"
        proc = _start(compile_cache, args)
        deadline = time.monotonic() + TIMEOUT
        while max(checkpoint_steps(workdir), default=0) < after_epochs * STEPS_PER_EPOCH:
            if proc.poll() is not None:
                break  # it got there and finished before this test saw it: that is fine too
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _finish(proc)
    where = f"kills {kills} (random seed {seed})"
    resumed = run_cli(compile_cache, args)
    assert_ok(resumed)
    assert checkpoint_steps(workdir)[-1] == REF_STEPS
    assert_bitwise_equal(load_variables(workdir, REF_STEPS), load_variables(reference_dir, REF_STEPS))
    assert_same_records(workdir, reference_dir, where)
    assert tensorboard_scalars(workdir) == tensorboard_scalars(reference_dir), where


def tensorboard_scalars(workdir: pathlib.Path, tag: str = "test_top1") -> list[tuple[int, float]]:
    """``(step, value)`` of a tag as TensorBoard itself shows it, over all the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(workdir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, round(event.value, 6)) for event in accumulator.Scalars(tag)]


def test_a_half_written_metrics_line_is_set_aside_not_glued_to(compile_cache, reference_run, tmp_path):
    """A run killed while writing a line leaves half a line; the next run moves it (and the records of
    epochs it will train again) to metrics.superseded.jsonl and writes whole lines after it."""
    reference_dir, _ = reference_run
    workdir = copy_workdir(reference_dir, tmp_path / "run")
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    shutil.rmtree(workdir / "checkpoints" / str(REF_STEPS))  # the last epoch is trained again
    shutil.rmtree(workdir / "checkpoints" / str(REF_STEPS - STEPS_PER_EPOCH))
    result = run_cli(compile_cache, (*BASE, "--epochs", REF_EPOCHS, "--checkpoint-every-epochs", 1,
                                     "--workdir", workdir))
    assert_ok(result)
    assert_same_records(workdir, reference_dir)
    assert (workdir / "metrics.superseded.jsonl").read_text() == lines[4][: len(lines[4]) // 2] + "\n"
    # TensorBoard too shows epochs 5 and 6 once, though the first file holds them as well: the new file's
    # restart event supersedes them.
    assert len(list((workdir / "tensorboard").iterdir())) == 2
    assert tensorboard_scalars(workdir) == tensorboard_scalars(reference_dir)


# -- 3. SIGTERM ---------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(compile_cache, tmp_path):
    workdir = tmp_path / "terminated"
    epochs = 50  # far more than the test waits for
    total = epochs * STEPS_PER_EPOCH
    args = (*BASE, "--epochs", epochs, "--log-every-steps", 1, "--workdir", workdir)
    saved_line = r"SIGTERM: saved checkpoint (\d+) in (\S+); run the same command to resume\."

    live = Live(compile_cache, args)
    live.wait_for(rf"^step \d+/{total} ")
    live.proc.send_signal(signal.SIGTERM)
    stopped = live.finish()
    assert stopped.returncode == 128 + signal.SIGTERM == 143, _describe(stopped)
    assert "Traceback" not in stopped.stderr, _describe(stopped)
    match = re.search(saved_line, stopped.stdout)
    assert match, _describe(stopped)
    step = int(match[1])
    assert match[2] == str(workdir / "checkpoints")
    assert 1 <= step < total and f"step {step}/{total} " in stopped.stdout  # the step it reached, logged
    assert checkpoint_steps(workdir)[-1] == step  # (an epoch-end one before it only if the signal came late)

    live = Live(compile_cache, args)
    done, into = divmod(step, STEPS_PER_EPOCH)
    # Epochs are counted from 1 in every message: so many done, then how far into the next one.
    where = f", {into} of {STEPS_PER_EPOCH} steps into epoch {done + 1}" if into else ""
    live.wait_for(rf"^resuming from {re.escape(str(workdir))}/checkpoints/{step}: {done} of \d+ epochs done"
                  rf"{re.escape(where)}\.$")
    first = live.wait_for(rf"^step (\d+)/{total} ")
    assert int(first[1]) == step + 1, "the rerun continues with the step after the saved one"
    live.proc.send_signal(signal.SIGTERM)
    stopped_again = live.finish()
    assert stopped_again.returncode == 143, _describe(stopped_again)
    later = int(re.search(saved_line, stopped_again.stdout)[1])
    assert later > step and checkpoint_steps(workdir)[-1] == later and step in checkpoint_steps(workdir)


# -- 4. a diverging run stops --------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(compile_cache, reference_run, tmp_path):
    """--lr 1e30 overflows the parameters in the first update: the second step's loss is NaN. Once from
    scratch, once resuming the finished reference run for one more epoch."""
    reference_dir, _ = reference_run
    resumed = copy_workdir(reference_dir, tmp_path / "resumed")
    fresh = tmp_path / "fresh"
    before, lines_before = snapshot(resumed / "checkpoints"), metrics_lines(resumed)
    diverge = ("--lr", "1e30")
    from_scratch, from_checkpoint = run_many(compile_cache, [
        dict(args=(*BASE, *diverge, "--epochs", 1, "--workdir", fresh)),
        dict(args=(*BASE, *diverge, "--epochs", REF_EPOCHS + 1, "--allow-changes", "--workdir", resumed))])

    pattern = (r"error: the loss became (nan|inf|-inf) at step (\d+); training stopped without saving\. "
               r"Last good checkpoint: (.+)\. Try a lower --lr or --clip-grad-norm\.")
    match = re.fullmatch(pattern, assert_user_error(from_scratch, code=1))
    assert match, from_scratch.stderr
    assert 1 <= int(match[2]) <= 5
    assert match[3] == "none (no checkpoint was saved yet)"
    assert not fresh.exists(), "a run that made its workdir and saved nothing leaves none behind"

    match = re.fullmatch(pattern, assert_user_error(from_checkpoint, code=1))
    assert match, from_checkpoint.stderr
    assert REF_STEPS + 1 <= int(match[2]) <= REF_STEPS + 5
    assert match[3] == f"{resumed}/checkpoints/{REF_STEPS}"
    assert snapshot(resumed / "checkpoints") == before, "no checkpoint may be written or changed after a NaN"
    assert metrics_lines(resumed) == lines_before


# -- 5. bad input -------------------------------------------------------------------------------------

def write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
    """One file in the original MNIST format: gzip of big-endian magic, sizes, then uint8 data."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_idx_set(folder: pathlib.Path, train: int = 40, test: int = 20) -> dict[str, np.ndarray]:
    """Four IDX .gz files of 28x28 digits (the 8x8 ones scaled up 3x and padded), named as MNIST's."""
    from train.data import load_digits

    digits = load_digits()
    big = lambda x: np.pad(x[..., 0].repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))
    arrays = {"train-images-idx3-ubyte.gz": big(digits.train_images[:train]),
              "train-labels-idx1-ubyte.gz": digits.train_labels[:train].astype(np.uint8),
              "t10k-images-idx3-ubyte.gz": big(digits.test_images[:test]),
              "t10k-labels-idx1-ubyte.gz": digits.test_labels[:test].astype(np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, 2051 if "images" in name else 2049)
    return arrays


def truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_idx_files_load_without_checksum_and_damage_is_named(tmp_path):
    """The IDX path with this test's own files, in-process: they cannot match tensorflow-datasets'
    recorded checksums, so ``verify=False``; the CLI cases below see the checksum refuse them."""
    from train.data import FASHION_CLASSES, DataError, load_idx, read_idx

    arrays = write_idx_set(tmp_path / "ok")
    data = load_idx("fashion_mnist", str(tmp_path / "ok"), verify=False)
    np.testing.assert_array_equal(data.train_images[..., 0], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte.gz"])
    assert data.train_images.shape == (40, 28, 28, 1) and data.class_names == FASHION_CLASSES and data.flip
    with pytest.raises(DataError, match="has .* bytes where"):
        load_idx("fashion_mnist", str(tmp_path / "ok"))  # verified: not the real Fashion-MNIST files

    truncated = tmp_path / "ok" / "train-images-idx3-ubyte.gz"
    truncate(truncated)
    with pytest.raises(DataError, match="truncated or not a gzip file"):
        read_idx(str(truncated), 2051)
    short = tmp_path / "short-idx3-ubyte.gz"
    with gzip.open(short, "wb") as handle:  # a whole gzip whose header promises more than it holds
        handle.write(struct.pack(">4I", 2051, 5, 28, 28) + bytes(28 * 28 * 4))
    with pytest.raises(DataError, match="truncated: its header promises 3920 bytes of data, it holds 3136"):
        read_idx(str(short), 2051)


BAD_INPUT_CASES = ("unknown_arch", "unknown_dataset", "fashion_mnist_without_data_dir", "missing_idx_files",
                   "truncated_idx_gz", "image_size_below_minimum", "checkpoint_of_another_arch", "batch_not_divisible",
                   "zero_epochs", "negative_lr", "zero_batch", "config_not_json", "config_unknown_key")


def _bad_input_cases(root: pathlib.Path) -> dict[str, tuple[tuple, int, tuple]]:
    """name -> (arguments after BASE, device count, fragments the one-line error must hold)."""
    missing = root / "idx_missing"
    write_idx_set(missing)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (missing / name).unlink()
    truncated = root / "idx_truncated"
    write_idx_set(truncated)
    truncate(truncated / "train-images-idx3-ubyte.gz")
    not_json = root / "not_json.json"
    not_json.write_text('{"arch": "lenet5_relu", "epochs": 2,\n')
    unknown_keys = root / "unknown_keys.json"
    unknown_keys.write_text(json.dumps({"arch": "lenet5_relu", "learning_rate": 0.1}))
    return {
        "unknown_arch": (("--arch", "resnt18"), 1, ("unknown model 'resnt18'", "Did you mean 'resnet18'")),
        "unknown_dataset": (("--dataset", "fashion-mnist"), 1, ("unknown dataset 'fashion-mnist'",
                                                                 "Did you mean fashion_mnist")),
        "fashion_mnist_without_data_dir": (("--dataset", "fashion_mnist"), 1, ("--data-dir",)),
        "missing_idx_files": (("--dataset", "mnist", "--data-dir", missing), 1,
                              (f"{missing} lacks t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",)),
        "truncated_idx_gz": (("--dataset", "fashion_mnist", "--data-dir", truncated), 1,
                             (f"{truncated / 'train-images-idx3-ubyte.gz'} has", "bytes where")),
        "image_size_below_minimum": (("--arch", "vgg11", "--image-size", 16), 1,
                                     ("--image-size 16 is smaller than vgg11's minimum input of 32x32",)),
        "checkpoint_of_another_arch": (("--arch", "lenet5_bn", "--epochs", REF_EPOCHS + 1), 1,
                                       ("holds a checkpoint of lenet5_relu with 10 classes, not lenet5_bn",)),
        "batch_not_divisible": (("--batch-size", 12), 8, ("--batch-size 12 does not split evenly over 8 devices",
                                                           "multiple of 8")),
        "zero_epochs": (("--epochs", 0), 1, ("--epochs must be a positive whole number, got 0",)),
        "negative_lr": (("--lr", -1), 1, ("--lr must be positive, got -1.0",)),
        "zero_batch": (("--batch-size", 0), 1, ("--batch-size must be a positive whole number, got 0",)),
        "config_not_json": (("--config", not_json), 1, (f"config file {not_json} is not valid JSON",)),
        "config_unknown_key": (("--config", unknown_keys), 1, ("unknown config key(s) learning_rate",)),
    }


@pytest.fixture(scope="module")
def bad_input_runs(compile_cache, reference_run, tmp_path_factory) -> dict:
    """Every bad-input case, side by side, each against its own copy of the reference workdir."""
    reference_dir, _ = reference_run
    root = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(root)
    assert tuple(cases) == BAD_INPUT_CASES
    workdirs = {name: copy_workdir(reference_dir, root / "workdirs" / name) for name in cases}
    before = {name: snapshot(workdir) for name, workdir in workdirs.items()}
    results = run_many(compile_cache, [
        dict(args=(*BASE, "--epochs", REF_EPOCHS, "--workdir", workdirs[name], *extra), devices=devices)
        for name, (extra, devices, _) in cases.items()])
    return {name: (result, cases[name][2], before[name] == snapshot(workdirs[name]), workdirs[name])
            for name, result in zip(cases, results)}


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(bad_input_runs, case):
    result, fragments, unchanged, workdir = bad_input_runs[case]
    assert_user_error(result, *fragments)
    assert unchanged, f"{case}: the files of {workdir} changed"


FRESH_BAD_INPUT_CASES = ("workdir_is_a_file", "workdir_empty", "workdir_read_only", "config_wrong_type",
                         "config_inline_wrong_type", "lr_infinite", "init_from_garbage_pth", "init_from_garbage_safetensors",
                         "init_from_garbage_npz", "folder_with_one_class", "digits_with_data_dir")


def _fresh_bad_input_cases(root: pathlib.Path) -> dict[str, tuple[tuple, tuple]]:
    """name -> (arguments after BASE, fragments the one-line error must hold), each for a workdir that does
    not exist yet (except where the case is about the workdir itself)."""
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    wrong_type = root / "wrong_type.json"
    wrong_type.write_text(json.dumps({"lr": "fast"}))
    garbage = {}
    for suffix in (".pth", ".safetensors", ".npz"):
        garbage[suffix] = root / f"garbage{suffix}"
        garbage[suffix].write_bytes(b"\x00\x01 not weights at all " * 40)
    one_class = root / "one_class" / "cats"
    one_class.mkdir(parents=True)
    for i in range(3):
        from PIL import Image

        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(one_class / f"{i}.png")
    read_only = pathlib.Path("/proc/flaxnets-run")  # procfs: no folder can be made there, even by root
    return {
        "workdir_is_a_file": (("--workdir", a_file), (f"--workdir {a_file} is a file, not a folder",)),
        "workdir_empty": (("--workdir", ""), ("--workdir must name a folder",)),
        "workdir_read_only": (("--workdir", read_only), (f"--workdir {read_only} cannot be", )),
        "config_wrong_type": (("--config", wrong_type), (f"config file {wrong_type}: lr must be a number, got 'fast'",)),
        "config_inline_wrong_type": (("--config", '{"lr": "fast"}'), ("--config's JSON: lr must be a number",)),
        "lr_infinite": (("--lr", "inf"), ("--lr must be a finite number, got inf",)),
        "init_from_garbage_pth": (("--arch", "resnet18", "--init-from", garbage[".pth"]),
                                  (f"{garbage['.pth']} is not a PyTorch weights file",)),
        "init_from_garbage_safetensors": (("--arch", "resnet18", "--init-from", garbage[".safetensors"]),
                                          (f"{garbage['.safetensors']} is not a safetensors file",)),
        "init_from_garbage_npz": (("--arch", "resnet18", "--init-from", garbage[".npz"]),
                                  (f"{garbage['.npz']} is not an .npz archive",)),
        "folder_with_one_class": (("--dataset", "folder", "--data-dir", root / "one_class"),
                                  ("at least two classes",)),
        "digits_with_data_dir": (("--data-dir", root), ("ships with the install and reads no files",)),
    }


@pytest.fixture(scope="module")
def fresh_bad_input_runs(compile_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fresh_bad_input")
    cases = _fresh_bad_input_cases(root)
    assert tuple(cases) == FRESH_BAD_INPUT_CASES
    jobs = []
    for name, (extra, _) in cases.items():
        args = (*BASE, "--epochs", 1, "--workdir", root / "runs" / name, *extra)
        jobs.append(dict(args=args))
    results = run_many(compile_cache, jobs)
    return {name: (result, cases[name][1], root / "runs" / name, root) for name, result in zip(cases, results)}


@pytest.mark.parametrize("case", FRESH_BAD_INPUT_CASES)
def test_bad_input_for_a_new_run_is_one_sentence_and_makes_no_workdir(fresh_bad_input_runs, case):
    result, fragments, default_workdir, root = fresh_bad_input_runs[case]
    assert_user_error(result, *fragments)
    assert not default_workdir.exists(), f"{case}: a half-made workdir was left at {default_workdir}"
    if case == "workdir_is_a_file":
        assert (root / "a_file").read_text() == "not a folder"


def test_one_epoch_with_the_default_warm_up_clips_it_and_says_so(compile_cache, tmp_path):
    result = run_cli(compile_cache, ("--arch", "lenet5_relu", "--epochs", 1, "--no-plots", "--workdir", tmp_path / "w"))
    assert_ok(result)
    assert "note: --warmup-epochs 1 would take more than half of 1 epoch(s); warming up over 0.5 instead" \
        in result.stderr


def test_help_shows_every_flag_with_a_line_of_help_and_its_real_default():
    result = subprocess.run(_command(["--help"]), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and "(default: None)" not in result.stdout
    import re as _re

    flags = _re.findall(r"^  (--[a-z-]+)", result.stdout, _re.M)
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    assert len(flags) > 40 and text.count("(default: ") == len(flags) - 1  # all but --config
    assert "--lr LR peak learning rate, for the global batch (default: 0.05)" in text


@pytest.mark.parametrize("damage", ["truncated_state_data", "garbled_meta"])
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_one_used(compile_cache, reference_run,
                                                                                tmp_path, damage):
    reference_dir, _ = reference_run
    workdir = copy_workdir(reference_dir, tmp_path / "run")
    latest = workdir / "checkpoints" / str(REF_STEPS)
    if damage == "truncated_state_data":  # the largest array chunk file, cut in half
        target = max((latest / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
        truncate(target)
    else:  # the JSON meta item, no longer UTF-8
        target = latest / "meta" / "metadata"
        data = bytearray(target.read_bytes())
        data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8
        target.write_bytes(bytes(data))
    damaged = target.read_bytes()

    result = run_cli(compile_cache, (*BASE, "--epochs", REF_EPOCHS, "--checkpoint-every-epochs", 1,
                                     "--workdir", workdir))
    assert_ok(result)
    moved = workdir / "corrupt_checkpoints" / str(REF_STEPS)
    assert re.search(rf"^warning: checkpoint {REF_STEPS} cannot be read \(.+\); moved it to {re.escape(str(moved))} "
                     r"and falling back to the previous one\.$", result.stderr, re.M), _describe(result)
    assert "<" not in result.stderr and "TensorStore details" not in result.stderr, _describe(result)
    previous = REF_STEPS - STEPS_PER_EPOCH
    assert f"resuming from {workdir}/checkpoints/{previous}: " in result.stdout
    assert (moved / target.relative_to(latest)).read_bytes() == damaged, "set aside as found, never deleted"
    # The last epoch is trained again from the previous checkpoint: the same parameters as before, and its
    # metrics line once.
    assert checkpoint_steps(workdir)[-1] == REF_STEPS
    assert_bitwise_equal(load_variables(workdir, REF_STEPS), load_variables(reference_dir, REF_STEPS))
    assert_same_records(workdir, reference_dir)


def test_readers_skip_an_unreadable_latest_checkpoint_for_the_previous_one(reference_run, tmp_path, capsys):
    """evaluate, predict and plots (`train.inference.open_checkpoint`): the damaged latest checkpoint is left
    where it is, with a warning; a checkpoint named by step or folder is that one or an error."""
    from train.checkpoint import CheckpointError
    from train.inference import open_checkpoint

    reference_dir, _ = reference_run
    workdir = copy_workdir(reference_dir, tmp_path / "run")
    latest = workdir / "checkpoints" / str(REF_STEPS)
    truncate(max((latest / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size))
    before = snapshot(workdir)
    found, step, (trained, _, _, meta) = open_checkpoint(str(workdir))
    previous = REF_STEPS - STEPS_PER_EPOCH
    assert (found, step, meta["position"]) == (str(workdir), previous, 0) and trained["params"]
    assert re.search(rf"^warning: .*{REF_STEPS}.*; using checkpoint {previous}, the one before it\.$",
                     capsys.readouterr().err, re.M)
    for named in ((str(workdir), str(REF_STEPS)), (str(latest), "latest")):
        with pytest.raises(CheckpointError):
            open_checkpoint(*named)
    assert snapshot(workdir) == before


# -- 6. evaluate and predict ----------------------------------------------------------------------------

def test_evaluate_rescores_latest_and_best_checkpoints(compile_cache, reference_run, tmp_path):
    reference_dir, _ = reference_run
    workdir = copy_workdir(reference_dir, tmp_path / "run")
    before = snapshot(workdir)
    latest, best, nowhere = run_many(compile_cache, [
        dict(module="train.evaluate", args=("--workdir", workdir)),
        dict(module="train.evaluate", args=("--workdir", workdir, "--checkpoint", "best")),
        dict(module="train.evaluate", args=("--workdir", tmp_path / "no_such_run"))])
    records = metrics_lines(workdir)

    assert_ok(latest)
    scored = json.loads(latest.stdout)
    assert (scored["step"], scored["arch"], scored["dataset"]) == (REF_STEPS, "lenet5_relu", "digits")
    assert scored["test_top1"] == records[-1]["test_top1"]  # the same eval step on the same device count
    assert scored["test_loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-6)

    assert_ok(best)
    scored_best = json.loads(best.stdout)
    top = max(record["test_top1"] for record in records)
    assert scored_best["test_top1"] == top
    assert {r["step"]: r["test_top1"] for r in records}[scored_best["step"]] == top

    assert_user_error(nowhere, f"{tmp_path / 'no_such_run'} is not a folder")
    assert snapshot(workdir) == before, "evaluating changes nothing in the workdir"


def test_best_is_chosen_on_the_validation_split_and_kept_when_it_is_not_the_last(compile_cache, tmp_path):
    """With --val-split, "best" is the epoch of highest validation top-1: kept although only one other
    checkpoint is (--keep-checkpoints 1), and `train.evaluate --checkpoint best` scores that one. (At this
    rate LeNet-5 learns in its first epoch and then diverges: a best epoch far from the last.)"""
    workdir = tmp_path / "val"
    args = ("--arch", "lenet5_relu", "--dataset", "digits", "--batch-size", "64", "--schedule", "constant",
            "--warmup-epochs", "0", "--lr", "0.3", "--epochs", "4", "--val-split", "0.2", "--keep-checkpoints", "1",
            "--no-plots", "--workdir", workdir)
    result = run_cli(compile_cache, args)
    assert_ok(result)
    records = metrics_lines(workdir)
    assert all({"val_top1", "val_loss", "test_top1", "test_loss"} <= set(r) for r in records)
    best = max(records, key=lambda r: r["val_top1"])
    assert best["epoch"] < records[-1]["epoch"], "the check needs a best epoch before the last"
    assert checkpoint_steps(workdir) == [best["step"], records[-1]["step"]]
    assert json.loads((workdir / "config.json").read_text())["best_checkpoint_selected_on"] == "val"
    assert (f"Best checkpoint: step {best['step']} (epoch {best['epoch']}), val top-1 {best['val_top1']:.2%}, "
            f"selected on the validation split; its test top-1 {best['test_top1']:.2%} (trained weights).") in result.stdout
    evaluated = run_cli(compile_cache, ("--workdir", workdir, "--checkpoint", "best"), module="train.evaluate")
    assert_ok(evaluated)
    scored = json.loads(evaluated.stdout)
    assert scored["step"] == best["step"]
    assert (scored["val_top1"], scored["test_top1"]) == (best["val_top1"], best["test_top1"])


def test_without_a_validation_split_the_run_says_the_test_split_chose_best(reference_run):
    reference_dir, result = reference_run
    assert json.loads((reference_dir / "config.json").read_text())["best_checkpoint_selected_on"] == "test"
    assert "selected on the test split (no --val-split" in result.stdout
    assert all("val_top1" not in r for r in metrics_lines(reference_dir))


def test_a_model_of_ones_own_trains_resumes_evaluates_predicts_and_plots(compile_cache, tmp_path):
    """--arch FILE.py:FACTORY with --model-arg: recorded in config.json, so every later command finds it."""
    from PIL import Image

    from test_run import USER_MODEL

    (tmp_path / "mynet.py").write_text(USER_MODEL)
    workdir = tmp_path / "mine"
    args = ("--arch", tmp_path / "mynet.py:make", "--model-arg", "width=6", "--dataset", "digits", "--epochs", 1,
            "--batch-size", 64, "--workdir", workdir)
    trained = run_cli(compile_cache, args)
    assert_ok(trained)
    config = json.loads((workdir / "config.json").read_text())
    assert config["arch"] == f"{tmp_path / 'mynet.py'}:make" and config["model_args"] == {"width": 6}
    image = tmp_path / "seven.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(image)
    resumed, evaluated, predicted, plotted = run_many(compile_cache, [
        dict(args=(*args[:-6], "--epochs", 2, "--batch-size", 64, "--allow-changes", "--workdir", workdir)),
        dict(module="train.evaluate", args=("--workdir", workdir)),
        dict(module="train.predict", args=("--workdir", workdir, image)),
        dict(module="train.plots", args=("run", workdir, "--out", tmp_path / "plots"))])
    for result in (resumed, evaluated, predicted, plotted):
        assert_ok(result)
    assert "resuming from" in resumed.stdout and "1 of 2 epochs done" in resumed.stdout
    assert 0 <= json.loads(evaluated.stdout)["test_top1"] <= 1
    assert predicted.stdout.startswith(f"{image}: ")
    assert "confusion.png" in plotted.stdout, plotted.stdout


def test_predict_prints_classes_with_probabilities(compile_cache, reference_run, tmp_path):
    from PIL import Image

    from train.data import load_digits
    from train.inference import load_variables as load_with_meta, locate, predict_images

    reference_dir, _ = reference_run
    digits = load_digits()
    firsts = [int(np.flatnonzero(digits.test_labels == d)[0]) for d in range(10)]  # one test image per digit
    images = []
    for digit, index in enumerate(firsts):
        path = tmp_path / f"digit{digit}.png"
        Image.fromarray(digits.test_images[index, ..., 0], mode="L").save(path)
        images.append(path)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")

    shown, missing, not_image = run_many(compile_cache, [
        dict(module="train.predict", args=("--workdir", reference_dir, *images)),
        dict(module="train.predict", args=("--workdir", reference_dir, tmp_path / "absent.png")),
        dict(module="train.predict", args=("--workdir", reference_dir, text))])

    assert_ok(shown)
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == len(images), shown.stdout
    workdir, step = locate(str(reference_dir), "best")
    variables, meta = load_with_meta(workdir, step)
    expected = predict_images(variables, meta, digits.test_images[firsts])
    correct = 0
    for digit, (path, line, row) in enumerate(zip(images, lines, expected)):
        match = re.fullmatch(rf"{re.escape(str(path))}: (\d) ([\d.]+)%, (\d) ([\d.]+)%, (\d) ([\d.]+)%", line)
        assert match, line
        names, percents = [match[i] for i in (1, 3, 5)], [float(match[i]) for i in (2, 4, 6)]
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.2
        assert names == [str(i) for i in row.argsort()[::-1][:3]], "the best checkpoint's own top-3"
        assert percents == pytest.approx(100 * np.sort(row)[::-1][:3], abs=0.051)
        correct += names[0] == str(digit)
    assert correct >= 6, f"{correct}/10 right from a model with {meta['config']['epochs']} epochs of training"

    assert_user_error(missing, f"{tmp_path / 'absent.png'} does not exist")
    assert_user_error(not_image, f"{text} is not an image PIL can read")


# -- 7. two processes ------------------------------------------------------------------------------------

def _finish_together(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Wait for every process; once one fails, the others (blocked on their peer) get 20 s, then are killed."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 20)
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    return [_finish(proc) for proc in procs]


def test_two_processes_train_like_one_process_with_the_same_devices(compile_cache, eight_device_runs, tmp_path):
    """JAX's own multi-process runtime on this machine: two processes of 4 CPU devices each, against one
    process of 8 devices, same seed and global batch.

    Not bitwise: the gradient and metric all-reduce across processes is gloo's (over TCP), which adds the 8
    devices' partial sums in another order than XLA's in-process all-reduce (measured with a bare psum of
    float32 values: in one process the result equals the sum in device order 0..7, in two processes it
    does not, for half of 1,000 random elements); the last bit then differs and compounds over the steps.
    Measured after 22 steps: parameters within 9e-8 of the one-process run (the same distance as between
    8 devices and 1), identical accuracies. Tolerance 1e-6: ten times that, far below any real change.
    """
    single_dir, single = eight_device_runs["shard_map"]
    assert_ok(single)
    workdir = tmp_path / "two_processes"
    args = (*BASE, "--epochs", 1, "--parallel", "shard_map", "--workdir", workdir,
            "--coordinator", f"localhost:{free_port()}", "--num-processes", 2)
    procs = [_start(compile_cache, (*args, "--process-id", i), devices=4) for i in range(2)]
    first, second = _finish_together(procs)
    assert_ok(first)
    assert_ok(second)

    assert "8 device(s) (shard_map)" in first.stdout and f"step {STEPS_PER_EPOCH}/" in first.stdout
    assert "done: lenet5_relu on digits" in first.stdout
    # Only process 0 reports; gloo's own connection lines are the C++ library's, not the trainer's.
    # Only process 0 reports. (Libraries may print on their own: gloo's connection lines, and once a stray
    # "7" of unknown origin on process 1; what matters is that none of the trainer's lines appear there.)
    trainer_lines = ("step ", "epoch ", "done:", "resuming", "lenet5_relu on digits")
    assert [line for line in second.stdout.splitlines() if line.startswith(trainer_lines)] == []
    config = json.loads((workdir / "config.json").read_text())
    assert (config["distributed"], config["num_processes"]) == (True, 2)
    (record,), (single_record,) = metrics_lines(workdir), metrics_lines(single_dir)
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH]

    for key in ("test_top1", "test_top5", "train_top1"):
        assert record[key] == single_record[key], key
    for key in ("test_loss", "train_loss"):
        assert record[key] == pytest.approx(single_record[key], rel=1e-6), key
    # A checkpoint written by two processes restores in one: here, and in train.evaluate (8 devices, the
    # eval program cached by the one-process run).
    two, one = load_variables(workdir, STEPS_PER_EPOCH), load_variables(single_dir, STEPS_PER_EPOCH)
    assert max_abs_difference(two, one) < 1e-6
    evaluated = run_cli(compile_cache, ("--workdir", workdir), devices=8, module="train.evaluate")
    assert_ok(evaluated)
    assert json.loads(evaluated.stdout)["test_top1"] == record["test_top1"]
