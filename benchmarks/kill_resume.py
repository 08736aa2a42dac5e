"""Kill and resume, again and again: the trainer killed with SIGKILL, half the time in the middle of a
checkpoint save, and started again with the same command until it finishes; then its checkpoints against
those of a run never interrupted, bit for bit, and its records (``metrics.jsonl``, TensorBoard) for each
epoch once.

    python -m benchmarks.kill_resume                         # 12 kills, LeNet-5 on the digits, 12 epochs
    python -m benchmarks.kill_resume --kills 30 --epochs 30 --seed 1

A kill "mid-save" lands while a checkpoint's temporary folder exists (Orbax writes a checkpoint into
``checkpoints/STEP.orbax-checkpoint-tmp-*`` and renames it when whole): the script watches the folder and
kills the moment the run's first or second save appears. The other kills land 0-50 ms after the run printed
a step chosen at random one to two epochs beyond its last checkpoint (every step is printed). A kill is
survived when the next run of the same command goes on from the checkpoints the killed one left, without
an error. Reported: kills, kills mid-save, kills survived, checkpoints bitwise equal to the uninterrupted
run's, epochs logged once in metrics.jsonl and in TensorBoard, unfinished saves left behind, and the wall
time; as a table and as JSON in ``DIR/kill_resume.json`` with ``--out DIR``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import add_out_option
from train.arguments import CommandParser
from train.exits import run_command
from train.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ("--arch", "lenet5", "--dataset", "digits", "--batch-size", "64", "--schedule", "constant", "--warmup-epochs",
         "0", "--lr", "0.05", "--seed", "0", "--keep-checkpoints", "1000", "--checkpoint-every-epochs", "1",
         "--log-every-steps", "1", "--no-plots")
STEPS_PER_EPOCH = 1437 // 64  # the digits' training split, batch 64
TIMINGS = ("time", "images_per_sec", "epoch_time_s")


def _start(args: list[str], cache: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=cache, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _saves(folder: str) -> set[str]:
    """The temporary folders of checkpoints being saved (or left by a save that was killed)."""
    try:
        return {entry.name for entry in os.scandir(folder) if ".orbax-checkpoint-tmp" in entry.name}
    except FileNotFoundError:
        return set()


def _kill_one(args: list[str], cache: str, workdir: str, mid_save: bool, chooser: random.Random) -> dict:
    """One run of ``args``, killed in the middle of its first or second checkpoint save (``mid_save``), or
    a few milliseconds after it reached a step one to two epochs beyond where it resumed; what became of it."""
    proc = _start(args, cache)
    folder = os.path.join(workdir, "checkpoints")
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=stream, sink=sink: sink.extend(s), daemon=True)
               for stream, sink in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    left = _saves(folder)  # by an earlier kill: this run removes them
    done = max((int(name) for name in os.listdir(folder) if name.isdigit()), default=0) if os.path.isdir(folder) else 0
    skip = chooser.randint(0, 1)  # saves let through before the one killed
    target = done + chooser.randint(1, 2 * STEPS_PER_EPOCH)
    started, saves, landed_mid_save = time.monotonic(), set(), False
    while proc.poll() is None and time.monotonic() - started < 600:
        saves |= _saves(folder) - left
        if mid_save and len(saves) > skip:
            landed_mid_save = True
            break
        if not mid_save and any(line.startswith("step ") and int(line.split()[1].split("/")[0]) >= target
                                for line in out[-5:]):
            time.sleep(chooser.uniform(0.0, 0.05))
            landed_mid_save = bool(_saves(folder) - left - saves)
            break
        time.sleep(0.0005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    for reader in readers:
        reader.join(timeout=10)
    return {"killed": killed, "mid_save": landed_mid_save and killed, "exit": proc.returncode,
            "resumed": any(line.startswith("resuming from") for line in out),
            "error": [line.strip() for line in err if line.startswith("error: ")] if proc.returncode > 0 else []}


def _variables(workdir: str, step: int) -> list[np.ndarray]:
    import jax

    from train.inference import load_variables

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_variables(workdir, step)[0])]


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in handle]


def _tensorboard(workdir: str) -> list[tuple[int, float]]:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notes on the restart markers it honours
    accumulator = EventAccumulator(os.path.join(workdir, "tensorboard"))
    accumulator.Reload()
    return [(event.step, round(event.value, 6)) for event in accumulator.Scalars("test_top1")]


def run(kills: int, epochs: int, seed: int, folder: str) -> dict:
    cache = os.path.join(folder, "xla_cache")
    reference, workdir = os.path.join(folder, "reference"), os.path.join(folder, "killed")
    args = [*TRAIN, "--epochs", str(epochs)]
    began = time.monotonic()
    proc = _start([*args, "--workdir", reference], cache)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(f"the uninterrupted run failed: {err.strip().splitlines()[-1:]}")
    chooser = random.Random(seed)
    attempts = []
    for index in range(kills):
        mid_save = index % 2 == 0
        outcome = _kill_one([*args, "--workdir", workdir], cache, workdir, mid_save, chooser)
        attempts.append(outcome)
        if not outcome["killed"]:
            break  # the run finished before this kill: the ones left have nothing to interrupt
    final = _start([*args, "--workdir", workdir], cache)
    out, err = final.communicate()
    survived = sum(1 for i, a in enumerate(attempts) if a["killed"] and (
        attempts[i + 1]["exit"] in (0, -signal.SIGKILL) if i + 1 < len(attempts) else final.returncode == 0))
    steps = sorted(int(name) for name in os.listdir(os.path.join(reference, "checkpoints")) if name.isdigit())
    ours = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    equal = sum(1 for step in steps if step in ours and all(
        np.array_equal(a, b) for a, b in zip(_variables(workdir, step), _variables(reference, step))))
    records, expected = _records(workdir), _records(reference)
    return {
        "kills": sum(a["killed"] for a in attempts),
        "kills_mid_save": sum(a["mid_save"] for a in attempts),
        "kills_survived": survived,
        "errors": [a["error"] for a in attempts if a["error"]]
        + ([err.strip().splitlines()[-1:]] if final.returncode else []),
        "checkpoints": len(steps),
        "checkpoints_bitwise_equal": equal,
        "epochs": epochs,
        "epochs_logged_once": [r["epoch"] for r in records] == list(range(1, epochs + 1)) and records == expected,
        "tensorboard_steps_once": _tensorboard(workdir) == _tensorboard(reference),
        "corrupt_checkpoints_set_aside": len(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))
        if os.path.isdir(os.path.join(workdir, "corrupt_checkpoints")) else 0,
        "unfinished_saves_left": len(_saves(os.path.join(workdir, "checkpoints"))),
        "wall_s": round(time.monotonic() - began, 1),
        "seed": seed,
    }


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks.kill_resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs to deliver, every other one mid-save")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of LeNet-5 on the digits (22 steps each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of kill moments")
    parser.add_argument("--folder", help="where the workdirs go (default: a temporary folder, removed after)")
    add_out_option(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.kills <= 1000 or not 2 <= args.epochs <= 1000:
        parser.error("--kills must be from 1 to 1000 and --epochs from 2 to 1000")

    def body() -> int:
        folder = args.folder or tempfile.mkdtemp(prefix="kill_resume_")
        try:
            result = run(args.kills, args.epochs, args.seed, folder)
        finally:
            if not args.folder:
                shutil.rmtree(folder, ignore_errors=True)
        import jax

        result.update(python=platform.python_version(), jax=jax.__version__, machine=platform.machine(),
                      cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = str(args.out / "kill_resume.json")
            with open(path + ".tmp", "w") as handle:
                json.dump(result, handle, indent=2)
            os.replace(path + ".tmp", path)
        whole = (result["kills_survived"] == result["kills"] and not result["errors"]
                 and result["checkpoints_bitwise_equal"] == result["checkpoints"] and result["epochs_logged_once"]
                 and result["tensorboard_steps_once"])
        return 0 if whole else 1

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
