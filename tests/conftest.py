"""Test set-up shared by every test file.

Eight host devices are requested before JAX starts, so the data-parallel tests see a mesh of 8; every
other test runs on the first device as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
