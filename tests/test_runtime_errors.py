"""runtime: a bad --device or $PICOCHAT_HOME is a one-line error naming the flag or variable; CPU ranks share the cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from picochat.cli import main
from picochat.errors import ConfigError
from picochat.runtime import home, pick_device, pick_training_dtype


def test_a_bogus_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--device 'bogus' is not a device; use auto, cpu"):
        pick_device("bogus")


@pytest.mark.parametrize("where", ["file", "/proc/picochat-home"])
def test_picochat_home_must_be_a_writable_directory(tmp_path: Path, monkeypatch, capsys, where: str):
    path = tmp_path / "a-file" if where == "file" else Path(where)
    if where == "file":
        path.write_text("x")
    monkeypatch.setenv("PICOCHAT_HOME", str(path))
    with pytest.raises(ConfigError, match=rf"PICOCHAT_HOME={path} is not a writable directory"):
        home()
    assert main(["report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: PICOCHAT_HOME={path}") and "\n" not in err


@pytest.mark.parametrize("command", ["base-train", "mid-train", "sft"])
def test_training_refuses_fp16_from_the_flag_and_from_the_environment(picochat_home, monkeypatch, capsys, command):
    """fp16 gradients need loss scaling, which the training loop does not do: refused in one line
    before anything trains, whether --dtype or $PICOCHAT_DTYPE asked for it."""
    assert main([command, "--preset", "cpu-tiny", "--device", "cpu", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --dtype fp16: training in fp16 needs loss scaling, which picochat does not do; "
                   "use bf16 (CUDA sm80+, CPUs with fast bf16) or fp32")
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp16")
    assert main([command, "--preset", "cpu-tiny", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: $PICOCHAT_DTYPE fp16: training in fp16")
    assert pick_training_dtype(torch.device("cpu"), "bf16") == torch.bfloat16  # inference keeps fp16 (pick_dtype)


@pytest.mark.parametrize("local, world, cores, expected", [
    ("2", 4, {0, 1, 2, 3, 4, 5, 6, 7}, 4),   # two machines of 2 ranks: the local ranks share the cores
    (None, 2, {0, 1, 2, 3}, 2),              # no LOCAL_WORLD_SIZE: every rank is on this machine
    ("4", 8, {0, 1}, 1),                     # never below one thread
    ("1", 2, {0, 3, 5}, 3),                  # the affinity mask, not the machine's core count
])
def test_cpu_threads_per_rank_shares_this_machines_usable_cores(monkeypatch, local, world, cores, expected):
    from picochat import runtime

    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: cores, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    assert runtime.cpu_threads_per_rank(world) == expected


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path):
    """`picochat plan | head -1`: the reader closes the pipe before the plan is printed; the command
    stops with the shell's exit code for SIGPIPE and writes no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PICOCHAT_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "plan", "--preset", "d20"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the command has imported torch, let alone printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
