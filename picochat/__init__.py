"""picochat: build your own ChatGPT-style model from nothing, in Python."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other processes the
# default spinning steals the cores the working threads need: a d4 training step on 2 busy
# cores ran 1.5x slower with it (bench/train.py). Read when torch loads, so it is set here,
# before any picochat module imports torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ...after a short spin: GNU OpenMP's threads first spin this many rounds (~0.4 ms here) before
# sleeping, so the back-to-back small ops of a decode step find them awake (decode at batch 1 /
# 8 ran 1.13x / 1.07x faster than with no spin; training steps were unchanged within noise).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
