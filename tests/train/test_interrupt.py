"""Ctrl-C during training: the step in flight finishes, a checkpoint is saved, the run resumes from it
(base-train, and RL, which runs on the same Trainer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from picochat import checkpoint as ckpt
from tests.infer.tiny import save_tiny_checkpoint

ARGS = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "100000",
        "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1", "--tag", "ctrlc"]
RL_ARGS = ["rl", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-steps", "100000", "--eval-problems", "0",
           "--save-every", "-1", "--tag", "ctrlc"]


def logged_steps(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]


def interrupt_and_resume(home: Path, args: list[str], stage: str, steps_flag: str) -> None:
    """Ctrl-C once 3 steps are logged: exit 0 with the step reached saved; --resume then runs 2 more."""
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    log = home / "logs" / f"{stage}-ctrlc.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(logged_steps(log)) < 3:  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    steps = ckpt.list_steps(ckpt.run_dir(stage, "ctrlc"))
    assert len(steps) == 1 and steps[0] == max(logged_steps(log)) < 100000  # the step it reached
    assert '"stopped": true' in out

    # --resume continues from that step, here for two more
    cut = args.index(steps_flag)
    more = [*args[:cut], steps_flag, str(steps[0] + 2), *args[cut + 2:]]
    done = subprocess.run([sys.executable, "-m", "picochat", *more, "--resume"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ckpt.list_steps(ckpt.run_dir(stage, "ctrlc"))[-1] == steps[0] + 2


def test_ctrl_c_saves_the_step_reached_and_the_run_resumes_from_it(tiny_home):
    interrupt_and_resume(tiny_home, ARGS, "base", "--num-iterations")


def test_ctrl_c_during_rl_saves_and_resumes(picochat_home):
    save_tiny_checkpoint("sft", "tiny", sequence_len=160)
    interrupt_and_resume(picochat_home, RL_ARGS, "rl", "--num-steps")
