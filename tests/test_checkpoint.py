"""Checkpoints: a damaged newest checkpoint is set aside and the previous one restored, quietly.

Orbax reads a checkpoint's arrays as concurrent asyncio tasks on a loop of its own. When one read fails,
the others are abandoned mid-flight; unless they are waited for, each later echoes to stderr (a task
destroyed while pending, an exception never retrieved, or TensorStore calling back into a loop that is
already closed). The trainer's one-sentence warning must be the only trace a damaged checkpoint leaves.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading

import jax
import numpy as np
import pytest

from train.checkpoint import CheckpointError, Checkpoints
from train.checkpoint_checks import drained_event_loops
from train.inference import load_variables

ARRAYS = 48


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {f"w{i:02d}": rng.standard_normal((64 + i, 16), dtype=np.float32) for i in range(ARRAYS)}}


def _meta(epoch: int) -> dict:
    """A meta item as the trainer writes it (`train.run.Run.meta`), with what every command reads."""
    return {"arch": "lenet5", "num_classes": 2, "image_side": 12, "epoch": epoch, "position": 0, "batch_size": 4,
            "dataset": {"class_names": ["a", "b"], "image_shape": [8, 8, 1], "mean": [0.5], "std": [0.25]}}


def _truncate_largest_chunk(step_dir) -> None:
    target = max((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


@pytest.fixture
def echoes(monkeypatch, caplog):
    """Everything a restore leaves behind: asyncio's logged errors and unraisable exceptions."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "asyncio"] + [
        repr(u.exc_value) for u in unraisable]


def test_damaged_newest_checkpoint_is_set_aside_without_echoes(tmp_path, echoes, capfd):
    warnings = []
    checkpoints = Checkpoints(str(tmp_path), keep=5, warn=warnings.append)
    checkpoints.save(1, _state(1), _meta(1))
    checkpoints.save(2, _state(2), _meta(2))
    _truncate_largest_chunk(tmp_path / "checkpoints" / "2")

    restored, meta, step = checkpoints.restore(jax.tree_util.tree_map(np.zeros_like, _state(0)))
    checkpoints.close()
    gc.collect()

    assert (step, meta) == (1, _meta(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, _state(1))
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 2 cannot be read (")
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    assert echoes() == []
    assert capfd.readouterr().err == ""


def test_loading_a_damaged_checkpoint_for_inference_fails_in_one_sentence(tmp_path, echoes, capfd):
    checkpoints = Checkpoints(str(tmp_path), keep=5, warn=print)
    checkpoints.save(1, _state(1), _meta(1))
    checkpoints.close()
    variables, meta = Checkpoints(str(tmp_path), writable=False).restore_saved(1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"], _state(1)["params"])
    _truncate_largest_chunk(tmp_path / "checkpoints" / "1")

    # The reason is readable: more than "(Exception)", and none of the reprs TensorStore appends.
    with pytest.raises(CheckpointError, match=r"^checkpoint 1 in .+ cannot be read \(\w+: [^<>]+\)\.$"):
        load_variables(str(tmp_path), 1)
    gc.collect()

    assert echoes() == []
    assert capfd.readouterr().err == ""


def test_drained_loop_waits_for_abandoned_tasks_and_ignores_late_callbacks(echoes):
    """The mechanism on its own: a main coroutine fails while a sibling still waits on another thread."""
    release = threading.Event()
    finished = []

    async def sibling(loop):
        future = loop.create_future()

        def work():
            release.wait()
            loop.call_soon_threadsafe(future.set_result, "read")

        threading.Thread(target=work).start()
        finished.append(await future)

    async def main():
        loop = asyncio.get_running_loop()
        loop.create_task(sibling(loop))
        await asyncio.sleep(0)
        loop.call_later(0.05, release.set)
        raise ValueError("one read failed")

    with drained_event_loops():
        loop = asyncio.new_event_loop()
    with pytest.raises(ValueError, match="one read failed"):
        loop.run_until_complete(main())
    loop.close()  # waits for the sibling instead of abandoning it

    assert finished == ["read"]
    assert loop.is_closed()
    loop.call_soon_threadsafe(print, "too late")  # a callback after close is dropped, not raised
    gc.collect()
    assert echoes() == []


def test_a_read_that_failed_unawaited_is_not_echoed_when_collected(echoes):
    """A sibling read that failed before the loop closed, and that no one awaited: its exception counts as
    retrieved, so asyncio does not log "Task exception was never retrieved" when the task is collected."""
    async def sibling():
        raise ValueError("a second read failed too")

    async def main():
        asyncio.get_running_loop().create_task(sibling())
        await asyncio.sleep(0.01)  # the sibling fails meanwhile; nothing awaits it
        raise ValueError("one read failed")

    with drained_event_loops():
        loop = asyncio.new_event_loop()
    with pytest.raises(ValueError, match="one read failed"):
        loop.run_until_complete(main())
    loop.close()
    del loop
    gc.collect()
    assert echoes() == []
