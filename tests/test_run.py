"""`train.run.build_run`: the run built once from its config, checked against data, devices and weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from train.config import Config, ConfigError
from train.run import build_run, image_side


def _run(digits, **changes):
    config = Config(arch="lenet5_bn", batch_size=64, epochs=2, lr=0.1, **changes).validate()
    return build_run(config, data=digits)


def test_batch_must_split_over_devices(digits):
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_run(Config(batch_size=12), data=digits, device_count=8)


def test_image_side_is_raised_to_the_architecture_minimum(digits):
    assert image_side(Config(arch="lenet5_relu"), digits, "lenet5_relu") == flaxnets.min_input_size("lenet5_relu", 1)
    # ImageNet networks see at least 32 pixels (their last maps 1x1), small-image ones the data's own 8.
    assert [image_side(Config(arch=a), digits, a) for a in ("resnet18", "googlenet", "resnet18_cifar")] == [32, 32, 8]
    with pytest.raises(ConfigError, match="minimum input of 32x32"):
        image_side(Config(arch="vgg11", image_size=16), digits, "vgg11")


# -- starting from torchvision weights ------------------------------------------------------------------------------


def test_init_from_weights_and_freeze_backbone(digits, tmp_path, reference_step):
    from flaxnets.convert import save_state_dict, to_torch

    # ImageNet-shaped resnet18 weights (3 channels, 1000 classes), written as torchvision keys in .npz.
    imagenet = flaxnets.create_model("resnet18", num_classes=1000)
    weights = jax.jit(lambda key: imagenet.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
    path = tmp_path / "resnet18.npz"
    save_state_dict(to_torch("resnet18", weights, return_numpy=True), path)

    config = Config(arch="resnet18", batch_size=32, epochs=2, warmup_epochs=0, lr=0.5, weight_decay=0.0,
                    init_from=str(path), freeze_backbone=True).validate()
    run = build_run(config, data=digits)
    state = run.init_state()
    # The backbone is the file's: grey images get the first kernel summed over its RGB inputs.
    np.testing.assert_allclose(state.params["conv1"]["kernel"],
                               weights["params"]["conv1"]["kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(state.params["layer4_1"]["conv2"]["kernel"],
                                  weights["params"]["layer4_1"]["conv2"]["kernel"])
    assert state.params["fc"]["kernel"].shape == (512, 10)  # a new 10-class head

    after, _ = reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:32]),
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
        build_run(Config(arch="resnet34", init_from=str(path), batch_size=32), data=digits).init_state()


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(digits, reference_step):
    run = _run(digits, dtype="bfloat16", warmup_epochs=0)
    assert run.preprocess.dtype == jnp.bfloat16 and run.model.dtype == jnp.bfloat16
    state = run.init_state()
    after, metrics = reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:64]),
                                                  "label": jnp.asarray(digits.train_labels[:64]),
                                                  "index": jnp.arange(64)})
    leaves = jax.tree_util.tree_leaves((after.params, after.batch_stats, after.opt_state))
    assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss_sum"]))
    assert not np.allclose(after.params["conv1"]["kernel"], state.params["conv1"]["kernel"])
