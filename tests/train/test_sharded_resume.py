"""The training loop with sharded optimiser state: 2 gloo ranks save, resume bit-identically, and
their checkpoint holds the full (unsharded) optimiser state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.train.test_distributed import FixedBatches, free_port, make_batches

STEPS, MICRO, WORLD = 4, 4, 2


def train(rank: int, port: int, home: str, tag: str, resume_from: str | None, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.optim import build_optimizers
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import init_distributed, seed_everything, shutdown_distributed
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import LoopConfig, Trainer

    world = init_distributed("cpu")
    seed_everything(7 + rank)
    tok = Tokenizer.load(Path(home) / "tokenizer")
    model = build_model(GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16),
                        torch.device("cpu"))
    broadcast_parameters(model)
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, world=world)
    batches = FixedBatches(make_batches(tok.vocab_size, STEPS, MICRO), rank, WORLD)
    cfg = LoopConfig(stage="base", tag=tag, num_iterations=STEPS, grad_accum_steps=MICRO // WORLD,
                     tokens_per_step=MICRO * 2 * 16, save_every=2, grad_clip=1.0)
    trainer = Trainer(model, optimizers, batches, cfg, world, tok, lr_multiplier=lambda s, n: 1.0,
                      momentum=lambda s: 0.9)
    if resume_from:
        trainer.resume(Path(resume_from))
    trainer.run()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    shutdown_distributed()


def test_two_sharded_ranks_resume_bit_identically(tiny_home):
    straight, resumed = str(tiny_home / "straight.pt"), str(tiny_home / "resumed.pt")
    mp.start_processes(train, args=(free_port(), str(tiny_home), "a", None, straight), nprocs=WORLD,
                       start_method="spawn")
    runs = tiny_home / "checkpoints" / "base"
    shutil.copytree(runs / "a" / "step_2", runs / "b" / "step_2")
    mp.start_processes(train, args=(free_port(), str(tiny_home), "b", str(runs / "b" / "step_2"), resumed),
                       nprocs=WORLD, start_method="spawn")
    a, b = torch.load(straight), torch.load(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # The checkpoint holds every parameter's optimiser state at full shape, as an unsharded run's.
    state = torch.load(runs / "a" / "step_2" / "state.pt", weights_only=False)
    adamw, muon = state["optimizers"]
    weights = torch.load(straight)
    assert sorted(adamw["state"]) == [0, 1] and adamw["state"][0]["exp_avg"].shape == weights["lm_head.weight"].shape
    n_matrices = sum(1 for k, v in weights.items() if k.startswith("transformer.h.") and v.ndim == 2)
    assert sorted(muon["state"]) == list(range(n_matrices))
