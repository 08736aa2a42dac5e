"""The train and eval steps in-process (`train.step`, `train.parallel`, `train.feed`): the data-parallel step
against one device, every example evaluated once, augmentation. End-to-end runs through the command line
are in test_train_cli.py; the run's construction in test_run.py, the config in test_config.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import scores
from train.run import build_run
from train import step as steps
from train.config import Config
from train.data import epoch_order
from train.feed import eval_indices, make_feed
from train.parallel import host, make_driver


def _run(digits, **changes):
    config = Config(arch="lenet5_bn", batch_size=64, epochs=2, lr=0.1, **changes).validate()
    return build_run(config, data=digits)


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_data_parallel_step_equals_one_device_on_the_global_batch(digits, kind, reference_step):
    assert jax.device_count() == 8, "conftest asks for 8 host devices"
    run = _run(digits)
    state0 = run.init_state()
    driver = make_driver(kind, steps.bind(steps.train_step, model=run.model, tx=run.tx, preprocess=run.preprocess,
                                          num_classes=run.data.num_classes),
                         steps.bind(steps.eval_step, model=run.model, preprocess=run.preprocess,
                                    num_classes=run.data.num_classes))
    data = driver.put_replicated({"image": digits.train_images, "label": digits.train_labels})
    reference = reference_step(run)
    parallel_state, single_state = driver.put_replicated(state0), state0
    order = epoch_order(0, 0, len(digits.train_labels))
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
    results = scores.evaluate(run, make_feed(run, driver, with_train=False), driver.put_replicated(state))
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
