"""``python -m benchmarks.gpu``: one step of the GPU run (see `benchmarks.gpu.runner`)."""

import sys

from benchmarks.gpu.runner import main

sys.exit(main())
