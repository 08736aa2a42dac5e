"""The flaxnets trainer: ``python -m train --arch ARCH --dataset NAME``. See `train.loop.train_and_evaluate`."""

from absl import logging as _absl_logging

# Orbax reports routine decisions (read-only managers, kept checkpoints) as absl warnings; the trainer
# prints what a user needs itself.
_absl_logging.set_verbosity(_absl_logging.ERROR)
