"""`picochat rl`: reinforcement learning on math word problems (GRPO-style policy gradient).

    picochat rl --preset cpu                        # a few minutes on a laptop, offline
    picochat rl --source hf                         # GSM8K train (downloaded from the hub)
    torchrun --standalone --nproc_per_node=8 -m picochat rl --source hf

Starting from the sft checkpoint, each step:
1. takes `--examples-per-step` problems (split over the ranks, in a seeded order that is a pure
   function of the step, so resuming needs no data state);
2. samples `--num-samples` completions per problem with the Engine (temperature 1.0, top-k 50,
   calculator tool live), drawing each engine seed from this rank's sampling generator;
3. rewards each completion 1 if the task's `evaluate` says its final answer is right, else 0;
   advantage = reward - mean reward of the problem's group (no division by the std);
4. loss = -sum(advantage * log p(token)) over the *valid* tokens / number of valid tokens in the
   step on all ranks (token-level normalisation). Valid = sampled by the model: the prompt, the
   tool outputs the engine forced in (`<|output_start|> ... <|output_end|>`, reported by the
   engine with mask 0) and the padding get zero weight. Completions with zero advantage add no
   gradient, so their forward/backward is skipped (their tokens still count in the normaliser).

LR: `--init-lr-frac` (0.05) of the base LRs, linearly to 0 over the run; optimisers from
`build_optimizers`. Every `--eval-every` steps: pass@1 and pass@k on `--eval-problems` held-out
test problems. The loop is the shared `Trainer` (step lines, metrics log, wandb, checkpoints,
`--resume`, Ctrl-C, the non-finite guard); RL hands it `PolicyGradientStep`, whose state (the
generator that draws the engine seeds) is saved per rank, so `--resume` continues exactly.
Before the weights load, the plan's memory estimate must fit the device (`check_memory`;
`--no-plan-check` skips it), as in the other training stages.

Data: `--source hf` trains on GSM8K train and evaluates on GSM8K test. Offline there is no GSM8K
train split in any registry package, and training on GSM8K test would void the GSM8K score, so
offline RL trains on generated arithmetic word problems in GSM8K format
(`load_task("arithmetic", "train")`, `--train-size` of them) and evaluates on the arithmetic
test split; `picochat chat-eval` then measures GSM8K test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from picochat.checkpoint import load_checkpoint_dir
from picochat.config import add_preset_argument, option
from picochat.data.chat_batches import sft_collate
from picochat.errors import ConfigError
from picochat.eval.chat_eval import completion_parts, evaluate_generative, spread_subset
from picochat.infer import Engine
from picochat.infer.sampling import GREEDY_BELOW
from picochat.model.gpt import GPTConfig
from picochat.optim import build_optimizers
from picochat.optim.distributed import broadcast_parameters
from picochat.plan import Shape, check_fits
from picochat.runtime import log0, pick_training_dtype
from picochat.tasks import load_task
from picochat.train.chat_stage import find_parent, stage_world
from picochat.train.loop import LoopConfig, StepWork, Trainer, all_reduced, wandb_logger
from picochat.train.options import OPTIM, RUN, SAVE, ParentOptions, StageOptions
from picochat.train.schedules import linear_to_zero


# ---- rollouts, advantages, loss (pure pieces, tested on scripted batches) --------------------------
@dataclass
class Rollout:
    """One sampled completion: prompt ids, generated ids (incl. the final stop token), the engine's
    masks (1 sampled, 0 forced tool output), reward and advantage."""

    prompt: list[int]
    tokens: list[int]
    mask: list[int]
    reward: float = 0.0
    advantage: float = 0.0

    @property
    def valid_tokens(self) -> int:
        return sum(self.mask)


def group_advantages(rewards: list[float]) -> list[float]:
    """reward - mean reward of the group (GRPO without std normalisation)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def policy_batch(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (B, T), targets (B, T) with -1 on prompt / forced / padding, advantages (B,))."""
    rows = [(r.prompt + r.tokens, [0] * len(r.prompt) + r.mask) for r in rollouts]
    return *sft_collate(rows, pad_id), torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         num_valid_tokens: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-sum(advantage * log p(target)) over valid targets, divided by `num_valid_tokens`."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        nll = model(inputs, targets, loss_reduction="none")  # (B, T) of -log p, 0 where target == -1
    return (nll.float() * advantages.to(device)[:, None]).sum() / max(1, num_valid_tokens)


def grade(task, conversation: dict, rollouts: list[Rollout], tokenizer) -> None:
    """Set each rollout's reward (task.evaluate on its parts) and its group advantage."""
    stops = {tokenizer.encode_special("assistant_end"), tokenizer.bos_id}
    for r in rollouts:
        parts = completion_parts(tokenizer, [t for t in r.tokens if t not in stops])
        r.reward = float(bool(task.evaluate(conversation, parts)))
    for r, a in zip(rollouts, group_advantages([r.reward for r in rollouts])):
        r.advantage = a


# ---- data -----------------------------------------------------------------------------------------
def load_train_task(source: str, train_size: int):
    # Never GSM8K test offline: see the module docstring.
    return (load_task("gsm8k", "train", source="hf") if source == "hf"
            else load_task("arithmetic", "train", size=train_size))


class ProblemOrder:
    """Global example k -> task row: epoch k // n walks a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[pos]


# ---- the run --------------------------------------------------------------------------------------
DATA, ROLL = "data", "rollouts"


@dataclass
class RLConfig(ParentOptions, StageOptions):
    """Every setting of RL; `picochat rl --help` lists them as flags. A preset's "rl" section alone applies."""

    SECTION: ClassVar[str | None] = "rl"
    SECTION_ONLY: ClassVar[bool] = True

    from_stage: str = option("sft", "checkpoint to start from", group="start from", choices=("sft", "mid"))
    source: str = option("offline", "offline: generated arithmetic problems (GSM8K format); hf: GSM8K train",
                         group=DATA, choices=("offline", "hf"))
    train_size: int = option(7473, "offline: number of generated training problems", group=DATA, minimum=1)
    num_steps: int = option(-1, "optimiser steps (<=0: one pass over the problems)", group=ROLL)
    examples_per_step: int = option(16, "problems per step, all ranks", group=ROLL, minimum=1)
    num_samples: int = option(16, "completions per problem (at least 2: each is scored against its group's mean)",
                              group=ROLL, minimum=2)
    max_new_tokens: int = option(256, "tokens per completion", group=ROLL, minimum=1)
    temperature: float = option(1.0, "sampling temperature (above 0: greedy samples of a problem are all alike and "
                                "teach nothing)", group=ROLL, minimum=GREEDY_BELOW)
    top_k: int = option(50, "sample among the k most likely tokens", group=ROLL)
    device_batch_size: int = option(8, "rows per sampling batch and per forward/backward", group=ROLL, minimum=1)
    init_lr_frac: float = option(0.05, "LR at step 0 as a fraction of the base LRs", group=OPTIM)
    eval_every: int = option(60, "pass@k eval every N steps (<=0: at the end only)", group=SAVE)
    eval_problems: int = option(400, "held-out test problems per eval, 0 = no eval", group=SAVE)
    eval_samples: int = option(8, "samples per eval problem, the k of pass@k", group=SAVE)
    save_every: int = option(60, "checkpoint every N steps (<=0: at the end only)", group=SAVE)
    tag: str | None = option(None, "run name under checkpoints/rl/ (default: the start checkpoint's tag)",
                             group=SAVE)
    no_plan_check: bool = option(False, "start even if the memory estimate says the run does not fit", group=RUN,
                                 store_true=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p)
    RLConfig.add_arguments(p)


def _check(cfg: RLConfig, world_size: int) -> None:
    if cfg.eval_problems > 0 and cfg.eval_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1, got {cfg.eval_samples} (or set --eval-problems 0)")
    if cfg.examples_per_step % world_size:
        raise ConfigError(f"--examples-per-step {cfg.examples_per_step} must be a multiple of the "
                          f"{world_size} processes")


def check_memory(cfg: RLConfig, world, dtype: torch.dtype, start_from: Path) -> None:
    """The plan's estimate for RL must fit this device, checked on the starting checkpoint's config.json
    before its weights load (unless --no-plan-check); else a one-line error naming --device-batch-size.

    The policy-gradient forward/backward runs eager, `--device-batch-size` rows of up to the context
    (prompt + completion are fitted to it), with Muon + AdamW state as the other stages; the rows
    accumulate into the gradients when a rank has more per step than one batch. Between steps the
    Engine samples min(--device-batch-size, --num-samples) rows at once, the eval --eval-samples rows,
    each with a compute-dtype copy of the weights and a KV cache (picochat.plan.sampling_memory).
    The batches suggested: 1 up to a rank's rows per step (--examples-per-step / processes x
    --num-samples); a larger batch changes nothing, and is estimated as given.
    """
    if cfg.no_plan_check or not (start_from / "config.json").exists():
        return
    config = GPTConfig.from_dict(json.loads((start_from / "config.json").read_text()))
    rows = cfg.examples_per_step // world.world_size * cfg.num_samples  # a rank's rollouts per step
    eval_rows = cfg.eval_samples if cfg.eval_problems > 0 else 0
    shape = Shape.from_config(config, cfg.device_batch_size, world_size=world.world_size, bf16=dtype != torch.float32,
                              total_batch_tokens=cfg.examples_per_step * cfg.num_samples * config.sequence_len,
                              sample_group=cfg.num_samples, eval_rows=eval_rows)
    check_fits(shape, world.device, "--device-batch-size", list(range(1, rows + 1)))


class PolicyGradientStep:
    """RL's step for the Trainer: this rank's rollouts, sampled through the Engine and graded, then
    the policy-gradient backward. Its state, the generator that draws the engine seeds, is per rank."""

    def __init__(self, cfg: RLConfig, model, tokenizer, task, world, compute_dtype: torch.dtype):
        self.cfg, self.model, self.tokenizer, self.task, self.world = cfg, model, tokenizer, task, world
        self.compute_dtype = compute_dtype
        self.engine = Engine(model, tokenizer, compute_dtype=compute_dtype)
        self.order = ProblemOrder(len(task), cfg.seed)
        self.sampler = torch.Generator().manual_seed(cfg.seed * 1_000_003 + world.rank)  # engine seeds
        self.pad_id = tokenizer.encode_special("assistant_end")

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_state(state["sampler"])

    def reshard_state(self, states: list[dict]) -> dict:
        """At another world size this rank keeps the sampling stream it was built with."""
        return self.state_dict()

    def sample_group(self, prompt: list[int], max_new_tokens: int) -> list[Rollout]:
        """`--num-samples` completions of `prompt`, `--device-batch-size` rows per engine call (one seed each)."""
        a, group = self.cfg, []
        while len(group) < a.num_samples:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.sampler))
            tokens, masks = self.engine.generate_batch(prompt, min(a.device_batch_size, a.num_samples - len(group)),
                                                       keep_stop=True, max_tokens=max_new_tokens,
                                                       temperature=a.temperature, top_k=a.top_k, seed=seed)
            group += [Rollout(list(prompt), t, m) for t, m in zip(tokens, masks)]
        return group

    def rollouts(self, step: int) -> list[Rollout]:
        """This rank's rollouts for `step`, graded, with advantages."""
        a, w = self.cfg, self.world
        out: list[Rollout] = []
        for j in range(a.examples_per_step // w.world_size):
            conversation = self.task[self.order(step * a.examples_per_step + w.rank + j * w.world_size)]
            # Fitted to the context here, as the engine would, so prompt + completion always fits a forward.
            prompt, max_new = self.engine.fit_prompt(self.tokenizer.render_for_completion(conversation),
                                                     a.max_new_tokens)
            group = self.sample_group(prompt, max_new)
            grade(self.task, conversation, group, self.tokenizer)
            out += group
        return out

    def __call__(self, step: int) -> StepWork:
        t0 = time.time()
        rollouts = self.rollouts(step)
        sample_s = time.time() - t0
        rewards, n = [r.reward for r in rollouts], self.cfg.num_samples
        groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
        valid = sum(r.valid_tokens for r in rollouts)
        # Summed over the ranks: the loss is over all ranks' valid tokens.
        total_valid, reward_sum, n_rollouts, solved, n_groups, gen_tokens = all_reduced(
            [valid, sum(rewards), len(rewards), sum(any(g) for g in groups), len(groups),
             sum(len(r.tokens) for r in rollouts)], self.world, self.engine.device)
        learning = [r for r in rollouts if r.advantage != 0.0]  # the others add no gradient
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for i in range(0, len(learning), self.cfg.device_batch_size):
            inputs, targets, adv = policy_batch(learning[i : i + self.cfg.device_batch_size], self.pad_id)
            loss = policy_gradient_loss(self.model, inputs.to(self.engine.device), targets.to(self.engine.device),
                                        adv, int(total_valid), self.compute_dtype)
            # The gradient sync averages over ranks; scaled so the result is the sum over all ranks.
            (loss * self.world.world_size).backward()
            loss_sum += loss.detach().double()
        for p in self.model.parameters():  # a rank with nothing to learn still steps (zero gradient)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Real input tokens of the forwards: a row's ids but the last (only a target), as SFT counts them.
        return StepWork(loss=loss_sum.item(), tokens=sum(len(r.prompt) + len(r.tokens) - 1 for r in learning),
                        supervised_tokens=valid,
                        record={"reward": reward_sum / n_rollouts, "solved": solved / n_groups,
                                "mean_length": gen_tokens / n_rollouts, "sample_s": sample_s})


def run(args: argparse.Namespace) -> int:
    cfg = RLConfig.from_args(args)
    with stage_world(cfg) as world:
        _check(cfg, world.world_size)
        start_from = find_parent(cfg, world)  # chosen once, on rank 0
        dtype = pick_training_dtype(world.device, cfg.dtype)
        check_memory(cfg, world, dtype, start_from)
        model, tokenizer, parent_meta = load_checkpoint_dir(start_from, world.device)
        broadcast_parameters(model)
        tag = cfg.tag or start_from.parent.name
        train_task = load_train_task(cfg.source, cfg.train_size)
        num_steps = cfg.num_steps if cfg.num_steps > 0 else len(train_task) // cfg.examples_per_step
        if num_steps < 1:
            raise ConfigError(f"{len(train_task)} problems make no step of --examples-per-step "
                              f"{cfg.examples_per_step}; lower it or raise --train-size")
        policy = PolicyGradientStep(cfg, model, tokenizer, train_task, world, dtype)
        muon = cfg.muon_options(parent_meta)
        optimizers = build_optimizers(model, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                      unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay, world=world,
                                      muon_options=muon)
        loop_cfg = LoopConfig(stage="rl", tag=tag, num_iterations=num_steps, grad_accum_steps=1, tokens_per_step=0,
                              eval_every=cfg.eval_every, save_every=cfg.save_every,
                              save_every_minutes=cfg.save_every_minutes, keep_last=cfg.keep_last)
        run_meta = {"start_from": str(start_from), "train_task": train_task.name,
                    "args": cfg.to_dict(), "muon": dataclasses.asdict(muon)}
        trainer = Trainer(model, optimizers, None, loop_cfg, world, tokenizer, compute_dtype=dtype, run_meta=run_meta,
                          lr_multiplier=lambda s, n: linear_to_zero(s, n, init_frac=cfg.init_lr_frac),
                          evaluate=pass_at_k(cfg, policy.engine, world) if cfg.eval_problems > 0 else None,
                          on_log=wandb_logger(cfg.wandb, "rl", cfg.to_dict()) if world.is_main else None,
                          step_fn=policy, parts={"rollouts": policy})
        log0(f"rl: {num_steps} steps x {cfg.examples_per_step} problems x {cfg.num_samples} samples "
             f"from {train_task.name} | start {start_from} | world {world.world_size}")
        trainer.resume_and_run(cfg.resume)
        return 0


def pass_at_k(cfg: RLConfig, engine: Engine, world):
    """The Trainer's eval: pass@1 and pass@k on `--eval-problems` held-out problems."""
    task = (spread_subset(load_task("gsm8k", "test", source="hf"), cfg.eval_problems) if cfg.source == "hf"
            else load_task("arithmetic", "test", size=cfg.eval_problems))

    def evaluate(model, step: int) -> dict:
        r = evaluate_generative(engine, engine.tokenizer, task, num_samples=cfg.eval_samples,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                seed=cfg.seed, rank=world.rank, world_size=world.world_size,
                                desc=f"eval step {step}")
        return {"pass@1": r["pass@1"], f"pass@{cfg.eval_samples}": r["pass@k"]}

    return evaluate
