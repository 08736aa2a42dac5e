"""Test set-up shared by every test file.

Eight host devices are requested before JAX starts, so the data-parallel tests see a mesh of 8; every
other test runs on the first device as usual. Programs compile without XLA's slower optimisations
(tests/compiling.py says why).
"""

import os
import pathlib

from compiling import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Start the backend now, with jaxlib's default CPU library: a command run in-process (the benchmarks'
# `run_cli`, `python -m train`'s main) then cannot switch this worker to Eigen halfway through the suite
# (`flaxnets.cpu.prefer_eigen` leaves a started backend alone). tests/test_cpu.py covers both libraries.
jax.devices()
# For the commands the tests start (JAX read its variables above, so this worker keeps JAX's default):
# every program goes into the compilation cache, not only those that compiled for a second or more. Most
# runs repeat a few small configurations, whose programs each compile in well under a second.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _registry_as_it_was():
    """Each test ends with the registry it began with: a command run in-process with ``--arch FILE.py:FACTORY``
    registers the user's factory, which must not show up in a later test's `flaxnets.list_models()`."""
    from flaxnets import registry  # the package's import registers every built-in architecture first

    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """Where this session's runs keep compiled programs (``$JAX_COMPILATION_CACHE_DIR``, which the trainer
    and the commands it starts read): a folder of pytest's, one for each worker, so that no test reads or
    fills the cache of whoever runs the suite (the trainer's default is ``~/.cache/flaxnets/xla``). The runs
    of one configuration compile once; a test that wants no cache sets the variable to ``""``."""
    folder = tmp_path_factory.mktemp("xla_cache")
    before = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = before


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


# The files whose module- and session-scoped fixtures train runs: under `pytest -n`, each runs on one worker,
# so that those runs are made once rather than once on each worker (with xdist's default "load" they were
# made twice: 40-90 s of the suite). xdist's own `--dist loadgroup` does not group under pytest 9.2 (it
# renames `item._nodeid`, which pytest no longer reads), hence this scheduler.
ONE_WORKER_FILES = ("test_train_cli.py", "test_plots.py", "test_reliability.py")
# test_models.py builds one architecture's variables and compiled applies once (a module-scoped fixture and
# caches) for every test of it: the tests of one architecture go to one worker, or each worker builds them.
ONE_WORKER_PER_ARCHITECTURE = ("test_models.py",)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: a hook of pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    """xdist's "load" with the tests of each `ONE_WORKER_FILES` file as one unit of work, and those of each
    architecture in `ONE_WORKER_PER_ARCHITECTURE` files as another. Units are handed
    out largest first (``--loadscope-reorder``, xdist's default), so these long files start first and the
    single tests fill in around them."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixturesOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path.rsplit("/", 1)[-1] in ONE_WORKER_FILES:
                return path
            if path.rsplit("/", 1)[-1] in ONE_WORKER_PER_ARCHITECTURE and nodeid.endswith("]"):
                return f"{path}[{nodeid.rsplit('[', 1)[1]}"
            return nodeid

    return SharedFixturesOnOneWorker(config, log)
