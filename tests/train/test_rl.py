"""RL: advantages, masking of prompt / forced tool output / padding, token-level loss normalisation,
rollouts from the engine, and, through the shared Trainer, bit-exact resume of `picochat rl` on
cpu-tiny, Ctrl-C stop-and-save, the non-finite guard, and 2 gloo ranks that agree."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.runtime import Dist
from picochat.tasks.arithmetic import ArithmeticProblems
from picochat.tasks.base import response_text
from picochat.train import rl
from picochat.train.rl import (
    PolicyGradientStep,
    ProblemOrder,
    Rollout,
    group_advantages,
    policy_batch,
    policy_gradient_loss,
)
from tests.eval.test_chat_eval import ScriptedModel, tool_script
from tests.infer.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer
from tests.train.test_distributed import free_port


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_advantages_are_reward_minus_group_mean():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([0.0, 0.0]) == [0.0, 0.0]  # nothing to learn from a uniform group
    assert group_advantages([1.0, 0.0, 0.0]) == pytest.approx([2 / 3, -1 / 3, -1 / 3])  # no std division


def scripted_rollouts(tok) -> list[Rollout]:
    sp = tok.encode_special
    # Sample 0: text, a tool call whose output (4 tokens) the engine forced, more text, the end token.
    tokens0 = [50, sp("python_start"), 60, sp("python_end"), sp("output_start"), 61, 62, sp("output_end"), 70,
               sp("assistant_end")]
    mask0 = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    tokens1 = [80, 81, sp("assistant_end")]
    return [Rollout([1, 2, 3, 4], tokens0, mask0, reward=1.0, advantage=0.5),
            Rollout([1, 2, 3, 4], tokens1, [1, 1, 1], reward=0.0, advantage=-0.5)]


def test_policy_batch_masks_prompt_forced_output_and_padding(tok):
    rollouts = scripted_rollouts(tok)
    pad = tok.encode_special("assistant_end")
    inputs, targets, adv = policy_batch(rollouts, pad)
    assert inputs.shape == targets.shape == (2, 13)
    sp = tok.encode_special
    # Row 0: targets are ids[1:]; the 3 prompt targets and the 4 forced tool-output targets are -1.
    assert targets[0].tolist() == [-1, -1, -1, 50, sp("python_start"), 60, sp("python_end"), -1, -1, -1, -1, 70,
                                   sp("assistant_end")]
    # Row 1: prompt masked, then the 3 sampled tokens, then padding (-1 targets, pad inputs).
    assert targets[1].tolist() == [-1, -1, -1, 80, 81, sp("assistant_end")] + [-1] * 7
    assert inputs[1, 7:].tolist() == [pad] * 6
    assert adv.tolist() == [0.5, -0.5]
    assert int((targets >= 0).sum()) == sum(r.valid_tokens for r in rollouts) == 9


def test_loss_is_advantage_weighted_logprob_over_valid_tokens(tok):
    model = tiny_model(tok.vocab_size)
    rollouts = scripted_rollouts(tok)
    inputs, targets, adv = policy_batch(rollouts, tok.encode_special("assistant_end"))
    num_valid = 9
    loss = policy_gradient_loss(model, inputs, targets, adv, num_valid)
    with torch.no_grad():
        logp = F.log_softmax(model(inputs), dim=-1)  # (B, T, V)
    expected = 0.0
    for b in range(2):
        for t in range(targets.size(1)):
            if targets[b, t] >= 0:
                expected += adv[b].item() * logp[b, t, targets[b, t]].item()
    assert loss.item() == pytest.approx(-expected / num_valid, rel=1e-5)
    # Normalised by the step's valid-token count (e.g. over all ranks), not by this batch's.
    assert policy_gradient_loss(model, inputs, targets, adv, 3 * num_valid).item() == pytest.approx(loss.item() / 3,
                                                                                                    rel=1e-5)
    # A zero-advantage row adds nothing, whatever its tokens.
    row0 = policy_gradient_loss(model, inputs[:1], targets[:1], adv[:1], num_valid)
    assert policy_gradient_loss(model, inputs, targets, torch.tensor([0.5, 0.0]), num_valid).item() == \
        pytest.approx(row0.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_rollouts_report_forced_tool_tokens(tok):
    """Through the real engine: the calculator output the engine forced gets mask 0, then -1 targets."""
    before, after = tool_script(tok, "6*7", " so the answer is 42.")
    args = SimpleNamespace(seed=0, num_samples=3, device_batch_size=2, temperature=1.0, top_k=50)
    policy = PolicyGradientStep(args, ScriptedModel(tok, before, after), tok, [None], Dist(), torch.float32)
    prompt = [tok.bos_id, tok.encode_special("user_start"), *tok.encode("six times seven?"),
              tok.encode_special("user_end"), tok.encode_special("assistant_start")]
    group = policy.sample_group(prompt, max_new_tokens=40)
    assert len(group) == 3
    sp = tok.encode_special
    forced = [sp("output_start"), *tok.encode("42"), sp("output_end")]
    for r in group:
        assert r.tokens[-1] == sp("assistant_end")  # the stop token is a trained action
        start = r.tokens.index(sp("output_start"))
        assert r.tokens[start:start + len(forced)] == forced
        assert r.mask[start:start + len(forced)] == [0] * len(forced)
        assert sum(r.mask) == len(r.tokens) - len(forced)
    _, targets, _ = policy_batch(group, sp("assistant_end"))
    assert int((targets >= 0).sum()) == sum(r.valid_tokens for r in group)
    assert not (targets == sp("output_start")).any() and not (targets == sp("output_end")).any()


def test_problem_order_is_a_permutation_per_epoch():
    order = ProblemOrder(10, seed=3)
    first, second = [order(k) for k in range(10)], [order(k) for k in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # a new order each epoch
    assert [ProblemOrder(10, seed=3)(k) for k in range(10)] == first


class CoinFlipProblems(ArithmeticProblems):
    """Arithmetic prompts with a reward a random tiny model can earn: an even-length answer."""

    def evaluate(self, conversation, response):
        return len(response_text(response)) % 2 == 0


def test_rl_resume_is_bit_exact(picochat_home, monkeypatch):
    save_tiny_checkpoint("sft", "tiny", sequence_len=160)
    monkeypatch.setattr(rl, "load_train_task", lambda source, size: CoinFlipProblems("train", size=size))
    args = ["rl", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-problems", "0", "--num-steps", "4",
            "--save-every", "2", "--keep-last", "5"]
    assert main(args + ["--tag", "straight"]) == 0
    assert main(args + ["--tag", "cut"]) == 0
    shutil.rmtree(ckpt.run_dir("rl", "cut") / "step_4")  # as if the run stopped after step 2
    assert main(args + ["--tag", "cut", "--resume"]) == 0

    def weights(tag):
        return load_file(str(ckpt.run_dir("rl", tag) / "step_4" / "model.safetensors"))

    def records(tag):
        lines = (picochat_home / "logs" / f"rl-{tag}.jsonl").read_text().splitlines()
        return {r["step"]: (r["reward"], r["loss"], r["supervised_tokens"]) for r in map(json.loads, lines)
                if "loss" in r}

    a, b = weights("straight"), weights("cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert records("straight") == records("cut")
    assert any(loss != 0.0 for _, loss, _ in records("straight").values())  # it did learn something
    start = load_file(str(ckpt.run_dir("sft", "tiny") / "step_1" / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in a)
    meta = json.loads((ckpt.run_dir("rl", "straight") / "step_4" / "meta.json").read_text())
    assert meta["stage"] == "rl" and meta["step"] == 4 and meta["start_from"].endswith("sft/tiny/step_1")


def test_rl_errors_are_messages(picochat_home, capsys):
    assert main(["rl", "--preset", "cpu-tiny"]) == 2
    assert "no sft checkpoint" in capsys.readouterr().err
    save_tiny_checkpoint("sft", "tiny")
    assert main(["rl", "--preset", "cpu-tiny", "--examples-per-step", "0"]) == 2
    assert "--examples-per-step must be >= 1" in capsys.readouterr().err
    # One sample per problem, or greedy samples (all alike), give every completion advantage 0: nothing to learn.
    assert main(["rl", "--preset", "cpu-tiny", "--num-samples", "1"]) == 2
    assert "--num-samples must be >= 2, got 1" in capsys.readouterr().err
    assert main(["rl", "--preset", "cpu-tiny", "--temperature", "0"]) == 2
    assert "--temperature must be >= 1e-05, got 0.0" in capsys.readouterr().err


def test_one_sample_per_problem_is_refused_from_a_preset_too(monkeypatch):
    """The minimum holds wherever the value comes from: a preset's rl section is checked as a flag is,
    and no shipped preset samples fewer than 2 completions per problem."""
    from picochat.config import PRESETS
    from picochat.errors import ConfigError

    monkeypatch.setitem(PRESETS, "one-sample", {"rl": {"num_samples": 1}})
    with pytest.raises(ConfigError) as e:
        rl.RLConfig.defaults(preset="one-sample")
    assert str(e.value) == "--num-samples must be >= 2, got 1"
    assert all(rl.RLConfig.defaults(preset=name).num_samples >= 2 for name in PRESETS if name != "one-sample")


RL_ARGS = ["rl", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-problems", "0", "--num-steps", "4"]


def test_rl_nonfinite_loss_skips_the_update_saves_and_stops(picochat_home, monkeypatch, capsys):
    """The Trainer's guard covers RL: a NaN at step 2 is never applied, the state before it is saved."""
    save_tiny_checkpoint("sft", "tiny", sequence_len=160)
    monkeypatch.setattr(rl, "load_train_task", lambda source, size: CoinFlipProblems("train", size=size))
    step_fn = rl.PolicyGradientStep.__call__

    def poisoned(self, step):
        work = step_fn(self, step)
        if step == 2:  # NaN gradients too: had the update been applied, the weights would be NaN
            work.loss = float("nan")
            next(self.model.parameters()).grad.fill_(float("nan"))
        return work

    monkeypatch.setattr(rl.PolicyGradientStep, "__call__", poisoned)
    assert main(RL_ARGS + ["--tag", "nan", "--save-every", "-1"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "at step 2" in err and "--resume" in err
    assert ckpt.list_steps(ckpt.run_dir("rl", "nan")) == [2]
    weights = load_file(str(ckpt.run_dir("rl", "nan") / "step_2" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def rl_rank(rank: int, world: int, port: int, home: str) -> None:
    """One rank of `picochat rl` on gloo; it leaves its final weights in rank<r>.pt."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    rl.load_train_task = lambda source, size: CoinFlipProblems("train", size=size)

    class KeepWeights(rl.Trainer):
        def run(self):
            result = super().run()
            torch.save(dict(self.model.state_dict()), Path(home) / f"rank{self.world.rank}.pt")
            return result

    rl.Trainer = KeepWeights
    if main(RL_ARGS + ["--tag", "two", "--examples-per-step", "4", "--save-every", "2"]) != 0:
        raise SystemExit(f"rank {rank} failed")


def test_rl_on_two_gloo_ranks_runs_and_the_ranks_agree(picochat_home):
    save_tiny_checkpoint("sft", "tiny", sequence_len=160)
    mp.start_processes(rl_rank, args=(2, free_port(), str(picochat_home)), nprocs=2, start_method="spawn")
    a, b = (torch.load(picochat_home / f"rank{r}.pt") for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = load_file(str(ckpt.run_dir("rl", "two") / "step_4" / "model.safetensors"))
    start = load_file(str(ckpt.run_dir("sft", "tiny") / "step_1" / "model.safetensors"))
    assert all(torch.equal(saved[k], a[k]) for k in saved)
    assert any(not torch.equal(start[k], saved[k]) for k in saved)  # it trained
    assert ckpt.list_steps(ckpt.run_dir("rl", "two")) == [2, 4]
    records = [json.loads(line) for line in (picochat_home / "logs" / "rl-two.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0.0 <= r["reward"] <= 1.0 and r["supervised_tokens"] > 0 for r in records)
    meta = json.loads((ckpt.run_dir("rl", "two") / "step_4" / "meta.json").read_text())
    assert meta["world_size"] == 2



def test_step_tokens_are_the_inputs_the_forward_sees(tok, monkeypatch):
    """StepWork.tokens (tok/s, MFU) counts the real input tokens of the policy forward: each row's
    prompt + completion but its last token, which is only a target (as SFT's padded rows count)."""
    model = tiny_model(tok.vocab_size).train()
    args = SimpleNamespace(seed=0, num_samples=2, device_batch_size=2, examples_per_step=1)
    policy = PolicyGradientStep(args, model, tok, [None], Dist(), torch.float32)
    rollouts = scripted_rollouts(tok)
    monkeypatch.setattr(policy, "rollouts", lambda step: rollouts)
    inputs, _, _ = policy_batch(rollouts, tok.encode_special("assistant_end"))
    rows = [len(r.prompt) + len(r.tokens) - 1 for r in rollouts]  # row i fills inputs[i, :rows[i]], then padding
    assert inputs.size(1) == max(rows)
    assert policy(0).tokens == sum(rows)
