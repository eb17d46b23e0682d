"""Multi-process training on gloo: 2 ranks with grad-accum 1 == 1 process with grad-accum 2 (also when
weighting by supervised tokens that the ranks hold unevenly); a NaN on one rank stops every rank
cleanly; the step records of a world of 2 are truthful."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


def make_batches(vocab: int, steps: int, micro: int, B: int = 2, T: int = 16, uneven: bool = False):
    """Random micro-batches; `uneven`: micro-batch i of step s supervises only its first few targets,
    a different number each time (none at all in one of them), the rest are -1."""
    g = torch.Generator().manual_seed(0)
    out = [[(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(micro)] for _ in range(steps)]
    if uneven:
        for s, step in enumerate(out):
            for i, (_, y) in enumerate(step):
                y.view(-1)[(3 * s + 11 * i + 5) % (B * T) if (s, i) != (1, 0) else 0:] = -1
    return out


def train_once(rank: int, world: int, port: int, home: str, out: str, weighting: str = "mean",
               recipe: str = "2025") -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    from picochat.model.gpt import ARCH_2026, GPTConfig, build_model
    from picochat.optim import MuonOptions, build_optimizers
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import init_distributed, seed_everything, shutdown_distributed
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import LoopConfig, Trainer

    world_info = init_distributed("cpu")
    seed_everything(1000 + rank)  # different seeds per rank: identical weights must come from the broadcast
    tok = Tokenizer.load(Path(home) / "tokenizer")
    modern = recipe == "2026"  # every architecture option and the 2026 Muon rule with cautious weight decay
    config = GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16,
                                  **(ARCH_2026 if modern else {}))
    model = build_model(config, torch.device("cpu"))
    broadcast_parameters(model)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out + ".init")
    muon = MuonOptions("polar_express", row_equilibration=True, renormalize=True, normuon_beta2=0.9,
                       cautious_weight_decay=True) if modern else None
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, muon_options=muon,
                            muon_weight_decay=0.2 if modern else None)
    batches = FixedBatches(make_batches(tok.vocab_size, STEPS, 2, uneven=weighting == "tokens"), rank, world)
    cfg = LoopConfig(stage="base", tag=f"w{world}", num_iterations=STEPS, grad_accum_steps=2 // world,
                     tokens_per_step=2 * 2 * 16, loss_weighting=weighting)
    Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0,
            momentum=lambda s: 0.9).run()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    shutdown_distributed()


@pytest.mark.parametrize(("weighting", "recipe"), [("mean", "2025"), ("tokens", "2025"), ("mean", "2026")])
def test_two_gloo_ranks_match_one_process_with_accumulation(tiny_home, weighting, recipe):
    """With "tokens", the ranks hold different numbers of supervised tokens each step (one micro-batch
    none): the step is still the mean over the union of them, as one process computes it."""
    one, two = str(tiny_home / "one.pt"), str(tiny_home / "two.pt")
    for world, out in ((1, one), (2, two)):
        mp.start_processes(train_once, args=(world, free_port(), str(tiny_home), out, weighting, recipe), nprocs=world,
                           start_method="spawn")
    a, b, init = torch.load(one), torch.load(two), torch.load(one + ".init")
    assert a.keys() == b.keys()
    for k in a:
        if recipe == "2025":
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        else:
            # The 2026 model's scalars and value embeddings are AdamW-trained with gradients near zero in
            # places, where Adam turns last-bit differences between the runs' kernels into visible ones
            # (7e-4 of the update on an AVX2-only CPU, 0 on an AVX-512 one). A sync or sharding mistake
            # changes the update itself: the two updates must agree to 1%.
            update = (a[k] - init[k]).float().norm()
            assert (a[k] - b[k]).float().norm() <= 1e-2 * update + 1e-7, (k, float(update))
            if k.startswith("transformer.h."):  # the block matrices (Muon's) stay within 1e-6
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # Two ranks agree on the saved checkpoint too.
    assert (tiny_home / "checkpoints" / "base" / "w2" / f"step_{STEPS}" / "model.safetensors").exists()
    # The logged loss and supervised tokens are the whole step's, whatever the world size.
    logs = [[json.loads(line) for line in (tiny_home / "logs" / f"base-w{w}.jsonl").read_text().splitlines()]
            for w in (1, 2)]
    for r1, r2 in zip(*logs, strict=True):
        assert r1["supervised_tokens"] == r2["supervised_tokens"]
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    if weighting == "tokens":
        assert len({r["supervised_tokens"] for r in logs[0]}) > 1


def test_loss_weighting_is_checked():
    from picochat.errors import ConfigError
    from picochat.train.loop import LoopConfig

    with pytest.raises(ConfigError, match=r"^loss_weighting 'token' is unknown; choose one of mean, tokens$"):
        LoopConfig(stage="sft", tag="t", num_iterations=1, grad_accum_steps=1, tokens_per_step=1,
                   loss_weighting="token")


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


def run_two_ranks(fn, args: tuple, doing: str, timeout_s: float = 180) -> None:
    """fn(rank, 2, port, *args) on two spawned processes; fails the test if they have not ended in time."""
    ctx = mp.start_processes(fn, args=(2, free_port(), *args), nprocs=2, start_method="spawn", join=False)
    deadline = time.time() + timeout_s
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks hung {doing}")


def join_tiny_world(rank: int, world: int, port: int, home: str):
    """In a spawned rank: join the gloo world on 127.0.0.1 and build the shared tiny model (same seed on
    every rank, parameters broadcast); returns (world info, tokenizer, model)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import init_distributed, seed_everything
    from picochat.tokenizer import Tokenizer

    world_info = init_distributed("cpu")
    seed_everything(0)
    tok = Tokenizer.load(Path(home) / "tokenizer")
    model = build_model(GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16), "cpu")
    broadcast_parameters(model)
    return world_info, tok, model


def train_until_nan(rank: int, world: int, port: int, home: str, bad_rank: int, bad_step: int) -> None:
    """A run whose loss on `bad_rank` becomes NaN at `bad_step` (injected here, not by any flag)."""
    world_info, tok, model = join_tiny_world(rank, world, port, home)
    from picochat.optim import build_optimizers
    from picochat.runtime import shutdown_distributed
    from picochat.train.loop import LoopConfig, NonFiniteLossError, Trainer

    calls = []

    def poisoned(x, y, **kw):  # one micro-batch per step at world 2
        loss = model(x, y, **kw)
        calls.append(1)
        return loss * float("nan") if rank == bad_rank and len(calls) == bad_step + 1 else loss

    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(make_batches(tok.vocab_size, STEPS, 2), rank, world)
    cfg = LoopConfig(stage="base", tag="nan", num_iterations=STEPS, grad_accum_steps=1, tokens_per_step=2 * 2 * 16)
    trainer = Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0,
                      momentum=lambda s: 0.9, train_model=poisoned)
    try:
        trainer.run()
        outcome = {"error": None}
    except NonFiniteLossError as e:
        outcome = {"error": str(e), "all_ranks": e.all_ranks}
    outcome["finite_weights"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    (Path(home) / f"outcome{rank}.json").write_text(json.dumps(outcome))
    shutdown_distributed()


def test_nan_on_one_rank_stops_every_rank_with_one_checkpoint(tiny_home):
    """No hang: both ranks agree on the NaN, skip the update, save once together and raise the same error.

    Also checks the step records of a world of 2: MFU is against 2 x the device peak, tok/s counts both ranks.
    """
    peak = 1e11  # a known CPU peak, so MFU can be checked exactly
    (tiny_home / "cpu_peak.json").write_text(json.dumps({f"torch.float32-threads{n}-v2": peak for n in (1, 2)}))
    run_two_ranks(train_until_nan, (str(tiny_home), 1, 3), "after a NaN on one of them")
    outcomes = [json.loads((tiny_home / f"outcome{r}.json").read_text()) for r in (0, 1)]
    for o in outcomes:
        assert o["error"] and "not finite" in o["error"] and "1 of 2" in o["error"] and "--resume" in o["error"]
        assert o["all_ranks"] and o["finite_weights"]  # the NaN update was never applied
    assert outcomes[0]["error"] == outcomes[1]["error"]
    run = tiny_home / "checkpoints" / "base" / "nan"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_3"]
    flops_per_token = _flops_per_token(tiny_home)
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-nan.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["tokens"] == 2 * 2 * 16  # both ranks' tokens
        assert r["mfu"] == pytest.approx(100 * r["tok_per_s"] * flops_per_token / (2 * peak), rel=1e-9)
        assert r["peak_mem_bytes"] > 0


def _flops_per_token(home: Path) -> int:
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.load(home / "tokenizer")
    return build_model(GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16),
                       "cpu").flops_per_token()


def train_with_a_heavy_rank(rank: int, world: int, port: int, home: str) -> None:
    """A short run in which rank 1's peak memory reads 512 MiB above rank 0's. The readings are set
    here: a process's peak RSS starts at its parent's (a test process that has run many tests), which
    hides a real ballast."""
    world_info, tok, model = join_tiny_world(rank, world, port, home)
    from picochat.optim import build_optimizers
    from picochat.runtime import shutdown_distributed
    from picochat.train import loop
    from picochat.train.loop import LoopConfig, Trainer

    loop.peak_memory_bytes = lambda device: (256 + 512 * rank) * 2**20
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(make_batches(tok.vocab_size, 3, 2), rank, world)
    cfg = LoopConfig(stage="base", tag="mem", num_iterations=3, grad_accum_steps=1, tokens_per_step=2 * 2 * 16)
    Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0, momentum=lambda s: 0.9).run()
    shutdown_distributed()


def test_peak_memory_is_the_largest_of_any_rank(tiny_home):
    """The step line's and the records' peak memory is the largest rank's: it was rank 0's own, which hid
    a rank 1 reading 512 MiB more."""
    run_two_ranks(train_with_a_heavy_rank, (str(tiny_home),), "while sharing their peak memory")
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-mem.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["peak_mem_bytes"] == 768 * 2**20 for r in steps), steps  # rank 1's, not rank 0's 256 MiB


def train_compiled_with_a_narrow_batch(rank: int, world: int, port: int, home: str) -> None:
    """A compiled run in which only rank 1's step 5 has narrower rows: only rank 1 traces a new graph then."""
    world_info, tok, model = join_tiny_world(rank, world, port, home)
    from picochat.optim import build_optimizers
    from picochat.runtime import shutdown_distributed
    from picochat.train.loop import LoopConfig, Trainer

    steps = make_batches(tok.vocab_size, 6, 2)
    if rank == 1:  # micro-batch 1 of step 4 (the fifth) is rank 1's: its rows are 8 wide
        steps[4][1] = tuple(t[:, :8].contiguous() for t in steps[4][1])
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    cfg = LoopConfig(stage="base", tag="graphs", num_iterations=6, grad_accum_steps=1, tokens_per_step=0)
    trainer = Trainer(model, opts, FixedBatches(steps, rank, world), cfg, world_info, tok,
                      lr_multiplier=lambda s, n: 1.0, momentum=lambda s: 0.9,
                      train_model=torch.compile(model, backend="eager", dynamic=False))
    trainer.run()
    (Path(home) / f"graphs{rank}.json").write_text(json.dumps({"train_time": trainer.train_time}))
    shutdown_distributed()


def test_a_step_in_which_one_rank_compiles_is_untimed_on_every_rank(tiny_home):
    """Whether a step compiled is agreed: rank 1 alone traced a graph in step 5, which every rank's step
    waited for, so no rank times it (and the ranks' train times, which a time budget reads, agree)."""
    run_two_ranks(train_compiled_with_a_narrow_batch, (str(tiny_home),), "after one of them compiled")
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-graphs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and not r["timed"]] == [1, 2, 3, 5]
    times = [json.loads((tiny_home / f"graphs{r}.json").read_text())["train_time"] for r in (0, 1)]
    assert times[0] == pytest.approx(sum(r["dt"] for r in records if r.get("timed")))
    assert 0 < times[1] < sum(r["dt"] for r in records if "loss" in r)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(tiny_home, capsys):
    """The data restarts at the earliest position any old rank had reached, the optimiser state is
    gathered from the shards, and the run finishes its horizon."""
    from picochat import checkpoint as ckpt
    from picochat.cli import main

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PICOCHAT_HOME": str(tiny_home), "OMP_NUM_THREADS": "1"}
    args = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "8", "--save-every", "4",
            "--sample-every", "-1", "--eval-every", "-1", "--tag", "grow"]
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "picochat", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = ckpt.run_dir("base", "grow")
    shutil.rmtree(run / "step_8")
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming 2 processes' checkpoint on 1" in out
    meta = json.loads((run / "step_8" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 8


def train_on_budget(rank: int, world: int, port: int, home: str) -> None:
    """A time-budgeted run whose ranks read clocks at different speeds (rank 1's steps look twice as long)."""
    import itertools
    from types import SimpleNamespace

    from picochat.optim import build_optimizers
    from picochat.runtime import shutdown_distributed
    from picochat.train import loop

    clock = itertools.count(0.0, 0.25 * (rank + 1))
    loop.time = SimpleNamespace(time=lambda: next(clock))
    world_info, tok, model = join_tiny_world(rank, world, port, home)
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(make_batches(tok.vocab_size, 200, 2), rank, world)
    # The measurement ends once 10% of the budget is spent in timed steps: rank 1's clock gets there
    # steps before rank 0's.
    cfg = loop.LoopConfig(stage="base", tag="budget", num_iterations=0, grad_accum_steps=1, tokens_per_step=2 * 2 * 16,
                     time_budget_s=20.0, budget_measure_steps=2, budget_measure_fraction=0.1)
    trainer = loop.Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0,
                           momentum=lambda s: 0.9)
    result = trainer.run()
    (Path(home) / f"budget{rank}.json").write_text(json.dumps({"step": result["step"],
                                                               "horizon": trainer.num_iterations}))
    shutdown_distributed()


def test_a_time_budget_fixes_one_horizon_at_the_same_step_on_every_rank(tiny_home):
    """Fixing the horizon is a collective: decided per rank, the ranks whose clock crossed the threshold
    first entered it while the others were in the next step's all-reduce (a mismatch or a hang)."""
    run_two_ranks(train_on_budget, (str(tiny_home),), "while fixing the time budget's horizon")
    outcomes = [json.loads((tiny_home / f"budget{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    horizon = outcomes[0]["horizon"]
    assert outcomes[0]["step"] == horizon and 10 < horizon < 200
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-budget.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, horizon + 1))
    assert (tiny_home / "checkpoints" / "base" / "budget" / f"step_{horizon}").is_dir()
