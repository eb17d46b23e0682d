"""What a resume, a save or a step line does in the less trodden cases: flags changed since the
checkpoint (learning rates, horizon, batch, time budget), a stop on a non-finite loss, a save that
fails or is interrupted, an earlier run's checkpoints under a reused tag, strict JSON for values
that are not finite, and steps the clock times at 0 s."""

from __future__ import annotations

import errno
import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.train import base_train, loop
from tests.infer.tiny import tiny_model, tiny_tokenizer
from tests.train.test_distributed import FixedBatches, join_tiny_world, make_batches, run_two_ranks

TINY = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1"]


def records(home: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (home / "logs" / f"{name}.jsonl").read_text().splitlines()]


def muon_group(step_dir: Path) -> dict:
    return ckpt.load_training_state(step_dir)["optimizers"][1]["param_groups"][0]


def test_a_resume_trains_with_this_runs_learning_rate_and_says_it_changed(tiny_home, capsys):
    """The optimiser state used to bring back the checkpoint's param groups, so a lowered --matrix-lr
    (what the non-finite loss error advises before --resume) was silently ignored."""
    args = TINY + ["--save-every", "2", "--tag", "lr"]
    assert main(args + ["--num-iterations", "2"]) == 0
    run = ckpt.run_dir("base", "lr")
    before = muon_group(run / "step_2")["initial_lr"]
    capsys.readouterr()
    assert main(args + ["--num-iterations", "4", "--matrix-lr", str(before / 4), "--resume"]) == 0
    out = capsys.readouterr().out
    assert muon_group(run / "step_4")["initial_lr"] == pytest.approx(before / 4)
    line = next(x for x in out.splitlines() if "initial_lr" in x)
    assert f"{before:g} in the checkpoint, {before / 4:g} now" in line
    # The same flags: nothing to say, and the groups are the checkpoint's.
    capsys.readouterr()
    assert main(args + ["--num-iterations", "6", "--matrix-lr", str(before / 4), "--resume"]) == 0
    assert "initial_lr" not in capsys.readouterr().out


def test_a_resume_with_another_horizon_or_batch_says_so(tiny_home, capsys):
    args = TINY + ["--save-every", "2", "--tag", "meaning"]
    assert main(args + ["--num-iterations", "4"]) == 0
    capsys.readouterr()
    assert main(args + ["--num-iterations", "6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained toward a horizon of 4 steps; this run's horizon is 6 steps" in out
    assert "tokens per step" not in out
    assert main(args + ["--num-iterations", "8", "--total-batch-size", "1024", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "512 tokens per step in the checkpoint, 1024 now" in out


def test_a_resume_with_another_time_budget_says_the_fixed_horizon_stays(tiny_home, monkeypatch, capsys):
    clock = itertools.count(0.0, 0.25)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))
    args = TINY + ["--save-every", "5", "--keep-last", "100", "--tag", "budget2"]
    assert main(args + ["--time-budget", "0.25"]) == 0
    recs = [r for r in records(tiny_home, "base-budget2") if "loss" in r]
    fixed_at = next(r["step"] for r in recs if r["num_iterations"] is not None)
    horizon = recs[-1]["num_iterations"]
    run = ckpt.run_dir("base", "budget2")
    cut = next(s for s in ckpt.list_steps(run) if s >= fixed_at)
    for s in ckpt.list_steps(run):
        if s > cut:
            shutil.rmtree(run / f"step_{s}")
    capsys.readouterr()
    assert main(args + ["--time-budget", "0.5", "--resume"]) == 0
    out = capsys.readouterr().out
    assert (f"the horizon of {horizon} steps was fixed by the checkpoint's --time-budget of 0.25 min and stays; "
            "this run's --time-budget 0.5 is not used") in out
    assert ckpt.list_steps(run)[-1] == horizon


def test_a_stop_on_a_non_finite_loss_says_what_a_resume_does(tiny_home, monkeypatch, capsys):
    """The saved data position is after the bad step's batch: --resume skips that batch, and says so."""
    real = loop.Trainer._supervised_work

    def poisoned(self, step):
        work = real(self, step)
        if step == 3:
            work.loss = float("nan")
        return work

    monkeypatch.setattr(loop.Trainer, "_supervised_work", poisoned)
    args = TINY + ["--num-iterations", "6", "--tag", "nan"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "at step 3" in err and "--resume continues with the batch after the one of step 3" in err
    assert "--matrix-lr" in err
    monkeypatch.setattr(loop.Trainer, "_supervised_work", real)
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "was saved when the loss of step 3 was not finite: the batch of that step is skipped" in out
    # A later save of the resumed run is an ordinary one.
    assert ckpt.load_training_state(ckpt.run_dir("base", "nan") / "step_6")["loop"].get("nonfinite_step") is None


def test_a_nan_eval_is_null_in_the_metrics_log(tiny_home, monkeypatch):
    """Strict JSON lines: a NaN inside the eval record used to stop the run with a ValueError."""
    monkeypatch.setattr(base_train, "evaluate_bpb_with_se", lambda *a, **k: (float("nan"), float("inf")))
    assert main(TINY + ["--num-iterations", "2", "--tag", "nanval"]) == 0
    lines = (tiny_home / "logs" / "base-nanval.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if '"eval"' in line]
    assert evals and evals[-1]["eval"]["val_bpb"] is None


def test_a_step_the_clock_times_at_zero_seconds_is_logged(tiny_home, monkeypatch):
    """A coarse clock can read the same time before and after a short step: no ZeroDivisionError."""
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: 1000.0))
    assert main(TINY + ["--num-iterations", "5", "--tag", "zero"]) == 0
    steps = [r for r in records(tiny_home, "base-zero") if "loss" in r]
    assert len(steps) == 5 and all(r["dt"] == 0 and r["tok_per_s"] is None for r in steps)


def test_a_fixed_horizon_from_zero_second_steps_does_not_divide_by_zero(tiny_home):
    trainer = SimpleNamespace(cfg=SimpleNamespace(time_budget_s=10.0), elapsed_s=1.0, step=4,
                              world=SimpleNamespace(enabled=False), _side_seconds=lambda start, end, final, step_s: 0.0)
    loop.Trainer._fix_horizon(trainer, 8, 0.0)
    assert trainer.horizon_fixed and trainer.num_iterations >= 4


def test_a_fresh_run_on_a_used_tag_keeps_none_of_the_earlier_runs_steps(tiny_home):
    """keep_last counted the earlier run's lower steps as this run's: a fresh run saving only at step 6
    kept the earlier run's step 4 beside it (a fallback for --resume and a --step to load)."""
    args = TINY + ["--keep-last", "2", "--tag", "reused"]
    assert main(args + ["--num-iterations", "4", "--save-every", "2"]) == 0
    run = ckpt.run_dir("base", "reused")
    assert ckpt.list_steps(run) == [2, 4]
    assert main(args + ["--num-iterations", "6"]) == 0
    assert ckpt.list_steps(run) == [6]


def test_an_interrupted_save_leaves_no_temp_directory(picochat_home, monkeypatch):
    """A second Ctrl-C during a save: the half-written step goes, the earlier checkpoint stays."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    run = picochat_home / "run"
    ckpt.save_checkpoint(run, 1, model, tok, {}, state={"x": torch.zeros(1)})
    real = ckpt.write_chunk

    def interrupted(file, data):
        if Path(file.name).name == "state.pt":
            raise KeyboardInterrupt
        return real(file, data)

    monkeypatch.setattr(ckpt, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 2, model, tok, {}, state={"x": torch.zeros(1)})
    assert ckpt.list_steps(run) == [1] and not list(run.glob(".step_*"))


def train_onto_a_full_disk(rank: int, world: int, port: int, home: str) -> None:
    """Two ranks; rank 0's disk is full when it writes state.pt."""
    from picochat.errors import UserError
    from picochat.optim import build_optimizers
    from picochat.runtime import shutdown_distributed

    def full_disk(file, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt.write_chunk = full_disk
    world_info, tok, model = join_tiny_world(rank, world, port, home)
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    batches = FixedBatches(make_batches(tok.vocab_size, 4, 2), rank, world)
    cfg = loop.LoopConfig(stage="base", tag="full", num_iterations=4, grad_accum_steps=1, tokens_per_step=64,
                          save_every=2)
    trainer = loop.Trainer(model, opts, batches, cfg, world_info, tok, lr_multiplier=lambda s, n: 1.0)
    try:
        trainer.run()
        outcome = {"error": None}
    except UserError as e:
        outcome = {"error": str(e), "all_ranks": getattr(e, "all_ranks", False), "step": trainer.step}
    (Path(home) / f"full{rank}.json").write_text(json.dumps(outcome))
    shutdown_distributed()


def test_a_full_disk_on_rank_0_stops_every_rank_with_the_same_error(tiny_home):
    """Rank 0 alone writes: its failed save used to leave the other ranks waiting in the barrier after it."""
    run_two_ranks(train_onto_a_full_disk, (str(tiny_home),), "after rank 0 failed to save", timeout_s=120)
    outcomes = [json.loads((tiny_home / f"full{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["error"].startswith("no space left on") and outcomes[0]["all_ranks"]
    assert outcomes[0]["step"] == 2


def test_keep_last_0_still_drops_the_higher_steps_of_a_superseded_run(picochat_home):
    """--keep-last 0 keeps every older step of this run, not an earlier run's higher ones (--resume would
    continue that run instead of this one)."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    run = picochat_home / "run"
    for step in (8, 12):
        ckpt.save_checkpoint(run, step, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=0)
    ckpt.save_checkpoint(run, 4, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=0)
    assert ckpt.list_steps(run) == [4]
    for step in (5, 6):
        ckpt.save_checkpoint(run, step, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=0)
    assert ckpt.list_steps(run) == [4, 5, 6]
    ckpt.save_model_only(run, model, tok, {"step": 2})  # not a training save: nothing is pruned
    assert ckpt.list_steps(run) == [2, 4, 5, 6]
