"""picochat: build your own ChatGPT-style model from nothing, in Python."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other processes the
# default spinning steals the cores the working threads need: a d4 training step on 2 busy
# cores ran 1.5x slower with it (bench/train.py). Read when torch loads, so it is set here,
# before any picochat module imports torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
