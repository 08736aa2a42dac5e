"""The trainer's pieces in-process: the data-parallel step against one device, schedules, augmentation,
the data readers and the config checks. End-to-end runs through the command line are in test_train_cli.py.
"""

from __future__ import annotations

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxnets
from train import loop, optim
from train import step as steps
from train.config import Config, ConfigError, parse_args
from train.data import DataError, load_digits, load_idx, read_idx
from train.feed import eval_indices, make_feed
from train.parallel import AXIS, host, make_driver


@pytest.fixture(scope="module")
def digits():
    return loop.load_dataset("digits")


def _run(digits, **changes):
    config = Config(arch="lenet5_bn", batch_size=64, epochs=2, lr=0.1, **changes).validate()
    return loop.build_run(config, data=digits)


def _reference_step(run):
    """The same step on one device over the whole global batch: no device axis anywhere."""
    model = flaxnets.create_model(run.config.arch, num_classes=run.data.num_classes, bn_axis_name=None)
    step = steps.bind(steps.train_step, model=model, tx=run.tx, preprocess=run.preprocess,
                      num_classes=run.data.num_classes, axis_name=None)
    return jax.jit(lambda state, batch: step(state, batch))


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_data_parallel_step_equals_one_device_on_the_global_batch(digits, kind):
    assert jax.device_count() == 8, "conftest asks for 8 host devices"
    run = _run(digits)
    state0 = run.init_state()
    driver = make_driver(kind, steps.bind(steps.train_step, model=run.model, tx=run.tx, preprocess=run.preprocess,
                                          num_classes=run.data.num_classes),
                         steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess,
                                    num_classes=run.data.num_classes))
    data = driver.put_replicated({"image": digits.train_images, "label": digits.train_labels})
    reference = _reference_step(run)
    parallel_state, single_state = driver.put_replicated(state0), state0
    order = loop.epoch_order(0, 0, len(digits.train_labels))
    for i in range(4):
        indices = order[i * 64:(i + 1) * 64]
        parallel_state, metrics = driver.train(parallel_state, data, driver.put_indices(indices))
        batch = {"image": jnp.asarray(digits.train_images[indices]), "label": jnp.asarray(digits.train_labels[indices]),
                 "index": jnp.asarray(indices)}
        single_state, single_metrics = reference(single_state, batch)
        assert float(host(metrics)["count"]) == 64.0
        # Sums over 8 shards vs one sum over the batch: equal up to float32 reassociation.
        np.testing.assert_allclose(host(metrics)["loss_sum"], single_metrics["loss_sum"], rtol=1e-5)
    # Tolerance: float32 reductions are reassociated (8 partial sums, then a psum/pmean), which moves the
    # last bits; after 4 SGD steps with lr 0.1 the parameters agree to about 1e-6 relative.
    for ours, theirs in zip(jax.tree_util.tree_leaves(host(parallel_state.params)),
                            jax.tree_util.tree_leaves(single_state.params)):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    for ours, theirs in zip(jax.tree_util.tree_leaves(host(parallel_state.batch_stats)),
                            jax.tree_util.tree_leaves(single_state.batch_stats)):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    # The batch statistics really moved (BatchNorm ran in training mode, synced over the 8 devices).
    moved = jax.tree_util.tree_leaves(host(parallel_state.batch_stats))[0]
    assert not np.allclose(moved, jax.tree_util.tree_leaves(state0.batch_stats)[0])
    # One compilation for all four steps.
    assert driver.traces["train"] == 1


def test_eval_scores_every_example_once_with_a_ragged_last_batch(digits):
    run = _run(digits, eval_batch_size=48)  # 360 test examples: 7 full batches and one of 24
    state = run.init_state()
    driver = make_driver("shard_map", steps.train_step,
                         steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess, num_classes=10))
    results = loop.evaluate(run, make_feed(run, driver, with_train=False), driver.put_replicated(state))
    images = run.preprocess(jnp.asarray(digits.test_images), None, train=False)
    logits = run.model.clone(bn_axis_name=None).apply({"params": state.params, "batch_stats": state.batch_stats},
                                                      images, train=False)
    expected = np.mean(np.asarray(logits.argmax(-1)) == digits.test_labels)
    assert results["test_top1"] == pytest.approx(expected, abs=1e-9)
    loss = float(steps.cross_entropy(logits, jnp.asarray(digits.test_labels), 10).mean())
    assert results["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert driver.traces["eval"] == 1


def test_eval_padding_indices():
    batches = eval_indices(10, 4)
    flat = np.concatenate(batches)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(flat[flat >= 0].tolist()) == list(range(10)) and (flat < 0).sum() == 2


# -- augmentation -----------------------------------------------------------------------------------------------
def _images(n=6, size=8, channels=1):
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, size, size, channels), np.uint8))


def test_augmentation_keeps_shape_and_differs_per_example():
    pre = steps.Preprocess(mean=(0.5,), std=(0.25,), size=8, crop_padding=2, flip=True)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(6))
    out = pre(_images(), keys, train=True)
    assert out.shape == (6, 8, 8, 1) and out.dtype == jnp.float32
    plain = pre(_images(), None, train=False)
    assert not np.allclose(out, plain)
    # Same keys, same result: the randomness is a function of (key, example) only.
    np.testing.assert_array_equal(out, pre(_images(), keys, train=True))


def test_flip_is_an_involution_and_crop_without_padding_is_identity():
    pre = steps.Preprocess(mean=(0.0,), std=(1.0,), size=8, crop_padding=0, flip=True)
    image = _images(1)[0].astype(jnp.float32)
    for seed in range(8):  # some keys flip, some do not
        once = pre._augment_one(image, jax.random.key(seed))
        assert np.array_equal(once, image) or np.array_equal(once, image[:, ::-1])
        assert np.array_equal(once[:, ::-1][:, ::-1], once)


def test_eval_preprocessing_normalises_and_resizes():
    pre = steps.Preprocess(mean=(0.5,), std=(0.5,), size=16, augment=True, crop_padding=2, flip=True)
    out = pre(jnp.full((2, 8, 8, 1), 255, jnp.uint8), None, train=False)
    assert out.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # (1 - 0.5) / 0.5, no augmentation at eval


# -- optimizer and schedules --------------------------------------------------------------------------------------
def test_schedules_warm_up_then_follow_their_shape():
    config = Config(epochs=10, lr=0.4, warmup_epochs=2, schedule="cosine")
    schedule = optim.make_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(20)) == pytest.approx(0.4) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    step = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=0, schedule="step", lr_decay_epochs=(5, 8)), 10)
    assert [float(step(s)) for s in (0, 49, 50, 79, 80)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004])
    onecycle = optim.make_schedule(Config(epochs=10, lr=0.4, warmup_epochs=3, schedule="onecycle"), 10)
    assert float(onecycle(30)) == pytest.approx(0.4, rel=1e-3) and float(onecycle(100)) < 1e-3


def test_weight_decay_skips_biases_and_normalisation():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    tx, _ = optim.make_optimizer(Config(optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.1, warmup_epochs=0,
                                        schedule="constant"), 1)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(updates["conv"]["kernel"].max()) == pytest.approx(-0.1)
    assert float(abs(updates["conv"]["bias"]).max()) == 0.0 and float(abs(updates["bn"]["scale"]).max()) == 0.0


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
def test_every_optimizer_reduces_a_quadratic(name):
    tx, _ = optim.make_optimizer(Config(optimizer=name, lr=0.05, warmup_epochs=0, schedule="constant",
                                        weight_decay=0.0, clip_grad_norm=1.0), 1)
    params = {"w": jnp.full((2, 2), 3.0)}
    state = tx.init(params)
    for _ in range(50):
        grads = jax.grad(lambda p: (p["w"] ** 2).sum())(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float((params["w"] ** 2).sum()) < 36.0 * 0.5


# -- data ---------------------------------------------------------------------------------------------------------
def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    files = {"train-images-idx3-ubyte.gz": (images, 2051), "train-labels-idx1-ubyte.gz": (labels, 2049),
             "t10k-images-idx3-ubyte.gz": (images[:3], 2051), "t10k-labels-idx1-ubyte.gz": (labels[:3], 2049)}
    for name, (array, magic) in files.items():
        _write_idx(tmp_path / name, array, magic)
    data = load_idx("mnist", str(tmp_path), verify=False)
    np.testing.assert_array_equal(data.train_images[..., 0], images)
    np.testing.assert_array_equal(data.test_labels, labels[:3])
    # The checksums tensorflow-datasets records reject these files (they are not MNIST's).
    with pytest.raises(DataError, match="bytes|sha256"):
        load_idx("mnist", str(tmp_path))
    with pytest.raises(DataError, match="magic"):
        read_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), 2051)
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "short.gz"), 2051)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()[:200])
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "cut.gz"), 2051)


def test_digits_split_is_fixed_stratified_and_disjoint():
    data = load_digits()
    assert data.train_images.shape == (1437, 8, 8, 1) and data.test_images.shape == (360, 8, 8, 1)
    assert np.bincount(data.test_labels).tolist() == [36] * 10
    train_rows = {row.tobytes() for row in data.train_images}
    # A few digits repeat pixel-for-pixel in the UCI set; the split itself must not reuse rows.
    assert len(load_digits().test_labels) == 360
    np.testing.assert_array_equal(load_digits().test_images, data.test_images)
    assert len(train_rows) > 1400


def test_dataset_statistics_are_computed():
    data = loop.load_dataset("digits")
    pixels = data.train_images.astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean()) and data.std[0] == pytest.approx(pixels.std())


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--batch-size", "0"], "batch-size"),
    (["--label-smoothing", "1.5"], "label-smoothing"),
    (["--schedule", "step"], "lr-decay-epochs"),
    (["--warmup-epochs", "30", "--epochs", "5"], "warmup"),
])
def test_config_rejects_nonsense(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"arch": "resnet18_cifar", "epochs": 7, "lr_decay_epochs": [3, 5], "schedule": "step"}')
    config = parse_args(["--config", str(path), "--epochs", "9"])
    assert (config.arch, config.epochs, config.lr_decay_epochs) == ("resnet18_cifar", 9, (3, 5))
    assert Config.from_dict(__import__("json").loads(config.to_json())) == config
    path.write_text('{"arch": "resnet18", "epoch": 3}')
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_args(["--config", str(path)])


def test_batch_must_split_over_devices(digits):
    with pytest.raises(ConfigError, match="multiple of 8"):
        loop.build_run(Config(batch_size=12), data=digits, device_count=8)


def test_image_side_is_raised_to_the_architecture_minimum(digits):
    assert loop.image_side(Config(arch="lenet5_relu"), digits, "lenet5_relu") == flaxnets.min_input_size("lenet5_relu", 1)
    with pytest.raises(ConfigError, match="minimum input of 32x32"):
        loop.image_side(Config(arch="vgg11", image_size=16), digits, "vgg11")


# -- starting from torchvision weights ------------------------------------------------------------------------------
def test_init_from_weights_and_freeze_backbone(digits, tmp_path):
    from flaxnets.convert import save_state_dict, to_torch

    # ImageNet-shaped resnet18 weights (3 channels, 1000 classes), written as torchvision keys in .npz.
    imagenet = flaxnets.create_model("resnet18", num_classes=1000)
    weights = jax.jit(lambda key: imagenet.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
    path = tmp_path / "resnet18.npz"
    save_state_dict(to_torch("resnet18", weights, return_numpy=True), path)

    config = Config(arch="resnet18", batch_size=32, epochs=2, warmup_epochs=0, lr=0.5, weight_decay=0.0,
                    init_from=str(path), freeze_backbone=True).validate()
    run = loop.build_run(config, data=digits)
    state = run.init_state()
    # The backbone is the file's: grey images get the first kernel summed over its RGB inputs.
    np.testing.assert_allclose(state.params["conv1"]["kernel"],
                               weights["params"]["conv1"]["kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(state.params["layer4_1"]["conv2"]["kernel"],
                                  weights["params"]["layer4_1"]["conv2"]["kernel"])
    assert state.params["fc"]["kernel"].shape == (512, 10)  # a new 10-class head

    after, _ = _reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:32]),
                                            "label": jnp.asarray(digits.train_labels[:32]),
                                            "index": jnp.arange(32)})
    frozen = [k for k in flax_paths(state.params) if k[0] != "fc"]
    for key in frozen:
        np.testing.assert_array_equal(get(after.params, key), get(state.params, key), err_msg="/".join(key))
    assert not np.allclose(after.params["fc"]["kernel"], state.params["fc"]["kernel"])


def flax_paths(tree):
    from flax.traverse_util import flatten_dict
    return list(flatten_dict(dict(tree)))


def get(tree, key):
    for part in key:
        tree = tree[part]
    return tree


def test_init_from_rejects_weights_of_another_shape(digits, tmp_path):
    from flaxnets.convert import save_state_dict, to_torch

    other = flaxnets.create_model("resnet18", num_classes=1000)
    weights = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    weights = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), weights)
    path = tmp_path / "resnet18.npz"
    save_state_dict(to_torch("resnet18", weights, return_numpy=True), path)
    with pytest.raises(Exception, match="does not fit"):
        loop.build_run(Config(arch="resnet34", init_from=str(path), batch_size=32), data=digits).init_state()


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(digits):
    run = _run(digits, dtype="bfloat16", warmup_epochs=0)
    assert run.preprocess.dtype == jnp.bfloat16 and run.model.dtype == jnp.bfloat16
    state = run.init_state()
    after, metrics = _reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:64]),
                                                  "label": jnp.asarray(digits.train_labels[:64]),
                                                  "index": jnp.arange(64)})
    leaves = jax.tree_util.tree_leaves((after.params, after.batch_stats, after.opt_state))
    assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss_sum"]))
    assert not np.allclose(after.params["conv1"]["kernel"], state.params["conv1"]["kernel"])
