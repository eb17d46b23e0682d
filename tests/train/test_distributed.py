"""Multi-process training: 2 gloo ranks with grad-accum 1 == 1 process with grad-accum 2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FixedBatches:
    """Micro-batch i of step s is batches[s][i]; rank r of w takes micro-batches r, r+w, ..."""

    def __init__(self, batches, rank: int, world: int):
        self.stream = [mb for step in batches for mb in step[rank::world]]
        self.pos = 0

    def __next__(self):
        out = self.stream[self.pos]
        self.pos += 1
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make_batches(vocab: int, steps: int, micro: int, B: int = 2, T: int = 16):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
             for _ in range(micro)] for _ in range(steps)]


def train_once(rank: int, world: int, port: int, home: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.optim import build_optimizers
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import init_distributed, seed_everything, shutdown_distributed
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import LoopConfig, Trainer

    world_info = init_distributed("cpu")
    seed_everything(1000 + rank)  # different seeds per rank: identical weights must come from the broadcast
    tok = Tokenizer.load(Path(home) / "tokenizer")
    config = GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16)
    model = build_model(config, torch.device("cpu"))
    broadcast_parameters(model)
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(make_batches(tok.vocab_size, STEPS, 2), rank, world)
    cfg = LoopConfig(stage="base", tag=f"w{world}", num_iterations=STEPS, grad_accum_steps=2 // world,
                     tokens_per_step=2 * 2 * 16)
    Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0,
            momentum=lambda s: 0.9).run()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    shutdown_distributed()


def test_two_gloo_ranks_match_one_process_with_accumulation(tiny_home):
    one, two = str(tiny_home / "one.pt"), str(tiny_home / "two.pt")
    mp.start_processes(train_once, args=(1, free_port(), str(tiny_home), one), nprocs=1, start_method="spawn")
    mp.start_processes(train_once, args=(2, free_port(), str(tiny_home), two), nprocs=2, start_method="spawn")
    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0), k
    # Two ranks agree on the saved checkpoint too.
    assert (tiny_home / "checkpoints" / "base" / "w2" / f"step_{STEPS}" / "model.safetensors").exists()


@pytest.mark.slow
def test_torchrun_two_processes_base_train(tiny_home):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PICOCHAT_HOME": str(tiny_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "picochat", "base-train", "--preset", "cpu-tiny",
         "--num-iterations", "6", "--sample-every", "-1", "--tag", "tr"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 2" in proc.stdout
    assert (tiny_home / "checkpoints" / "base" / "tr" / "step_6" / "meta.json").exists()
