"""The recipe primitives, each checked for what it does, and recipes as data.

EMA against a hand computation; mixup and cutmix keep each target's mass and paste exactly the share of
pixels lambda says; TrivialAugment Wide and RandAugment are torchvision's operations and magnitudes (against
torchvision itself, when installed) and are a function of their key; random erasing erases a rectangle of
the stated size or nothing; the weight-decay mask; stochastic depth is the identity in expectation; the
recipe files load, are overridden by flags, and report against their expected figure; scoring fewer epochs
(a recipe's time) trains the same.
"""

from __future__ import annotations

import dataclasses
import io
import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxnets
from flaxnets import augment, autoaugment
from flaxnets.models.resnet import BasicBlock, drop_path_rates
from flaxnets.training import decay_mask, ema_decay_per_step, ema_update
from train.arguments import parse_args
from train.config import Config, ConfigError
from train.recipes import list_recipes, load_recipe, report_line


# -- EMA --------------------------------------------------------------------------------------------------
def test_ema_update_is_the_hand_computed_average():
    ema = {"w": jnp.asarray([1.0, 2.0]), "count": jnp.asarray(3)}
    new = {"w": jnp.asarray([3.0, 6.0]), "count": jnp.asarray(4)}
    out = ema_update(ema, new, 0.75)
    np.testing.assert_allclose(out["w"], [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6])
    assert int(out["count"]) == 4  # counters are taken as they are
    # Three steps by hand: e1 = 0.75 e0 + 0.25 x1, e2 = 0.75 e1 + 0.25 x2, e3 = ...
    average, hand = {"w": jnp.zeros(1)}, 0.0
    for x in (4.0, 8.0, -2.0):
        average, hand = ema_update(average, {"w": jnp.full(1, x)}, 0.75), 0.75 * hand + 0.25 * x
    np.testing.assert_allclose(average["w"], [hand], rtol=1e-6)


def test_ema_restarts_at_the_weights_before_its_start_step():
    ema, new = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    np.testing.assert_array_equal(ema_update(ema, new, 0.9, step=4, start_step=5)["w"], [1.0, 1.0])
    np.testing.assert_allclose(ema_update(ema, new, 0.9, step=5, start_step=5)["w"], [0.1, 0.1])
    assert ema_decay_per_step(0.5, 2) == pytest.approx(0.5 ** 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema_update(ema, new, 1.0)


# -- mixup and cutmix --------------------------------------------------------------------------------------
def _batch(n=6, side=8):
    """n images of n classes, example i of class i, targets smoothed by 0.1."""
    images = jnp.asarray(np.random.default_rng(0).standard_normal((n, side, side, 3)), jnp.float32)
    return images, optax.smooth_labels(jax.nn.one_hot(jnp.arange(n), n), 0.1)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_blends_images_and_targets_with_one_lambda_per_draw(mode):
    n = 6
    images, targets = _batch(n)
    mixed, mixed_targets = jax.jit(partial(augment.mix, mixup_alpha=0.4, mode=mode))(images, targets,
                                                                                    jax.random.key(1))
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)  # each target keeps its mass
    # lambda read back from each target's own class explains the images: x' = lam x + (1 - lam) x[::-1]
    off, on = 0.1 / n, 0.9 + 0.1 / n
    lam = (np.diagonal(np.asarray(mixed_targets)) - off) / (on - off)
    expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[::-1]
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    assert (len(set(np.round(lam, 5))) == 1) == (mode == "batch")


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_pastes_the_share_of_pixels_its_targets_say(mode):
    images, targets = _batch(8, side=16)
    mixed, mixed_targets = jax.jit(partial(augment.mix, cutmix_alpha=1.0, mode=mode))(images, targets,
                                                                                     jax.random.key(3))
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    from_partner = np.asarray((mixed == images[::-1]).all(-1) & (mixed != images).any(-1))
    kept = np.asarray((mixed == images).all(-1))
    assert (from_partner | kept).all()  # every pixel is one of the two images', none blended
    share = from_partner.mean(axis=(1, 2))
    targets, mixed_targets = np.asarray(targets), np.asarray(mixed_targets)
    np.testing.assert_allclose(mixed_targets, (1 - share[:, None]) * targets + share[:, None] * targets[::-1],
                               atol=1e-6)
    assert share.max() > 0


def test_mixing_probability_and_switch():
    images, targets = _batch()
    unmixed = jax.jit(partial(augment.mix, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0))(images, targets,
                                                                                          jax.random.key(0))
    np.testing.assert_array_equal(unmixed[0], images)
    np.testing.assert_array_equal(unmixed[1], targets)
    keys = jax.random.split(jax.random.key(5), 400)
    lam, cut = jax.jit(jax.vmap(lambda k: augment.mix_params(k, 1.0, 1.0, prob=0.5, switch_prob=0.25)))(keys)
    assert 0.4 < float((lam < 1).mean()) < 0.6  # half the draws mix at all
    assert 0.17 < float(cut.mean()) < 0.33  # a quarter of them choose cutmix
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        augment.mix(images, targets, jax.random.key(0))


# -- TrivialAugment Wide and RandAugment ---------------------------------------------------------------------
def test_augmentation_is_a_function_of_its_key():
    image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3)), jnp.uint8)
    keys = jax.random.split(jax.random.key(0), 16)
    for policy in (autoaugment.trivial_augment_wide, partial(autoaugment.rand_augment, num_ops=1, magnitude=9)):
        augmented = jax.jit(jax.vmap(lambda k: policy(image, k)))
        first, again = np.asarray(augmented(keys)), np.asarray(augmented(keys))
        np.testing.assert_array_equal(first, again)
        assert first.dtype == np.uint8 and first.shape == (16, 12, 12, 3)
        assert len({row.tobytes() for row in first}) > 8  # different keys, different images


def test_magnitudes_are_torchvisions():
    from reference import torchvision_or_skip

    torch, _ = torchvision_or_skip()
    from torchvision.transforms import autoaugment as tv

    for policy, theirs in (("trivial_augment_wide", tv.TrivialAugmentWide()._augmentation_space(31)),
                           ("rand_augment", tv.RandAugment()._augmentation_space(31, (20, 24)))):
        assert tuple(theirs) == autoaugment.OPS
        table = autoaugment.magnitude_table(policy, 31, (20, 24))
        for index, (name, (magnitudes, signed)) in enumerate(theirs.items()):
            assert signed == (name in autoaugment.SIGNED), name
            expected = magnitudes.numpy() if magnitudes.ndim else np.zeros(31)
            np.testing.assert_allclose(table[index], expected, rtol=1e-6, err_msg=name)


def test_operations_are_torchvisions():
    """Every operation at several signed magnitudes on grey and colour images, against torchvision's own
    tensor implementation: equal, but for one grey level where XLA fuses a blend's multiply and add."""
    from reference import torchvision_or_skip

    torch, _ = torchvision_or_skip()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    apply = jax.jit(autoaugment.apply_op)
    table = autoaugment.magnitude_table("trivial_augment_wide")
    rng = np.random.default_rng(0)
    for channels in (3, 1):
        image = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
        image[:, :3] = 70  # a flat region, where a blend must give the grey level back
        tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        for op, name in enumerate(autoaugment.OPS):
            magnitudes = [float(table[op, b]) for b in (3, 17, 30)] or [0.0]
            if name in autoaugment.SIGNED:
                magnitudes += [-m for m in magnitudes]
            for magnitude in magnitudes:
                theirs = _apply_op(tensor, name, magnitude, InterpolationMode.NEAREST, None).permute(1, 2, 0).numpy()
                ours = np.asarray(apply(jnp.asarray(image), op, magnitude))
                difference = np.abs(theirs.astype(int) - ours.astype(int))
                assert difference.max() <= (1 if name in ("Color", "Sharpness") else 0), (name, magnitude, channels)


def test_preprocess_applies_the_policy_and_erasing_to_training_images_only():
    from train import step as steps

    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
    keys = jax.random.split(jax.random.key(0), 4)
    plain = steps.Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, size=8, augment=False)
    recipe = dataclasses.replace(plain, auto_augment="ta_wide", random_erase=1.0)
    np.testing.assert_array_equal(recipe(images, None, train=False), plain(images, None, train=False))
    augmented = jax.jit(partial(recipe, train=True))
    once, twice = augmented(images, keys), augmented(images, keys)
    np.testing.assert_array_equal(once, twice)
    assert not np.array_equal(once, jax.jit(partial(plain, train=True))(images, keys))


# -- random erasing ------------------------------------------------------------------------------------------
def test_random_erasing_erases_one_rectangle_of_the_stated_size_or_nothing():
    image = jnp.ones((20, 30, 3))
    keys = jax.random.split(jax.random.key(0), 200)
    out = np.asarray(jax.jit(jax.vmap(lambda k: augment.random_erasing(image, k, p=0.5)))(keys))
    erased = (out == 0).all(-1)
    fraction = erased.mean(axis=(1, 2))
    assert 0.35 < (fraction > 0).mean() < 0.65  # with probability p
    assert fraction.max() <= 0.33 + 1 / 20
    for mask in erased[fraction > 0][:20]:  # a rectangle: its rows and columns span exactly its area
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    np.testing.assert_array_equal(augment.random_erasing(image, keys[0], p=0.0), image)


# -- weight decay ------------------------------------------------------------------------------------------
def test_weight_decay_leaves_biases_and_batch_norm_alone_unless_asked():
    from train.optim import make_optimizer

    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
              "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    assert decay_mask(params) == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                                  "fc": {"kernel": True, "bias": False}}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for everything in (False, True):
        config = Config(lr=0.1, momentum=0.0, weight_decay=0.5, schedule="constant", warmup_epochs=0,
                        decay_norm_and_bias=everything)
        tx, _ = make_optimizer(config, steps_per_epoch=1)
        updates, _ = tx.update(zero, tx.init(params), params)  # no gradient: the update is the decay alone
        assert float(updates["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.05)
        assert float(updates["bn"]["scale"][0]) == pytest.approx(-0.05 if everything else 0.0)
        assert float(updates["fc"]["bias"][0]) == pytest.approx(-0.05 if everything else 0.0)


# -- stochastic depth --------------------------------------------------------------------------------------
def test_drop_path_rates_grow_linearly_from_zero():
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert drop_path_rates(0.3, 1) == [0.0]


def test_stochastic_depth_is_the_identity_in_expectation():
    """A block whose shortcut keeps the sum positive (so the final ReLU is the identity): each example's
    output is the shortcut alone, with probability p, or the shortcut plus its eval-mode branch scaled by
    1 / (1 - p); so its expectation is the eval-mode output."""
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(nn.BatchNorm, use_running_average=True)
    x = 50.0 + jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 8)), jnp.float32)

    def block(train):
        drop = partial(nn.Dropout, 0.3, broadcast_dims=(1, 2, 3), deterministic=not train)
        return BasicBlock(8, conv, norm, drop_path=drop)

    variables = block(False).init(jax.random.key(0), x)
    # Smaller kernels: a branch of order 1 beside a shortcut of 50.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 0.2 if "kernel" in str(path[-1]) else v, variables)
    expected = np.asarray(block(False).apply(variables, x))
    draws = np.asarray(jax.jit(jax.vmap(lambda k: block(True).apply(variables, x, rngs={"dropout": k})))(
        jax.random.split(jax.random.key(1), 2000)))
    skipped = (draws == np.asarray(x)).all(axis=(2, 3, 4))  # (draws, examples)
    assert 0.27 < skipped.mean() < 0.33  # whole examples skip the branch, with probability 0.3 (3 sigma)
    branch = expected - np.asarray(x)
    for example in range(2):  # the kept ones carry the eval-mode branch scaled by 1 / 0.7
        kept = draws[~skipped[:, example], example]
        np.testing.assert_allclose(kept - np.asarray(x[example]), np.broadcast_to(branch[example] / 0.7, kept.shape),
                                   atol=1e-4)
    # Hence the mean over draws is the shortcut plus (share kept / 0.7) times the branch, and with the share
    # at its expectation 0.7, the eval-mode output.
    share = 1 - skipped.mean(0)[:, None, None, None]
    np.testing.assert_allclose(draws.mean(0, dtype=np.float64), np.asarray(x) + share / 0.7 * branch, atol=1e-4)


def test_resnet_with_stochastic_depth_evaluates_as_without():
    images = jnp.ones((2, 4, 4, 3))
    plain = flaxnets.create_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1))
    dropped = flaxnets.create_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1), drop_path_rate=0.5)
    variables = jax.jit(partial(plain.init, train=False))(jax.random.key(0), images)

    def apply(model, train):
        return jax.jit(lambda k: model.apply(variables, images, train=train, mutable=["batch_stats"],
                                             rngs={"dropout": k})[0])

    np.testing.assert_array_equal(apply(dropped, False)(jax.random.key(1)), apply(plain, False)(jax.random.key(1)))
    trained = apply(dropped, True)  # in training the dropped blocks depend on the rng
    assert not np.allclose(trained(jax.random.key(1)), trained(jax.random.key(2)))
    with pytest.raises(ValueError, match="drop_path_rate"):
        flaxnets.create_model("resnet20", num_classes=10, drop_path_rate=1.0).init(jax.random.key(0), images, False)


# -- recipes as data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipes_load_and_validate(name):
    recipe = load_recipe(name)
    config = Config.from_recipe(name).validate()
    assert config.recipe == f"{recipe.name}@{recipe.version}" and recipe.name == name
    assert recipe.reference and recipe.expected_top1
    for key, value in recipe.settings.items():
        assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value), key


def test_flags_and_config_files_override_a_recipe(tmp_path):
    config = parse_args(["--recipe", "he2016_cifar10", "--arch", "resnet56", "--epochs", "3"])
    assert (config.arch, config.epochs, config.lr, config.lr_decay_epochs) == ("resnet56", 3, 0.1, (91, 137))
    assert config.recipe == "he2016_cifar10@1" and config.decay_norm_and_bias
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.05}))
    config = parse_args(["--recipe", "he2016_cifar10@1", "--config", str(tmp_path / "c.json"), "--epochs", "4"])
    assert (config.lr, config.epochs, config.weight_decay) == (0.05, 4, 1e-4)


def test_bad_recipes_are_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="neither a recipe"):
        parse_args(["--recipe", "no_such_recipe"])
    with pytest.raises(ConfigError, match="at version 1; version 7"):
        parse_args(["--recipe", "he2016_cifar10@7"])
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "version": 1, "reference": "r", "settings": {"lrr": 1}}))
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_args(["--recipe", str(path)])
    path.write_text(json.dumps({"name": "mine", "version": 1, "reference": "r", "settings": {"epochs": "many"}}))
    with pytest.raises(ConfigError, match="epochs must be a whole number"):
        parse_args(["--recipe", str(path)])
    for expected in ([1], None, {"lenet5": "high"}, {"lenet5": True}):
        path.write_text(json.dumps({"name": "mine", "version": 1, "reference": "r", "settings": {},
                                    "expected_top1": expected}))
        with pytest.raises(ConfigError, match="expected_top1 map architectures to accuracies"):
            parse_args(["--recipe", str(path)])


def test_a_config_file_naming_a_recipe_starts_from_it(tmp_path):
    """As ``--recipe NAME --config FILE``: the recipe's settings under the file's (a run's own config.json,
    which holds every setting, reads back as it was)."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"recipe": "he2016_cifar10", "epochs": 2}))
    config = parse_args(["--config", str(path)])
    assert (config.recipe, config.arch, config.lr, config.schedule, config.epochs) == (
        "he2016_cifar10", "resnet20", 0.1, "step", 2)
    saved = parse_args(["--recipe", "fashion_mnist_fast", "--lr", "0.3"])
    path.write_text(saved.to_json())
    assert parse_args(["--config", str(path)]) == saved
    path.write_text(json.dumps({"recipe": "no_such_recipe"}))
    with pytest.raises(ConfigError, match="neither a recipe"):
        parse_args(["--config", str(path)])


def test_the_report_puts_the_run_beside_the_expected_figure(tmp_path):
    config = parse_args(["--recipe", "he2016_cifar10", "--arch", "resnet32"])
    line = report_line(config.recipe, config.arch, 0.9301)
    assert "he2016_cifar10@1" in line and "93.01%" in line and "92.49%" in line and "+0.52 points" in line
    assert "no expected figure for resnet18" in report_line(config.recipe, "resnet18", 0.9)
    assert report_line(None, "resnet18", 0.9) is None
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "version": 2, "reference": "my notes", "settings": {"epochs": 1},
                                "expected_top1": {"lenet5_relu": 0.5}}))
    config = parse_args(["--recipe", str(path)])
    assert config.recipe == str(path) and "-10.00 points" in report_line(config.recipe, config.arch, 0.4)


def test_a_run_with_the_primitives_evaluates_checkpoints_and_reports(tmp_path, digits, monkeypatch, capsys):
    """LeNet-5 with BatchNorm on the digits for an epoch: the averaged weights are scored beside the trained
    ones and restored from the checkpoint (a resume restores the state whole), the recipe's figure is
    reported, ``python -m train.evaluate`` scores both sets as training did, the commands use the set the
    checkpoint was ranked by, and a resume without the average is refused before anything is touched. (The
    policies of autoaugment, whose programs take longest to compile, are checked in the step's preprocessing
    above.)"""
    from train import evaluate, loop
    from train.inference import load_checkpoint, load_variables
    from train.report import done_line, recipe_line
    from train.checkpoint import CheckpointError, Checkpoints
    from train.run import build_run

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "name": "tiny", "version": 1, "reference": "this test", "expected_top1": {"lenet5_bn": 0.5},
        "settings": {"arch": "lenet5_bn", "dataset": "digits", "batch_size": 64, "image_size": 12, "epochs": 1,
                     "warmup_epochs": 0.0, "val_split": "0.1", "ema_decay": 0.9, "random_erase": 0.5,
                     "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "plots": False}}))
    workdir = tmp_path / "run"
    config = parse_args(["--recipe", str(recipe), "--workdir", str(workdir)])
    results = loop.train_and_evaluate(config)
    assert {"ema_val_top1", "ema_test_top1", "best_test_top1", "best_weights"} <= set(results)
    assert "averaged weights" in done_line(config, results) and "its test top-1" in done_line(config, results)
    assert f"{results['best_test_top1']:.2%} against the 50.00% expected" in recipe_line(config, results)

    run = build_run(config, data=None)
    checkpoints = Checkpoints(str(workdir))
    try:
        state, _, _ = checkpoints.restore(run.init_state(pretrained=False))
    finally:
        checkpoints.close()
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.ema["params"]),
                                                         jax.tree_util.tree_leaves(state.params)))

    capsys.readouterr()
    assert evaluate.main(["--workdir", str(workdir)]) == 0
    scored = json.loads(capsys.readouterr().out)
    for key in ("val_top1", "test_top1", "ema_val_top1", "ema_test_top1", "ema_test_loss"):
        assert scored[key] == pytest.approx(results[key], abs=1e-6), key
    trained, averaged, chosen, _ = load_checkpoint(str(workdir), results["step"])
    assert scored["ranked_by"] == chosen == results["best_weights"]
    for name, expected in (("trained", trained), ("averaged", averaged),
                           ("chosen", averaged if chosen == "averaged" else trained)):
        variables, meta = load_variables(str(workdir), results["step"], name)
        assert meta["weights"] == (chosen if name == "chosen" else name)
        jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="moving average"):
        loop.train_and_evaluate(dataclasses.replace(config, epochs=3, ema_decay=0.0))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_evaluating_every_other_epoch_trains_the_same_and_scores_the_saved_and_last_epochs(tmp_path, digits):
    """--eval-every-epochs 2 over three epochs: epoch 1 is not scored, epoch 2 and the last (which saves the
    checkpoint) are, with the same figures as a run that scores every epoch, whose training it repeats."""
    from train import loop
    from train.workdir import read_records

    runs = {}
    for every in (1, 2):
        config = parse_args(["--arch", "lenet5_bn", "--dataset", "digits", "--batch-size", "64", "--image-size", "12",
                             "--epochs", "3", "--warmup-epochs", "0", "--val-split", "0.1", "--checkpoint-every-epochs",
                             "3", "--eval-every-epochs", str(every), "--no-plots", "--workdir",
                             str(tmp_path / f"{every}")])
        results = loop.train_and_evaluate(config, stream=io.StringIO())
        records = [record for _, record, _ in read_records(str(tmp_path / f"{every}" / "metrics.jsonl"))]
        runs[every] = results, {r["epoch"]: r for r in records}
    (every, each), (other, some) = runs[1], runs[2]
    assert sorted(some) == sorted(each) == [1, 2, 3]
    assert "test_top1" not in some[1] and "val_top1" not in some[1]
    for epoch in (1, 2, 3):
        assert some[epoch]["train_loss"] == each[epoch]["train_loss"]
    for epoch in (2, 3):
        for key in ("val_top1", "val_loss", "test_top1", "test_loss"):
            assert some[epoch][key] == each[epoch][key], (epoch, key)
    assert other["best_top1"] == every["best_top1"] and other["test_top1"] == every["test_top1"]
    from train.checkpoint import CheckpointError
    from train.inference import load_variables

    with pytest.raises(CheckpointError, match="holds no moving average of the weights"):
        load_variables(str(tmp_path / "1"), every["step"], "averaged")
    assert load_variables(str(tmp_path / "1"), every["step"])[1]["weights"] == "trained"


def test_flip_evaluation_reports_both_figures_and_the_chosen_checkpoints_one_view(tmp_path, monkeypatch, capsys):
    """--eval-flip on Fashion-MNIST-shaped files: every scored split has its one-view top-1 beside the
    flip-averaged one, the chosen checkpoint carries its one-view test top-1, the last line says it, and
    ``python -m train.evaluate --eval-flip`` scores the checkpoint alike."""
    from test_train_cli import write_idx_set
    from train import evaluate, loop
    from train.report import done_line
    from train.data import load
    from train.workdir import read_records

    write_idx_set(tmp_path / "files", train=48, test=24)
    # The files are digits in Fashion-MNIST's format, which its recorded checksums would refuse.
    monkeypatch.setattr(load, "load_idx", partial(load.load_idx, verify=False))
    config = parse_args(["--arch", "lenet5_bn", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "files"),
                         "--batch-size", "16", "--image-size", "12", "--epochs", "1", "--warmup-epochs", "0",
                         "--val-split", "0.25", "--ema-decay", "0.9", "--eval-flip", "--no-plots", "--workdir",
                         str(tmp_path / "run")])
    results = loop.train_and_evaluate(config, stream=io.StringIO())
    [record] = [record for _, record, _ in read_records(str(tmp_path / "run" / "metrics.jsonl"))]
    for prefix in ("", "ema_"):
        for split in ("val", "test"):
            assert 0 <= record[f"{prefix}{split}_top1_one_view"] <= 1
    chosen = "ema_" if results["best_weights"] == "averaged" else ""
    assert results["best_test_top1_one_view"] == record[f"{chosen}test_top1_one_view"]
    assert results["best_test_top1"] == record[f"{chosen}test_top1"]
    assert f"{results['best_test_top1_one_view']:.2%} with one view" in done_line(config, results)
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--eval-flip"]) == 0
    scored = json.loads(capsys.readouterr().out)
    for key in ("test_top1", "test_top1_one_view", "ema_val_top1_one_view"):
        assert scored[key] == pytest.approx(record[key], abs=1e-6), key
    # A run trained without it is scored with its mirror images too; its one-view figure is the run's own.
    plain = dataclasses.replace(config, eval_flip=False, ema_decay=0.0, workdir=str(tmp_path / "plain"))
    loop.train_and_evaluate(plain, stream=io.StringIO())
    [record] = [record for _, record, _ in read_records(str(tmp_path / "plain" / "metrics.jsonl"))]
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(tmp_path / "plain"), "--eval-flip"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test_top1_one_view"] == pytest.approx(record["test_top1"], abs=1e-6) and "test_top1" in scored
