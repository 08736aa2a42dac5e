"""Test set-up shared by every test file.

Eight host devices are requested before JAX starts, so the data-parallel tests see a mesh of 8; every
other test runs on the first device as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Start the backend now, with jaxlib's default CPU library: a command run in-process (the benchmarks'
# `run_cli`, `python -m train`'s main) then cannot switch this worker to Eigen halfway through the suite
# (`flaxnets.cpu.prefer_eigen` leaves a started backend alone). tests/test_cpu.py covers both libraries.
jax.devices()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """The bundled 8x8 digits, as the trainer loads them."""
    from train.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def reference_step():
    """``run -> step``: a run's train step on one device over the whole global batch, no device axis anywhere:
    what every data-parallel step must equal."""
    def make(run):
        import flaxnets
        from train import step as steps

        model = flaxnets.create_model(run.config.arch, num_classes=run.data.num_classes, bn_axis_name=None)
        step = steps.bind(steps.train_step, model=model, tx=run.tx, preprocess=run.preprocess,
                          num_classes=run.data.num_classes, axis_name=None)
        return jax.jit(lambda state, batch: step(state, batch))
    return make
