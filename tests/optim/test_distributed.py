"""broadcast_parameters / sync_gradients across 2 real gloo processes on 127.0.0.1."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat.model import GPTConfig, build_model
from picochat.optim import broadcast_parameters, sync_gradients
from picochat.runtime import shutdown_distributed

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=8)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_gradient(rank: int, index: int, p: torch.Tensor) -> torch.Tensor:
    return torch.full_like(p, float(rank + 1) * (index + 1))


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # deliberately different weights on each rank
        model = build_model(CONFIG, "cpu")
        broadcast_parameters(model)
        for i, p in enumerate(model.parameters()):
            # rank 1 has no gradient for the lm_head: it must count as zero
            if not (rank == 1 and p is model.lm_head.weight):
                p.grad = rank_gradient(rank, i, p)
        # tiny buckets, so several all-reduces are in flight at once
        sync_gradients(model, bucket_bytes=4096)
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()},
                    "grads": {n: p.grad for n, p in model.named_parameters()}}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


def test_two_gloo_ranks_share_weights_and_average_gradients(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(100)
    rank0_init = build_model(CONFIG, "cpu").state_dict()
    for i, (name, p) in enumerate(build_model(CONFIG, "cpu").named_parameters()):
        assert torch.equal(r0["params"][name], rank0_init[name]), name
        assert torch.equal(r1["params"][name], rank0_init[name]), name
        if name == "lm_head.weight":
            expected = rank_gradient(0, i, p) / 2
        else:
            expected = (rank_gradient(0, i, p) + rank_gradient(1, i, p)) / 2
        torch.testing.assert_close(r0["grads"][name], expected, msg=name)
        torch.testing.assert_close(r1["grads"][name], expected, msg=name)


def test_helpers_are_no_ops_in_a_world_of_one() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    broadcast_parameters(model)
    sync_gradients(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert model.transformer.wte.weight.grad is None
