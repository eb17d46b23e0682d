"""Sharded optimiser state (picochat.optim.sharded) across 2 and 4 real gloo processes on 127.0.0.1.

One step's global batch is MICRO micro-batches; rank r of w takes micro-batches r, r+w, ...
and accumulates them, so every world size trains on the same gradient. A single process with
the plain optimisers is the reference.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat.errors import ConfigError, DataError
from picochat.model import GPTConfig, build_model
from picochat.optim import Muon, MuonOptions, build_optimizers, sync_gradients
from picochat.optim.sharded import (
    SLICE_ALIGN,
    LocalGradients,
    ShardedGradients,
    assign_owners,
    shard_optimizers,
    slice_bounds,
)
from picochat.runtime import Dist, shutdown_distributed

# vocab 61, width 30: the embedding's and lm_head's 61*30 elements do not split evenly over 2 or 4 ranks
# (slices are aligned to SLICE_ALIGN elements: padded slices, in the updates and in the checkpoints).
CONFIG = GPTConfig(vocab_size=61, n_layer=2, n_head=3, n_kv_head=1, n_embd=30, sequence_len=8)
# The architecture options add AdamW groups of their own (one-element tensors: a slice on one rank,
# empty slices on the others; value embeddings) and small gate matrices to Muon.
OPTIONS_CONFIG = dataclasses.replace(CONFIG, n_layer=3, value_embeds=True, layer_lambdas=True, smear=True,
                                     backout=True)
MICRO = 4
STEPS = 3  # a checkpoint is taken after SAVE_AT steps, then one more step is compared
SAVE_AT = 2
# fp32 sums in another order (see test_sharded_updates_equal_the_unsharded_ones). Which elements move depends on
# the CPU's vector width (the embedding's backward sums rows in another order with AVX-512): at AdamW's lr ~1
# one element of 1,830 moved by 3e-6 there. Weights are ~1; a wrong slice or state moves them by ~lr.
ATOL, RTOL = 1e-5, 2e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randint(0, CONFIG.vocab_size, (2, 8), generator=g),
             torch.randint(0, CONFIG.vocab_size, (2, 8), generator=g)) for _ in range(MICRO)]


# Every optional Muon rule at once, with a decay large enough for the cautious mask to matter.
ALL_MUON_OPTIONS = MuonOptions(orthogonalizer="polar_express", row_equilibration=True, renormalize=True,
                               normuon_beta2=0.9, cautious_weight_decay=True)
# The model they train. Cautious decay is all or nothing per element: where an update entry is within
# rounding of 0, another summation order decays that weight by lr * wd more or less (at width 30 one weight
# of c_q does, after the resume); in this model none comes that close.
MUON_OPTIONS_CONFIG = dataclasses.replace(CONFIG, n_head=2, n_embd=32)


def fresh_run(rank: int, world: int, reduce_dtype: str = "fp32", muon_options: MuonOptions | None = None,
              config: GPTConfig = CONFIG):
    """The same initial model on every rank; Newton-Schulz in fp32 so the comparisons are tight."""
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                                  weight_decay=0.01, world=Dist(rank=rank, world_size=world),
                                  muon_options=muon_options, muon_weight_decay=0.5 if muon_options else None)
    optimizers[1].ns_dtype = torch.float32
    gradients, optimizers = shard_optimizers(model, optimizers, rank, world, reduce_dtype)
    return model, gradients, optimizers


def train_steps(model, gradients, optimizers, rank: int, world: int, steps: range, log: dict | None = None) -> None:
    for step in steps:
        mine = step_batches(step)[rank::world]
        for j, (x, y) in enumerate(mine):
            last = j == len(mine) - 1
            if last:
                gradients.arm()
            (model(x, y) * (world / MICRO)).backward()
            if log is not None and isinstance(gradients, ShardedGradients):
                log.setdefault("started", []).append((last, gradients.started))
        gradients.wait()
        norm = gradients.clip_grad_norm_(1e9)  # far above the norm: measures without clipping
        if log is not None:
            log.setdefault("norms", []).append(float(norm))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


class AllReducedGradients(LocalGradients):
    """The unsharded path: every rank all-reduces every gradient after the last backward."""

    def wait(self) -> None:
        sync_gradients(self.model)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def state_numel(optimizers) -> int:
    return sum(v.numel() for opt in optimizers for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.ndim > 0)


def resumed_params(checkpoint: Path, rank: int, world: int, muon_options: MuonOptions | None = None,
                   config: GPTConfig = CONFIG) -> dict:
    """Fresh model and optimisers loaded from `checkpoint`, trained from SAVE_AT to STEPS: the parameters."""
    saved = torch.load(checkpoint, weights_only=False)
    model, gradients, optimizers = fresh_run(rank, world, muon_options=muon_options, config=config)
    model.load_state_dict(saved["params"])
    for opt, state in zip(optimizers, saved["optimizers"]):
        opt.load_state_dict(state)
    train_steps(model, gradients, optimizers, rank, world, range(SAVE_AT, STEPS))
    if isinstance(gradients, ShardedGradients):
        gradients.remove_hooks()
    return params_of(model)


def worker(rank: int, world: int, port: int, out_dir: str, resume_from: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = Path(out_dir)
        record: dict = {}
        model, gradients, optimizers = fresh_run(rank, world)
        train_steps(model, gradients, optimizers, rank, world, range(SAVE_AT), record)
        checkpoint = {"params": params_of(model), "optimizers": [o.state_dict() for o in optimizers]}
        if rank == 0:
            torch.save(checkpoint, out / f"checkpoint_w{world}.pt")
        record["state_numel"] = state_numel(optimizers)
        train_steps(model, gradients, optimizers, rank, world, range(SAVE_AT, STEPS), record)
        record["params"] = params_of(model)
        gradients.remove_hooks()
        dist.barrier()  # the checkpoint is on disk before anyone resumes from it

        # Resume from a checkpoint (this world's or another's) into fresh optimisers: one step.
        record["resumed"] = resumed_params(Path(resume_from or out / f"checkpoint_w{world}.pt"), rank, world)

        # The unsharded multi-process path (all-reduce, full optimisers on every rank).
        torch.manual_seed(0)
        model = build_model(CONFIG, "cpu")
        optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                                      weight_decay=0.01, world=Dist(rank=rank, world_size=world))
        optimizers[1].ns_dtype = torch.float32
        train_steps(model, AllReducedGradients(model), optimizers, rank, world, range(STEPS))
        record["unsharded"] = params_of(model)

        if world == 2:  # gradients reduced in bf16
            model, gradients, optimizers = fresh_run(rank, world, "bf16")
            train_steps(model, gradients, optimizers, rank, world, range(STEPS))
            record["bf16"] = params_of(model)
            gradients.remove_hooks()
            # the architecture options' groups, sharded and all-reduced (fresh_run in a world of 1: plain optimisers)
            model, gradients, optimizers = fresh_run(rank, world, config=OPTIONS_CONFIG)
            train_steps(model, gradients, optimizers, rank, world, range(STEPS))
            record["options"] = params_of(model)
            gradients.remove_hooks()
            model, _, optimizers = fresh_run(rank, 1, config=OPTIONS_CONFIG)
            train_steps(model, AllReducedGradients(model), optimizers, rank, world, range(STEPS))
            record["options_unsharded"] = params_of(model)
        torch.save(record, out / f"w{world}_rank{rank}.pt")
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict, dict]:
    """Single process, plain optimisers: (params after SAVE_AT steps, after STEPS, the log)."""
    model, gradients, optimizers = fresh_run(0, 1)
    assert isinstance(gradients, LocalGradients) and isinstance(optimizers[1], Muon)
    log: dict = {}
    train_steps(model, gradients, optimizers, 0, 1, range(SAVE_AT), log)
    at_save = params_of(model)
    log["state_numel"] = state_numel(optimizers)
    train_steps(model, gradients, optimizers, 0, 1, range(SAVE_AT, STEPS), log)
    return at_save, params_of(model), log


def assert_params_close(actual: dict, expected: dict, atol: float, what: str, rtol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """2 ranks (resuming from their own checkpoint), then 4 ranks (resuming from the 2-rank one)."""
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(worker, args=(2, free_port(), str(out), None), nprocs=2, join=True)
    mp.spawn(worker, args=(4, free_port(), str(out), str(out / "checkpoint_w2.pt")), nprocs=4, join=True)
    return {"dir": out, **{w: [torch.load(out / f"w{w}_rank{r}.pt") for r in range(w)] for w in (2, 4)}}


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_updates_equal_the_unsharded_ones(runs, reference, world) -> None:
    _, expected, log = reference
    for rank, record in enumerate(runs[world]):
        # Sums over ranks and micro-batches group differently than in one process; AdamW at
        # lr ~1 (the tiny model's width-scaled embedding LR) turns that into ~1e-6 relative.
        assert_params_close(record["params"], expected, ATOL, f"world {world} rank {rank}", rtol=RTOL)
        # The global gradient norm is the same whichever rank holds which part.
        assert record["norms"] == pytest.approx(log["norms"], rel=1e-5)
        if world == 2:  # two-term sums are exact in any order: bit-identical to the all-reduce path
            assert all(torch.equal(record["params"][n], record["unsharded"][n]) for n in expected)
        else:
            assert_params_close(record["params"], record["unsharded"], ATOL, f"rank {rank} vs all-reduce", rtol=RTOL)


def test_reductions_start_during_the_last_backward_only(runs) -> None:
    # 2 ranks take 2 micro-batches each: nothing starts in the first backward; every
    # parameter's reduction has started by the end of the last, before wait().
    n_params = len(list(build_model(CONFIG, "meta").parameters()))
    assert runs[2][0]["started"][:2] == [(False, 0), (True, n_params)]


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_keeps_about_one_world_th_of_the_optimiser_state(runs, reference, world) -> None:
    _, _, log = reference
    per_rank = [record["state_numel"] for record in runs[world]]
    assert sum(per_rank) == log["state_numel"]  # every state element on exactly one rank
    assert max(per_rank) <= 1.05 * log["state_numel"] / world, per_rank


def test_a_two_rank_checkpoint_resumes_bit_identically_at_two_ranks(runs) -> None:
    for record in runs[2]:
        for name, value in record["params"].items():
            assert torch.equal(record["resumed"][name], value), name


def test_a_two_rank_checkpoint_resumes_at_four_ranks(runs) -> None:
    expected = runs[2][0]["params"]
    for rank, record in enumerate(runs[4]):
        assert_params_close(record["resumed"], expected, ATOL, f"rank {rank} of 4 from a 2-rank checkpoint", rtol=RTOL)


def test_a_two_rank_checkpoint_resumes_in_a_single_process(runs, reference) -> None:
    saved = torch.load(runs["dir"] / "checkpoint_w2.pt", weights_only=False)
    at_save, _, _ = reference
    assert_params_close(saved["params"], at_save, ATOL, "weights at the checkpoint", rtol=RTOL)
    # The plain torch optimisers read the gathered state.
    single = resumed_params(runs["dir"] / "checkpoint_w2.pt", 0, 1)
    assert_params_close(single, runs[2][0]["params"], ATOL, "single process from a 2-rank checkpoint", rtol=RTOL)


def test_a_four_rank_checkpoint_with_padded_slices_resumes_in_a_single_process(runs) -> None:
    # Gathered from 4 ranks, the embedding's and lm_head's AdamW state drops each slice's padding.
    single = resumed_params(runs["dir"] / "checkpoint_w4.pt", 0, 1)
    assert_params_close(single, runs[4][0]["params"], ATOL, "single process from a 4-rank checkpoint", rtol=RTOL)


def test_bf16_gradient_reduction_is_close_but_not_equal(runs) -> None:
    fp32, bf16 = runs[2][0]["params"], runs[2][0]["bf16"]
    assert any(not torch.equal(fp32[n], bf16[n]) for n in fp32)
    for name in fp32:
        # Mostly close; AdamW gives an element whose summed gradient rounds to zero in bf16 no step at all.
        assert (bf16[name] - fp32[name]).abs().mean() < 5e-3, name
    assert all(torch.equal(bf16[n], runs[2][1]["bf16"][n]) for n in bf16)  # the ranks still agree


def options_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """All optional Muon rules, sharded: train, checkpoint, resume from it into fresh optimisers."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        checkpoint = Path(out_dir) / "options_checkpoint.pt"
        model, gradients, optimizers = fresh_run(rank, world, muon_options=ALL_MUON_OPTIONS, config=MUON_OPTIONS_CONFIG)
        train_steps(model, gradients, optimizers, rank, world, range(SAVE_AT))
        saved = {"params": params_of(model), "optimizers": [o.state_dict() for o in optimizers]}
        if rank == 0:
            torch.save(saved, checkpoint)
        record = {"state_numel": state_numel(optimizers)}
        train_steps(model, gradients, optimizers, rank, world, range(SAVE_AT, STEPS))
        record["params"] = params_of(model)
        gradients.remove_hooks()
        dist.barrier()  # the checkpoint is on disk before anyone resumes from it
        record["resumed"] = resumed_params(checkpoint, rank, world, ALL_MUON_OPTIONS, MUON_OPTIONS_CONFIG)
        torch.save(record, Path(out_dir) / f"options_rank{rank}.pt")
    finally:
        shutdown_distributed()


def test_sharded_muon_options_equal_the_unsharded_ones_and_resume(tmp_path) -> None:
    mp.spawn(options_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    records = [torch.load(tmp_path / f"options_rank{r}.pt", weights_only=False) for r in range(2)]
    model, gradients, optimizers = fresh_run(0, 1, muon_options=ALL_MUON_OPTIONS, config=MUON_OPTIONS_CONFIG)
    train_steps(model, gradients, optimizers, 0, 1, range(SAVE_AT))
    total_state = state_numel(optimizers)
    assert any("second_moment" in s for s in optimizers[1].state.values())
    train_steps(model, gradients, optimizers, 0, 1, range(SAVE_AT, STEPS))
    for rank, record in enumerate(records):
        assert_params_close(record["params"], params_of(model), ATOL, f"options, rank {rank}", rtol=RTOL)
        for name, value in record["params"].items():  # resumed from the gathered checkpoint: bit-identical
            assert torch.equal(record["resumed"][name], value), name
    assert sum(r["state_numel"] for r in records) == total_state  # the second moments are sharded too
    # The gathered (unsharded-format) checkpoint resumes in a single process, NorMuon state included.
    single = resumed_params(tmp_path / "options_checkpoint.pt", 0, 1, ALL_MUON_OPTIONS, MUON_OPTIONS_CONFIG)
    assert_params_close(single, records[0]["params"], ATOL, "single process from the 2-rank checkpoint", rtol=RTOL)


def test_the_architecture_options_groups_shard_like_the_all_reduce_path(runs) -> None:
    # Two-term sums are exact, so only the update's own arithmetic differs: an AdamW slice of a tensor
    # puts other elements in the vector loop's remainder than the whole tensor does (1 ulp, 1.5e-8, on
    # an AVX2-only CPU; bit-identical on an AVX-512 one).
    for rank, record in enumerate(runs[2]):
        assert record["options"].keys() == record["options_unsharded"].keys()
        for name, value in record["options_unsharded"].items():
            torch.testing.assert_close(record["options"][name], value, atol=ATOL, rtol=0,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank}: {name}: {m}")
    assert {"value_embeds.0.weight", "backout_lambda", "transformer.h.0.attn.ve_gate"} <= set(runs[2][0]["options"])


def test_slices_cover_a_tensor_exactly_once() -> None:
    for numel in (1, 3, 7, 8, 61 * 32):
        for world in (1, 2, 3, 4, 8):
            bounds = [slice_bounds(numel, world, r) for r in range(world)]
            covered = [i for lo, hi in bounds for i in range(lo, hi)]
            assert covered == list(range(numel)), (numel, world)
            assert all(lo % SLICE_ALIGN == 0 for lo, hi in bounds if hi > lo), (numel, world)


def test_owners_balance_matrix_elements() -> None:
    numels = [4096, 4096, 1024, 512, 512, 1024] * 4
    owners = assign_owners(numels, 4)
    loads = [sum(n for n, o in zip(numels, owners) if o == r) for r in range(4)]
    assert loads == [sum(numels) // 4] * 4
    assert owners == assign_owners(numels, 4)  # deterministic: every rank computes the same
    assert assign_owners([5, 9, 1], 1) == [0, 0, 0]


def test_a_world_of_one_keeps_the_optimisers_untouched() -> None:
    model = build_model(CONFIG, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    gradients, same = shard_optimizers(model, optimizers, 0, 1)
    assert same is optimizers and isinstance(gradients, LocalGradients)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_bad_reduce_dtype_and_a_step_without_wait_are_refused() -> None:
    model = build_model(CONFIG, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    with pytest.raises(ConfigError, match="--grad-reduce-dtype 'fp8'"):
        shard_optimizers(model, optimizers, 0, 2, "fp8")
    gradients, sharded = shard_optimizers(model, optimizers, 0, 2)  # no collective until a step
    with pytest.raises(RuntimeError, match="wait"):
        sharded[0].step()
    gradients.remove_hooks()


def test_a_checkpoint_of_another_model_is_refused() -> None:
    model = build_model(CONFIG, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    gradients, sharded = shard_optimizers(model, optimizers, 0, 2)
    wrong = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 3), "exp_avg_sq": torch.zeros(3, 3)}},
             "param_groups": sharded[0].inner.state_dict()["param_groups"]}
    with pytest.raises(DataError, match="another model"):
        sharded[0].load_state_dict(wrong)
    gradients.remove_hooks()


def test_a_parameter_moved_after_sharding_is_refused() -> None:
    model = build_model(CONFIG, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    gradients, sharded = shard_optimizers(model, optimizers, 0, 2)
    model.to(torch.float64)  # new storage: the AdamW slices would update tensors no one reads
    gradients.reduced = True
    with pytest.raises(RuntimeError, match="storage was replaced"):
        sharded[0].step()
    gradients.remove_hooks()
