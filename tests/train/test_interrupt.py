"""Ctrl-C during training: the step in flight finishes, a checkpoint is saved, the run resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from picochat import checkpoint as ckpt

ARGS = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "100000",
        "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1", "--tag", "ctrlc"]


def logged_steps(home: Path) -> list[int]:
    log = home / "logs" / "base-ctrlc.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]


def test_ctrl_c_saves_the_step_reached_and_the_run_resumes_from_it(tiny_home):
    env = {**os.environ, "PICOCHAT_HOME": str(tiny_home)}
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *ARGS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(logged_steps(tiny_home)) < 3:  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    steps = ckpt.list_steps(ckpt.run_dir("base", "ctrlc"))
    assert len(steps) == 1 and steps[0] == max(logged_steps(tiny_home)) < 100000  # the step it reached
    assert '"stopped": true' in out

    # --resume continues from that step, here for two more
    cut = ARGS.index("--num-iterations")
    more = [*ARGS[:cut], "--num-iterations", str(steps[0] + 2), *ARGS[cut + 2:]]
    done = subprocess.run([sys.executable, "-m", "picochat", *more, "--resume"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ckpt.list_steps(ckpt.run_dir("base", "ctrlc"))[-1] == steps[0] + 2
