"""`picochat plan`: the memory model against measurements on CPU, fit and batch search, and the CLI.

The start-up check of the training commands is tested in tests/train/test_base_train.py."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from picochat.cli import main
from picochat.model.gpt import GPTConfig, build_model
from picochat.optim import build_optimizers
from picochat.plan import (
    DEVICES,
    Shape,
    explain_batch_divisibility,
    fits,
    largest_batch,
    memory_terms,
    valid_batches,
)


def _peak_allocated(prof) -> int:
    """Highest total of live CPU tensor bytes in a profile with profile_memory=True."""
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    return max(sum(row) for row in sizes)


def measure_terms(config: GPTConfig, batch: int, bf16: bool, accum: int = 1) -> dict[str, int]:
    """Measured bytes per term of two eager training steps of `accum` micro-batches on CPU (the
    second step has optimiser state).

    parameters, gradients and optimiser state are summed from the tensors; activations and the
    bf16 weight copies are the tensors autograd saves for the backward (saved-tensor hooks; the
    loss's saved lm_head gradient belongs to the loss buffers); total is the peak of all live
    tensors, from torch.profiler's memory timeline.
    """
    torch.manual_seed(0)
    V, T = config.vocab_size, config.sequence_len
    x, y = torch.randint(0, V, (batch, T)), torch.randint(0, V, (batch, T))
    saved: dict[int, tuple[int, str]] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model = build_model(config, "cpu")
        optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = {tuple(p.shape) for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                is_weight = t.dim() == 2 and tuple(t.shape) in shapes and t.dtype != torch.float32
                is_loss = tuple(t.shape) == (V, config.n_embd) and t.dtype == torch.float32
                saved[st.data_ptr()] = (st.nbytes(), "weight" if is_weight else "loss" if is_loss else "act")
            return t

        for step in range(2):
            for micro in range(accum):
                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == micro == 0 else nullcontext()
                with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(x, y)
                loss.backward()
            grads = sum(p.grad.nbytes for p in model.parameters())
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            del loss
    state = sum(t.nbytes for opt in optimizers for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {
        "parameters": sum(p.nbytes for p in model.parameters()),
        "bf16 weight copies": sum(n for n, kind in saved.values() if kind == "weight"),
        "gradients": grads,
        "optimiser state": state,
        "activations": sum(n for n, kind in saved.values() if kind == "act"),
        "total": _peak_allocated(prof),
    }


# (depth, width, seq_len, batch, vocab, bf16, micro-batches per step): small enough for a few seconds
CASES = [(2, 128, 64, 4, 512, True, 1), (4, 256, 128, 4, 2048, False, 1), (2, 256, 128, 4, 4096, True, 2)]


@pytest.mark.parametrize(("depth", "width", "seq_len", "batch", "vocab", "bf16", "accum"), CASES)
def test_memory_model_matches_measured_cpu_training_step(depth, width, seq_len, batch, vocab, bf16, accum):
    """Exact terms are exact; activations within 5%; the peak of all live tensors within 10%."""
    config = GPTConfig(vocab_size=vocab, n_layer=depth, n_head=width // 64, n_kv_head=width // 64, n_embd=width,
                       sequence_len=seq_len)
    shape = Shape.from_config(config, batch, on_gpu=False, bf16=bf16, total_batch_tokens=batch * seq_len * accum)
    est = memory_terms(shape)
    got = measure_terms(config, batch, bf16, accum)
    for term in ("parameters", "bf16 weight copies", "optimiser state"):
        assert est[term] == got[term], term
    assert est["gradients"] == (got["gradients"] if accum > 1 else 0)  # alive at the peak only when accumulating
    assert est["activations"] == pytest.approx(got["activations"], rel=0.05)
    assert sum(est.values()) == pytest.approx(got["total"], rel=0.10)


def test_memory_model_matches_a_step_that_peaks_in_the_optimiser():
    """A deep model and a tiny batch: the peak is Muon's step, which orthogonalises each shape's
    matrices as one stack (q, k, v and the attention output share one when every head has k/v)."""
    config = GPTConfig(vocab_size=512, n_layer=8, n_head=4, n_kv_head=4, n_embd=256, sequence_len=16)
    shape = Shape.from_config(config, 1, on_gpu=False, total_batch_tokens=16)
    est = memory_terms(shape)
    assert est["activations"] == 0 < est["optimiser step temporaries"]  # the step moment was chosen
    assert sum(est.values()) == pytest.approx(measure_terms(config, 1, True)["total"], rel=0.10)


def test_sharding_divides_optimiser_state_and_adds_comm_buffers():
    config = GPTConfig.from_depth(20, 65536)
    one = memory_terms(Shape.from_config(config, 32, total_batch_tokens=524288))
    eight = memory_terms(Shape.from_config(config, 32, world_size=8, total_batch_tokens=524288))
    assert eight["optimiser state"] == one["optimiser state"] // 8
    assert one["communication buffers"] == 0 < eight["communication buffers"]
    assert one["gradients"] > 0 and eight["gradients"] == 0  # 8 x 32 x 2048 = one micro-batch per step


def test_fit_and_largest_batch():
    h100 = DEVICES["H100-80GB"].memory_bytes
    d20 = Shape.from_config(GPTConfig.from_depth(20, 65536), 32, world_size=8, compiled=True,
                            total_batch_tokens=524288)
    candidates = valid_batches(524288, 2048, 8)
    assert candidates == [1, 2, 4, 8, 16, 32]
    best = largest_batch(d20, h100, candidates)
    assert best in candidates and fits(Shape(**{**d20.__dict__, "device_batch_size": best}), h100)
    assert not fits(Shape(**{**d20.__dict__, "device_batch_size": 64}), h100)
    l4 = DEVICES["L4"].memory_bytes
    d32 = Shape.from_config(GPTConfig.from_depth(32, 65536), 8, compiled=True, total_batch_tokens=524288)
    assert not fits(d32, l4) and largest_batch(d32, l4, [1, 2, 4, 8]) == 0


def test_batch_divisibility_names_the_flag_and_a_value():
    msg = explain_batch_divisibility(524288, 32, 2048, 16, "--total-batch-size")
    assert "--device-batch-size 16" in msg and "16 process" in msg
    assert explain_batch_divisibility(524288, 32, 2048, 8, "--total-batch-size") is None
    assert "multiple of 768" in explain_batch_divisibility(512, 2, 128, 3, "--total-batch-size")


def test_plan_command_prints_and_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "d20", "--gpu", "H100-80GB", "--gpus", "8", "--price-per-gpu-hour", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("parameters", "gradients", "optimiser state", "activations", "logits / loss buffers",
                   "communication buffers", "headroom", "fits: yes", "largest device batch", "MFU (assumed)",
                   "cost:", "sharded over the 8 ranks"):
        assert needle in text, needle
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["target"]["world"] == 8 and plan["steps"] > 0
    assert plan["cost"] == pytest.approx(plan["hours"] * 8 * 2)
    assert main(["plan", "--preset", "d32", "--gpu", "L4", "--gpus", "1", "--out", str(out)]) == 0
    assert "fits: NO" in capsys.readouterr().out


def test_plan_refuses_bad_world(tmp_path, capsys):
    assert main(["plan", "--gpus", "0", "--out", str(tmp_path / "p.json")]) == 2
    assert "--gpus 0" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "needle"), [(["--total-batch-size", "0"], "--total-batch-size 0"),
                                               (["--total-batch-size", "-3"], "--total-batch-size -3"),
                                               (["--mfu", "0"], "--mfu 0"), (["--mfu", "-5"], "--mfu -5")])
def test_plan_refuses_a_step_size_or_utilisation_it_cannot_divide_by(tmp_path, capsys, flags, needle):
    assert main(["plan", "--preset", "d20", *flags, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_plan_times_the_compute_dtype_that_training_would_use(monkeypatch):
    """On a CPU without fast bf16, training computes in fp32 (pick_dtype): the plan measures and times
    that, not bf16 matmuls ~50x slower, and --gpus processes share the CPU's peak; --fp32 on a GPU
    takes its fp32 peak, not its tensor-core one."""
    import picochat.plan as plan_module
    from picochat import runtime
    from picochat.plan import PlanConfig, build_plan

    measured = []
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: False)
    monkeypatch.setattr(plan_module, "peak_flops", lambda device, dtype: measured.append(dtype) or 1e11)
    cpu = build_plan(PlanConfig.defaults(preset="cpu", gpu="cpu", gpus=1, num_iterations=10))
    assert measured == [torch.float32] and cpu["target"]["dtype"] == "fp32"
    cpu_terms = memory_terms(Shape.from_config(PlanConfig.defaults(preset="cpu").model_config(8192), 16,
                                               bf16=False, on_gpu=False, total_batch_tokens=4096))
    assert cpu["memory_bytes"] == cpu_terms  # fp32 activations and buffers
    two = build_plan(PlanConfig.defaults(preset="cpu", gpu="cpu", gpus=2, num_iterations=10))
    assert two["step_seconds"] == pytest.approx(cpu["step_seconds"])  # two processes share the same cores
    bf16 = build_plan(PlanConfig.defaults(preset="d20", num_iterations=10))
    fp32 = build_plan(PlanConfig.defaults(preset="d20", num_iterations=10, fp32=True))
    assert fp32["target"]["dtype"] == "fp32" and bf16["target"]["dtype"] == "bf16"
    assert fp32["step_seconds"] == pytest.approx(bf16["step_seconds"] * 989 / 67)


def test_plan_lowers_a_presets_device_batch_for_the_world_as_base_train_does():
    """d20's 32 rows x 2048 x 16 devices overshoot its 2^19-token step: base-train lowers a preset's
    device batch to 16 there (check_batch), so the plan must estimate memory at 16, not 32; a
    --device-batch-size given on the command line is planned as it is."""
    from picochat.plan import PlanConfig, build_plan

    two_nodes = build_plan(PlanConfig.defaults(preset="d20", nodes=2))
    assert two_nodes["device_batch_size"] == 16 and two_nodes["batch_divides"]
    config = PlanConfig.defaults(preset="d20").model_config(65536)
    expected = memory_terms(Shape.from_config(config, 16, world_size=16, compiled=True, total_batch_tokens=524288))
    assert two_nodes["memory_bytes"] == expected
    assert build_plan(PlanConfig.defaults(preset="d20"))["device_batch_size"] == 32  # one node: as it is
    given = build_plan(PlanConfig.defaults(preset="d20", nodes=2, device_batch_size=32))
    assert given["device_batch_size"] == 32 and not given["batch_divides"]


@pytest.mark.parametrize("kind", ["a directory", "under a file"])
def test_plan_out_that_cannot_be_written_is_a_one_line_error_and_leaves_nothing(tmp_path, capsys, kind):
    target = tmp_path / "plans"
    if kind == "a directory":
        target.mkdir()
        out = target
    else:
        target.write_text("a file where the directory should be")
        out = target / "plan.json"
    assert main(["plan", "--preset", "d20", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}") and "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plans"]  # no half-written plans.tmp
