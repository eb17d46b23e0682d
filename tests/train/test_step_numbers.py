"""The step numbers against a fake clock: ETA and a time budget count the evals still due, a step that
compiles a graph is not timed, and every checkpoint holds the training's times (the report reads them)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.model.gpt import GPTConfig, build_model
from picochat.optim import build_optimizers
from picochat.report.report import load_stage
from picochat.runtime import Dist
from picochat.tokenizer import Tokenizer
from picochat.train import loop
from tests.train.test_distributed import FixedBatches, make_batches

MICRO_S, EVAL_S = 1.0, 10.0  # fake seconds of one micro-batch's forward and backward, and of one eval
SAVE_S = 5.0  # fake seconds of one checkpoint save
COMPILE_S = 30.0  # fake seconds torch.compile takes to trace a graph


def fake_trainer(home, monkeypatch, steps: int, on_log=None, batches=None, compiled=False,
                 **config) -> tuple[loop.Trainer, list[float]]:
    """A tiny model's Trainer whose loop clock moves only in its forward (MICRO_S, and COMPILE_S more when
    `compiled` traces a graph) and its eval (EVAL_S)."""
    clock = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: clock[0]))
    torch.manual_seed(0)
    tok = Tokenizer.load(home / "tokenizer")
    model = build_model(GPTConfig.from_depth(2, tok.vocab_size, aspect_ratio=32, head_dim=32, max_seq_len=16), "cpu")
    if compiled:
        torch._dynamo.reset()
    train_model = torch.compile(model, backend="eager", dynamic=False) if compiled else model

    def forward(x, y, **kw):
        graphs = counters["stats"]["unique_graphs"]
        loss = train_model(x, y, **kw)
        clock[0] += MICRO_S + COMPILE_S * (counters["stats"]["unique_graphs"] - graphs)
        return loss

    def evaluate(m, step):
        clock[0] += EVAL_S
        return {"val": 1.0}

    cfg = loop.LoopConfig(stage="base", tag="numbers", num_iterations=steps, grad_accum_steps=2,
                          tokens_per_step=2 * 2 * 16, **config)
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(batches or make_batches(tok.vocab_size, steps if steps > 0 else 200, 2), 0, 1)
    trainer = loop.Trainer(model, opts, batches, cfg, Dist(), tok, lr_multiplier=lambda s, n: 1.0,
                           momentum=lambda s: 0.9, evaluate=evaluate, train_model=forward,
                           on_log=lambda r: on_log(r, clock[0]) if on_log else None)
    return trainer, clock


def test_eta_counts_the_evals_still_due(tiny_home, monkeypatch):
    """20 steps of 2 s with a 10 s eval every 5 steps and at the end: after step 4 there are 32 s of
    steps and 40 s of evals left (steps 5, 10, 15 and the final one); the ETA said 32 s."""
    seen = []
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 20, lambda r, now: seen.append((r, now)), eval_every=5)
    trainer.run()
    end = clock[0]  # the final eval done: all that is left is the save
    steps = [(r, now) for r, now in seen if "loss" in r and r["eta_s"] is not None]
    assert [r["step"] for r, _ in steps] == list(range(4, 21))  # steps 1-3 warm up
    for r, now in steps:
        assert r["eta_s"] == pytest.approx(end - now), r
    assert steps[0][0]["eta_s"] == pytest.approx(16 * 2 * MICRO_S + 4 * EVAL_S)


def test_a_time_budget_counts_the_periodic_evals_it_will_run(tiny_home, monkeypatch):
    """A 100 s budget, steps of 2 s, a 10 s eval every 10 steps: fixed after step 7 (24 s spent, the step-0
    eval's included), the horizon leaves room for the evals before it; the final eval comes on top. It was
    45 steps, as if no eval were to come, and its steps ended at 140 s."""
    seen = []
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 0, lambda r, now: seen.append((r, now)), eval_every=10,
                                  time_budget_s=100.0, budget_measure_steps=4, budget_measure_fraction=0.01)
    trainer.run()
    horizon = trainer.num_iterations
    steps_done = next(now for r, now in seen if r["step"] == horizon and "loss" in r)  # the evals before it too
    one_more = 2 * MICRO_S + (EVAL_S if horizon % 10 == 0 else 0)  # the eval at the horizon would be periodic
    assert steps_done <= 100.0 < steps_done + one_more, (horizon, steps_done)
    assert (horizon, steps_done) == (30, 90.0)
    assert clock[0] == steps_done + EVAL_S


def slow_saves(trainer: loop.Trainer, clock: list[float], monkeypatch) -> None:
    """Every save of `trainer` takes SAVE_S on its clock."""
    save = trainer.save

    def timed_save():
        clock[0] += SAVE_S
        save()
    monkeypatch.setattr(trainer, "save", timed_save)


def test_eta_counts_the_saves_still_due(tiny_home, monkeypatch):
    """20 steps of 2 s, a 5 s save every 5 steps and at the end: once a save has been timed (after step 5's
    record), the ETA is the time left to the end of the final save; it left the saves out (15 s short
    after step 6)."""
    seen = []
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 20, lambda r, now: seen.append((r, now)), save_every=5)
    slow_saves(trainer, clock, monkeypatch)
    trainer.run()
    steps = {r["step"]: (r, now) for r, now in seen if "loss" in r}
    end = clock[0] - EVAL_S  # the one eval, at the end, is never timed before it: the ETA cannot know it
    for step in range(6, 21):  # a step's record comes before its own periodic save
        record, now = steps[step]
        assert record["eta_s"] == pytest.approx(end - now), step
    assert steps[6][0]["eta_s"] == pytest.approx(14 * 2 * MICRO_S + 3 * SAVE_S)


def test_eta_counts_the_wall_clock_saves_still_due(tiny_home, monkeypatch):
    """The same with a save every 10 s of wall time (--save-every-minutes): after steps 5, 10 and 15, and the
    final one at 20 (no periodic save there). It counted one save too many (the one the final replaces)."""
    seen = []
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 20, lambda r, now: seen.append((r, now)),
                                  save_every_minutes=10 / 60)
    slow_saves(trainer, clock, monkeypatch)
    trainer.run()
    steps = {r["step"]: (r, now) for r, now in seen if "loss" in r}
    end = clock[0] - EVAL_S
    for step in range(6, 21):
        record, now = steps[step]
        assert record["eta_s"] == pytest.approx(end - now), step


def test_a_time_budget_counts_the_periodic_saves_it_will_run(tiny_home, monkeypatch):
    """A 100 s budget, steps of 2 s, a 5 s save every 5 steps: fixed after step 7 (19 s spent, the step-5 save
    included), the horizon leaves room for the saves before it. It was 47 steps, as if no save were to come,
    and its steps and saves ended at 139 s."""
    seen = []
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 0, lambda r, now: seen.append((r, now)), save_every=5,
                                  time_budget_s=100.0, budget_measure_steps=4, budget_measure_fraction=0.01)
    slow_saves(trainer, clock, monkeypatch)
    trainer.run()
    horizon = trainer.num_iterations
    done = clock[0] - EVAL_S - SAVE_S  # the final eval and save come on top
    one_more = 2 * MICRO_S + (SAVE_S if horizon % 5 == 0 else 0)  # the save at the horizon would be periodic
    assert done <= 100.0 < done + one_more, (horizon, done)
    assert (horizon, done) == (35, 100.0)  # 70 s of steps, 6 saves of 5 s


def test_a_stopped_run_keeps_its_wall_time_for_the_report(tiny_home, monkeypatch):
    """Stopped (Ctrl-C) at step 7 of 20: the loop ran 10 s of eval and 14 s of steps, 24 s. The stop's
    checkpoint held no wall time, so the report summed the step times: 14 s, the eval left out."""
    def stop_at_six(record, now):
        if record.get("step") == 6 and "loss" in record:
            trainer._stop_requested = True  # what Ctrl-C sets: the next step stops
    trainer, clock = fake_trainer(tiny_home, monkeypatch, 20, stop_at_six, eval_every=10)
    result = trainer.run()
    assert result["stopped"] and result["step"] == 7
    assert load_stage(tiny_home, "base", "numbers").train_time_s() == pytest.approx(clock[0])
    meta = ckpt.read_json_object(ckpt.run_dir("base", "numbers") / "step_7" / "meta.json")
    assert meta["metrics"]["wall_time_s"] == pytest.approx(EVAL_S + 7 * 2 * MICRO_S) == clock[0]


def test_a_step_that_compiles_a_graph_is_not_timed(tiny_home, monkeypatch):
    """Compiled, step 7's rows are narrower (as SFT's row widths vary): tracing their graph takes 30 s. The
    step is left out of the train time and the mean step time like the warm-up steps: 12 s over 6 steps,
    ETA 4 s after step 8. It counted: 44 s, and an ETA of 16 s."""
    g = torch.Generator().manual_seed(0)
    batches = [[(torch.randint(0, 300, (2, w), generator=g), torch.randint(0, 300, (2, w), generator=g))
                for _ in range(2)] for w in [16] * 6 + [8] + [16] * 3]
    seen = []
    trainer, _ = fake_trainer(tiny_home, monkeypatch, 10, lambda r, now: seen.append(r), batches=batches,
                              compiled=True)
    trainer.run()
    steps = {r["step"]: r for r in seen if "loss" in r}
    assert steps[1]["dt"] == steps[7]["dt"] == 2 * MICRO_S + COMPILE_S  # the first graph, then step 7's
    assert [s for s, r in steps.items() if not r["timed"]] == [1, 2, 3, 7]
    assert trainer.train_time == 6 * 2 * MICRO_S
    assert steps[8]["eta_s"] == 2 * 2 * MICRO_S


def test_a_compiled_base_train_runs_and_times_its_steps(tiny_home, monkeypatch):
    """--compile on (the default on CUDA) stopped at once: the loop took the compiled model's truth value,
    which asks the model for its len() (TypeError). Dynamo's eager backend stands in for inductor here."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    torch._dynamo.reset()
    assert main(["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every",
                 "-1", "--num-iterations", "5", "--compile", "on", "--tag", "compiled"]) == 0
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-compiled.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and r["timed"]] == [4, 5]
