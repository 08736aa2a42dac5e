"""The numerical checks of the GPU run (`benchmarks.gpu`): the trainer's step against a float64
reference, converted torchvision weights against torchvision, and the data-parallel drivers against jit.

Each check returns rows of plain numbers, every error next to the tolerance it is held to, so that the
run's JSON says what was compared and how closely, not just "passed".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CHECKS", "PARITY_TOLERANCE", "PARALLEL_TOLERANCE", "step_against_float64", "torch_reference",
           "convert_parity", "drivers_against_jit", "relative_error"]

# The step on the device against float64 on the CPU, from the same parameters and batch. Loss: |a - b| / |b|;
# BatchNorm statistics: the L2 norm of the difference of their change in the step over that of the
# reference's change; gradients: the same relative norm over all leaves together, and their cosine.
#
# float32 at full precision (no TF32) checks the device's arithmetic: the bounds are about four times
# the errors a float32 step on the CPU showed against float64 (loss 1.2e-6, gradients 5.3e-3 for
# GoogLeNet, statistics 3.8e-6: the architectures and sides of `benchmarks.gpu.correctness.REAL`, batch 8, on a
# 2-core CPU, 2026-11). Gradients can reach 5e-3 rather than 1e-6
# because a max-pool window whose two largest inputs differ by less than float32's rounding sends its
# gradient elsewhere, and BatchNorm networks at initialisation amplify such changes downwards.
#
# At reduced precision (bfloat16, and float32 at JAX's default precision, which on GPUs that have it is
# TF32, three more mantissa bits than bfloat16) the same effects dominate: on the CPU bfloat16 gradients
# were 6-88% away from float64 in norm (cosine 0.62 for GoogLeNet, likely because its many max-pools
# meet more ties among bfloat16's coarser values), while the loss stayed within 2.2e-3 and the statistics within 3.2e-2. So the gradients are held
# to their direction there, and loss and statistics to about three times what the CPU showed.
REDUCED = {"loss": 1e-2, "grads_cosine": 0.5, "batch_stats": 1e-1}
CHECKS = {  # name: (dtype, matmul precision while tracing, tolerances)
    "float32": ("float32", "highest", {"loss": 1e-5, "grads": 2e-2, "batch_stats": 1e-4}),
    "float32, default precision": ("float32", None, REDUCED),
    "bfloat16": ("bfloat16", None, REDUCED),
}
# Converted weights against torchvision, both at full float32 precision (no TF32 on either side): the
# largest logit difference over the largest reference logit. cuDNN and XLA choose different convolution
# algorithms, which reorder the sums.
PARITY_TOLERANCE = 1e-4
# shard_map and pmap over the devices against plain jit on the whole batch, after a few SGD steps:
# parameters and statistics agree to float32 reassociation (as tests/test_train_step.py).
PARALLEL_TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


def relative_error(got: Any, reference: Any) -> float:
    """``||got - reference|| / ||reference||`` over every leaf of two trees of the same structure."""
    import jax

    a = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(got)]
    b = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(reference)]
    difference = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    size = sum(float(np.sum(y ** 2)) for y in b)
    return float(np.sqrt(difference / size)) if size else float(np.sqrt(difference))


def _worst_leaf(got: Any, reference: Any) -> tuple[str, float]:
    """The leaf with the largest relative error among those holding at least 1% of the reference's norm."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(reference)
    total = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for _, x in leaves))
    worst = ("", 0.0)
    for (path, ref), mine in zip(leaves, jax.tree_util.tree_leaves(got)):
        ref = np.asarray(ref, np.float64)
        norm = float(np.linalg.norm(ref))
        if norm >= 0.01 * total:
            error = float(np.linalg.norm(np.asarray(mine, np.float64) - ref)) / norm
            if error > worst[1]:
                worst = (jax.tree_util.keystr(path), error)
    return worst


def _keep_gradients():
    """An optimizer that leaves the parameters as they are and keeps the step's gradients as its state,
    so that the trainer's own step can be compared gradient by gradient."""
    import jax
    import jax.numpy as jnp
    import optax

    def update(grads, state, params=None):
        return jax.tree_util.tree_map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(lambda params: jax.tree_util.tree_map(jnp.zeros_like, params), update)


def _run_step(arch: str, dtype: Any, device: Any, variables: Any, images: np.ndarray, labels: np.ndarray,
              precision: str | None = None) -> dict:
    """The trainer's train step (`train.step.train_step`) once on ``device``: loss, gradients and the new
    BatchNorm statistics, as NumPy."""
    import jax
    import jax.numpy as jnp

    import flaxnets
    from train import step as steps
    from train.tuning import StepSettings, step_settings

    spec = flaxnets.get_spec(arch)
    float64 = dtype == jnp.float64
    # The device side runs as the trainer would there (the backend's kernel set, train.tuning); the float64
    # reference is the plain model.
    kernels = StepSettings() if float64 else step_settings(device.platform)
    model = flaxnets.create_model(arch, num_classes=spec.num_classes, dtype=dtype,
                                  param_dtype=jnp.float64 if float64 else jnp.float32, ops=kernels.ops())
    tx = _keep_gradients()
    preprocess = steps.Preprocess(mean=(0.45,) * 3, std=(0.225,) * 3, size=images.shape[1], augment=False,
                                  dtype=dtype)
    cast = (lambda x: np.asarray(x, np.float64)) if float64 else np.asarray
    params = jax.tree_util.tree_map(cast, variables["params"])
    state = steps.TrainState(step=np.zeros((), np.int32), params=params,
                             batch_stats=jax.tree_util.tree_map(cast, variables.get("batch_stats", {})),
                             opt_state=tx.init(params), rng=np.asarray(jax.random.key_data(jax.random.key(1))))
    batch = {"image": images, "label": labels, "index": np.arange(len(labels), dtype=np.int32)}
    state, batch = jax.device_put((state, batch), device)
    step = jax.jit(StepSettings(matmul_precision=precision).traced(steps.bind(
        steps.train_step, model=model, tx=tx, preprocess=preprocess, num_classes=spec.num_classes,
        aux_loss_weight=spec.aux_loss_weight)))
    new, metrics = jax.device_get(step(state, batch))
    return {"loss": float(metrics["loss_sum"]) / float(metrics["count"]), "grads": new.opt_state,
            "batch_stats": new.batch_stats}


def _cosine(got: Any, reference: Any) -> float:
    import jax

    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(got)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(reference)])
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def step_against_float64(arch: str, side: int, batch: int, checks: Sequence[str] = tuple(CHECKS),
                         seed: int = 0) -> list[dict[str, Any]]:
    """One train step of ``arch`` on JAX's default device for each of ``checks`` (names of `CHECKS`)
    against the same step in float64 on the CPU, from the same parameters and batch; one row per check
    with its errors, its tolerances and ``ok``. Needs ``jax_enable_x64``, set before JAX computes
    anything: it also decides the dropout masks' random numbers, which must be the same on both sides.
    (With it, the loss's one-hot targets are float64 on the device too; the network keeps its dtype.)"""
    import jax
    import jax.numpy as jnp

    import flaxnets
    from benchmarks.common import synthetic_variables
    from flaxnets.analysis import abstract_variables

    if jax.dtypes.canonicalize_dtype(np.float64) != np.float64:  # jax_enable_x64 is off
        raise RuntimeError("step_against_float64 needs jax_enable_x64.")
    spec = flaxnets.get_spec(arch)
    model = flaxnets.create_model(arch, num_classes=spec.num_classes)
    variables = jax.device_get(synthetic_variables(abstract_variables(model, (1, side, side, 3)), seed))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, spec.num_classes, batch).astype(np.int32)
    reference = _run_step(arch, jnp.float64, jax.devices("cpu")[0], variables, images, labels)
    old_stats = variables.get("batch_stats", {})
    change = lambda stats: jax.tree_util.tree_map(lambda new, old: np.asarray(new, np.float64) - old, stats, old_stats)
    rows = []
    for name in checks:
        dtype, precision, limits = CHECKS[name]
        got = _run_step(arch, getattr(jnp, dtype), jax.devices()[0], variables, images, labels, precision)
        errors = {"loss_error": abs(got["loss"] - reference["loss"]) / abs(reference["loss"]),
                  "grads_error": relative_error(got["grads"], reference["grads"]),
                  "grads_cosine": _cosine(got["grads"], reference["grads"]),
                  "batch_stats_error": (relative_error(change(got["batch_stats"]), change(reference["batch_stats"]))
                                        if old_stats else None)}
        within = [errors["loss_error"] <= limits["loss"],
                  errors["batch_stats_error"] is None or errors["batch_stats_error"] <= limits["batch_stats"],
                  errors["grads_error"] <= limits.get("grads", np.inf),
                  errors["grads_cosine"] >= limits.get("grads_cosine", -np.inf)]
        leaf, leaf_error = _worst_leaf(got["grads"], reference["grads"])
        rows.append({"arch": arch, "check": name, "dtype": dtype, "matmul_precision": precision or "default",
                     "side": side, "batch": batch, "loss": got["loss"], "loss_float64": reference["loss"], **errors,
                     "tolerances": limits, "worst_grad_leaf": leaf, "worst_grad_leaf_error": leaf_error,
                     "ok": all(within)})
    return rows


def torch_reference(archs: Sequence[str], side: int, batch: int, folder: str, device: str) -> None:
    """Write, for each of ``archs``, torchvision's randomly initialised weights, a batch of inputs and the
    model's eval-mode logits on ``device`` (``"cuda"``, ``"cpu"``, or ``"auto"``: CUDA when PyTorch has it)
    to ``folder/ARCH.npz`` and ``folder/ARCH.weights.npz``. Runs in its own process, without JAX (see
    `convert_parity`)."""
    import torch

    from benchmarks.vs_torch import _torch_model, load_torch
    from flaxnets.convert import save_state_dict

    _, torchvision, reason = load_torch()
    if reason:
        raise RuntimeError(reason)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # Full float32 on both sides: PyTorch would otherwise use TF32 in cuDNN convolutions. The
    # fp32_precision settings replaced allow_tf32 in PyTorch 2.9; older releases have only the latter.
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for arch in archs:
        model = _torch_model(torchvision, arch, torch).to(device).eval()
        images = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, side, side), np.float32))
        with torch.inference_mode():
            logits = model(images.to(device)).float().cpu().numpy()
        save_state_dict({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
                        Path(folder) / f"{arch}.weights.npz")
        np.savez(Path(folder) / f"{arch}.npz", images=images.numpy(), logits=logits, device=np.str_(device))


def convert_parity(archs: Sequence[str], side: int, batch: int, torch_device: str, timeout: float) -> list[dict]:
    """`flaxnets.convert.from_torch` against torchvision: torchvision's logits come from a child process
    (`torch_reference`, PyTorch on ``torch_device``) so that PyTorch's and JAX's CUDA libraries never
    share a process; flaxnets runs the converted weights on JAX's default device, at full float32."""
    import jax
    import jax.numpy as jnp

    import flaxnets
    from benchmarks.common import model_for
    from flaxnets.convert import from_torch, load_state_dict

    rows = []
    with tempfile.TemporaryDirectory(prefix="flaxnets-parity-") as folder:
        command = [sys.executable, "-m", "benchmarks.gpu", "torch-reference", "--folder", folder, "--side",
                   str(side), "--batch", str(batch), "--device", torch_device, "--archs", ",".join(archs)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            failure = None if done.returncode == 0 else " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        except subprocess.TimeoutExpired:
            failure = f"no result within {timeout:.0f} s"
        if failure:
            return [{"arch": ",".join(archs), "ok": False, "error": f"torchvision reference failed: {failure}"}]
        for arch in archs:
            reference = np.load(os.path.join(folder, f"{arch}.npz"))
            variables = from_torch(arch, load_state_dict(os.path.join(folder, f"{arch}.weights.npz")))
            model = model_for(arch, jnp.float32)
            images = np.ascontiguousarray(reference["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
            with jax.default_matmul_precision("highest"):
                logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
            expected = reference["logits"]
            error = float(np.max(np.abs(logits - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
            rows.append({"arch": arch, "side": side, "batch": batch, "torch_device": str(reference["device"]),
                         "jax_device": jax.devices()[0].device_kind, "params": flaxnets.count_params(variables["params"]),
                         "logits_error": error, "tolerance": PARITY_TOLERANCE, "ok": error <= PARITY_TOLERANCE})
    return rows


def drivers_against_jit(arch: str, batch: int, steps: int, kinds: Sequence[str] = ("shard_map", "pmap")) -> list[dict]:
    """``steps`` SGD steps on the bundled digits through each data-parallel driver over every device,
    against plain `jax.jit` of the same per-device step on the whole batch (no device axis). Both run
    at full float32 precision: at the default (TF32 on GPUs) two differently fused programs round
    differently, which says nothing about the drivers."""
    import jax

    with jax.default_matmul_precision("highest"):
        return _drivers_against_jit(arch, batch, steps, kinds)


def _drivers_against_jit(arch: str, batch: int, steps: int, kinds: Sequence[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import flaxnets
    from train import step as train_steps
    from train.config import Config
    from train.data import epoch_order, load_dataset
    from train.parallel import host, make_driver
    from train.run import build_run

    digits = load_dataset("digits")
    run = build_run(Config(arch=arch, batch_size=batch, epochs=2, lr=0.1, warmup_epochs=0).validate(), data=digits)
    initial = run.init_state()
    plain = flaxnets.create_model(arch, num_classes=run.data.num_classes, bn_axis_name=None)
    reference_step = jax.jit(train_steps.bind(train_steps.train_step, model=plain, tx=run.tx, preprocess=run.preprocess,
                                              num_classes=run.data.num_classes))
    order = epoch_order(0, 0, digits.train_size)
    single = initial
    for i in range(steps):
        picked = order[i * batch:(i + 1) * batch]
        single, _ = reference_step(single, {"image": jnp.asarray(digits.train_images[picked]),
                                            "label": jnp.asarray(digits.train_labels[picked]),
                                            "index": jnp.asarray(picked)})
    single = jax.device_get(single)
    rows = []
    for kind in kinds:
        driver = make_driver(kind, run.train_step, run.eval_step, run.settings)
        data = driver.put_replicated({"image": digits.train_images, "label": digits.train_labels})
        state = driver.put_replicated(initial)
        for i in range(steps):
            state, _ = driver.train(state, data, driver.put_indices(order[i * batch:(i + 1) * batch]))
        state = host(state)
        worst = 0.0
        for name in ("params", "batch_stats"):
            for ours, theirs in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                                    jax.tree_util.tree_leaves(getattr(single, name))):
                excess = np.abs(ours - theirs) / (PARALLEL_TOLERANCE["atol"] + PARALLEL_TOLERANCE["rtol"] * np.abs(theirs))
                worst = max(worst, float(np.max(excess)))
        rows.append({"driver": kind, "arch": arch, "devices": driver.device_count, "batch": batch, "steps": steps,
                     "params_error": relative_error(state.params, single.params),
                     "batch_stats_error": relative_error(state.batch_stats, single.batch_stats),
                     "worst_over_tolerance": worst, **PARALLEL_TOLERANCE, "traces": driver.traces["train"],
                     "ok": worst <= 1.0 and driver.traces["train"] == 1})
    return rows
