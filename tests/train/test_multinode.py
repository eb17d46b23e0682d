"""Two fake nodes on 127.0.0.1: `torchrun --nnodes 2` twice (gloo, 2 processes each).

They train, save and resume cpu-tiny together from a shared $PICOCHAT_HOME; with two
different homes they stop at once with the shared-home error instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from picochat import checkpoint as ckpt
from tests.train.test_distributed import free_port

ARGS = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1",
        "--num-iterations", "6", "--save-every", "3", "--keep-last", "5", "--tag", "nodes", "--total-batch-size", "1024"]


def two_nodes(homes: tuple[Path, Path], extra: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 as two torchrun invocations; wait for both (bounded)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    port = free_port()
    procs = []
    for rank, home in enumerate(homes):
        env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
        cmd = [torchrun, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "picochat", *ARGS, *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail("the two nodes did not finish in time (hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
def test_two_nodes_train_save_and_resume(tiny_home):
    first = two_nodes((tiny_home, tiny_home), [])
    assert all(r.returncode == 0 for r in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert "world 4" in first[0].stdout
    run = ckpt.run_dir("base", "nodes")
    assert ckpt.list_steps(run) == [3, 6]
    shutil.rmtree(run / "step_6")
    second = two_nodes((tiny_home, tiny_home), ["--resume"])
    assert all(r.returncode == 0 for r in second), second[0].stderr[-3000:] + second[1].stderr[-3000:]
    assert "step_3" in second[0].stdout and "resumed from" in second[0].stdout
    assert ckpt.list_steps(run) == [3, 6]


def test_two_nodes_with_different_homes_fail_fast(tiny_home, tmp_path):
    other = tmp_path / "node1-home"
    shutil.copytree(tiny_home, other)  # the same files, but not the same filesystem
    results = two_nodes((tiny_home, other), [], timeout=120)
    assert all(r.returncode != 0 for r in results)
    for r in results:  # one clear line per node
        assert r.stderr.count("do not see the file rank 0 wrote") == 1, r.stderr[-3000:]
    assert not ckpt.list_steps(ckpt.run_dir("base", "nodes"))
