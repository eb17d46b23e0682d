"""When `--compile auto` compiles, and what a CPU without a working C++ toolchain does instead."""

from __future__ import annotations

import pytest
import torch

from picochat.cli import main
from picochat.model.gpt import GPTConfig, build_model, compiled_for_training
from picochat.train import options
from picochat.train.base_train import BaseTrainConfig

GXX = "/usr/bin/g++"


@pytest.mark.parametrize("compile_, device, dtype, budget, cxx, expected", [
    ("auto", "cuda", torch.bfloat16, -1.0, None, True),
    ("auto", "cpu", torch.bfloat16, 15.0, GXX, True),  # the cpu preset on a fast-bf16 CPU
    ("auto", "cpu", torch.bfloat16, 5.0, GXX, True),
    ("auto", "cpu", torch.bfloat16, 4.9, GXX, False),  # too short to earn a graph's ~20 s back
    ("auto", "cpu", torch.bfloat16, -1.0, GXX, False),  # a fixed horizon (tests, bench/recipe.py's 500 steps)
    ("auto", "cpu", torch.float32, 15.0, GXX, False),  # fp32: eager wins or ties
    ("auto", "cpu", torch.bfloat16, 15.0, None, False),  # nothing to build the kernels with
    ("on", "cpu", torch.float32, -1.0, None, True),
    ("off", "cuda", torch.bfloat16, 15.0, GXX, False),
])
def test_compile_auto_compiles_where_it_pays(monkeypatch, compile_, device, dtype, budget, cxx, expected):
    c_compiler = options.kernels.compiler
    monkeypatch.setattr(options.kernels, "compiler", lambda language="C": cxx if language == "C++" else c_compiler())
    cfg = BaseTrainConfig(compile=compile_, time_budget=budget)
    assert cfg.compiles(device, dtype) is expected


def test_base_train_compiles_a_long_bf16_run_by_itself(tiny_home, monkeypatch, capsys):
    """base-train passes its compute dtype to the rule: a bf16 run with a time budget over the threshold
    is compiled without --compile, an fp32 one is not, and the run's header says which."""
    calls = []
    compile_ = torch.compile

    def counting_compile(fn, **kw):
        calls.append(fn)
        return compile_(fn, backend="eager", **kw)  # dynamo's eager backend stands in for inductor

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(options, "CPU_COMPILE_MINUTES", 0.01)
    c_compiler = options.kernels.compiler
    monkeypatch.setattr(options.kernels, "compiler", lambda language="C": GXX if language == "C++" else c_compiler())
    torch._dynamo.reset()
    for dtype, tag in (("fp32", "eager"), ("bf16", "compiled")):
        assert main(["base-train", "--preset", "cpu-tiny", "--dtype", dtype, "--eval-every", "-1", "--sample-every",
                     "-1", "--time-budget", "0.02", "--tag", tag]) == 0
        assert len(calls) == (dtype == "bf16"), dtype
        assert f"| {tag} (--compile auto)" in capsys.readouterr().out
        assert (tiny_home / "checkpoints" / "base" / tag).is_dir()


def test_a_compiler_that_cannot_build_falls_back_to_eager_once(monkeypatch, capsys):
    """torch.compile's CPU kernels need a C++ toolchain: where building them fails, training goes on
    eagerly, with the same loss, after one warning."""
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32),
                        "cpu")
    failures = []

    def broken(*args, **kwargs):
        failures.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("g++: not found"), None)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    forward = compiled_for_training(model, dynamic=False)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    for _ in range(2):
        assert torch.equal(forward(idx, targets), model(idx, targets))
    assert len(failures) == 1
    assert capsys.readouterr().err.count("torch.compile could not build its CPU kernels (g++: not found)") == 1
