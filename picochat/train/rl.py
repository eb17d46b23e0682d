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
test problems. Checkpoints under checkpoints/rl/<tag>/ with optimiser, RNG and sampling-generator
state, so `--resume` continues exactly.

Data: `--source hf` trains on GSM8K train and evaluates on GSM8K test. Offline there is no GSM8K
train split in any registry package, and training on GSM8K test would void the GSM8K score, so
offline RL trains on generated arithmetic word problems in GSM8K format
(`load_task("arithmetic", "train")`, `--train-size` of them) and evaluates on the arithmetic
test split; `picochat chat-eval` then measures GSM8K test.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt
from picochat.config import add_preset_argument, resolve
from picochat.errors import ConfigError
from picochat.runtime import log0

DEFAULTS = {
    "num_steps": -1, "examples_per_step": 16, "num_samples": 16, "max_new_tokens": 256,
    "temperature": 1.0, "top_k": 50, "device_batch_size": 8, "train_size": 7473,
    "matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004, "weight_decay": 0.0, "init_lr_frac": 0.05,
    "eval_every": 60, "eval_problems": 400, "eval_samples": 8, "save_every": 60, "keep_last": 2,
}

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
    from picochat.data.chat_batches import sft_collate

    rows = [(r.prompt + r.tokens, [0] * len(r.prompt) + r.mask) for r in rollouts]
    inputs, targets = sft_collate(rows, pad_id)
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    return inputs, targets, advantages


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         num_valid_tokens: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-sum(advantage * log p(target)) over valid targets, divided by `num_valid_tokens`."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        nll = model(inputs, targets, loss_reduction="none")  # (B, T), 0 where target == -1
    logp = -nll.float()
    objective = (logp * advantages.to(device)[:, None]).sum()
    return -objective / max(1, num_valid_tokens)


def sample_rollouts(engine, prompt: list[int], num_samples: int, batch_size: int, max_new_tokens: int,
                    temperature: float, top_k: int | None, seeds: list[int]) -> list[Rollout]:
    """`num_samples` completions of `prompt`, sampled `batch_size` rows at a time (one seed per batch)."""
    rollouts: list[Rollout] = []
    for seed in seeds:
        rows = min(batch_size, num_samples - len(rollouts))
        tokens: list[list[int]] = [[] for _ in range(rows)]
        masks: list[list[int]] = [[] for _ in range(rows)]
        for column, column_masks in engine.generate(prompt, num_samples=rows, max_tokens=max_new_tokens,
                                                    temperature=temperature, top_k=top_k, seed=seed):
            for i, token in enumerate(column):
                if token is not None:  # the stop token is kept: ending the answer is a sampled action
                    tokens[i].append(token)
                    masks[i].append(column_masks[i])
        rollouts += [Rollout(list(prompt), t, m) for t, m in zip(tokens, masks)]
    return rollouts


def grade(task, conversation: dict, rollouts: list[Rollout], tokenizer) -> None:
    """Set each rollout's reward (task.evaluate on its parts) and its group advantage."""
    from picochat.eval.chat_eval import completion_parts

    stops = {tokenizer.encode_special("assistant_end"), tokenizer.bos_id}
    for r in rollouts:
        parts = completion_parts(tokenizer, [t for t in r.tokens if t not in stops])
        r.reward = float(bool(task.evaluate(conversation, parts)))
    for r, a in zip(rollouts, group_advantages([r.reward for r in rollouts])):
        r.advantage = a


# ---- data -----------------------------------------------------------------------------------------
def load_train_task(source: str, train_size: int):
    from picochat.tasks import load_task

    if source == "hf":
        return load_task("gsm8k", "train", source="hf")
    return load_task("arithmetic", "train", size=train_size)  # never GSM8K test: see the module docstring


def load_eval_task(source: str, eval_problems: int):
    from picochat.eval.chat_eval import spread_subset
    from picochat.tasks import load_task

    if source == "hf":
        return spread_subset(load_task("gsm8k", "test", source="hf"), eval_problems)
    return load_task("arithmetic", "test", size=eval_problems)


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
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p)
    g = p.add_argument_group("start and data")
    g.add_argument("--from-stage", choices=["sft", "mid"], default="sft", help="checkpoint to start from (default sft)")
    g.add_argument("--from-tag", default=None, help="tag of that checkpoint (default: the newest)")
    g.add_argument("--from-step", type=int, default=None, help="step of that checkpoint (default: the newest)")
    g.add_argument("--source", choices=["offline", "hf"], default="offline",
                   help="offline: generated arithmetic problems (GSM8K format); hf: GSM8K train")
    g.add_argument("--train-size", type=int, help="offline: number of generated training problems (default 7473)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--num-steps", type=int, help="optimiser steps (default: one pass over the problems)")
    g.add_argument("--examples-per-step", type=int, help="problems per step, all ranks (default 16)")
    g.add_argument("--num-samples", type=int, help="completions per problem (default 16)")
    g.add_argument("--max-new-tokens", type=int, help="tokens per completion (default 256)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 50)")
    g.add_argument("--device-batch-size", type=int, help="rows per sampling batch and per forward/backward (default 8)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--matrix-lr", type=float, help="Muon base LR (default 0.02)")
    g.add_argument("--embedding-lr", type=float, help="AdamW base LR of the embedding (default 0.2)")
    g.add_argument("--unembedding-lr", type=float, help="AdamW base LR of lm_head (default 0.004)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--init-lr-frac", type=float, help="LR at step 0 as a fraction of the base LRs (default 0.05)")
    g = p.add_argument_group("eval and checkpoints")
    g.add_argument("--eval-every", type=int, help="pass@k eval every N steps (<=0: at the end only; default 60)")
    g.add_argument("--eval-problems", type=int, help="held-out test problems per eval, 0 = no eval (default 400)")
    g.add_argument("--eval-samples", type=int, help="samples per eval problem, the k of pass@k (default 8)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (<=0: at the end only; default 60)")
    g.add_argument("--keep-last", type=int, help="keep this many newest checkpoints (default 2)")
    g.add_argument("--tag", default=None, help="run name under checkpoints/rl/ (default: the start checkpoint's tag)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --tag")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp32")
    g.add_argument("--seed", type=int, default=42, help="seed of the problem order and the sampling")


def _check(args: argparse.Namespace, world_size: int) -> None:
    for name in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size", "train_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_problems > 0 and args.eval_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1, got {args.eval_samples} (or set --eval-problems 0)")
    if args.examples_per_step % world_size:
        raise ConfigError(f"--examples-per-step {args.examples_per_step} must be a multiple of the "
                          f"{world_size} processes")


class RLRun:
    """The RL loop: state (step, optimisers, RNG, sampling generator), one step, eval, save, resume."""

    def __init__(self, args, model, tokenizer, world, compute_dtype, start_from: Path):
        from picochat.infer import Engine
        from picochat.optim import build_optimizers

        self.args, self.model, self.tokenizer, self.world = args, model, tokenizer, world
        self.compute_dtype = compute_dtype
        self.start_from = start_from
        self.engine = Engine(model, tokenizer, compute_dtype=compute_dtype)
        self.optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                           unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay,
                                           world=world)
        self.train_task = load_train_task(args.source, args.train_size)
        self.eval_task = load_eval_task(args.source, args.eval_problems) if args.eval_problems > 0 else None
        self.order = ProblemOrder(len(self.train_task), args.seed)
        self.num_steps = args.num_steps if args.num_steps > 0 else len(self.train_task) // args.examples_per_step
        if self.num_steps < 1:
            raise ConfigError(f"{len(self.train_task)} problems make no step of --examples-per-step "
                              f"{args.examples_per_step}; lower it or raise --train-size")
        self.sampler = torch.Generator().manual_seed(args.seed * 1_000_003 + world.rank)  # engine seeds
        self.pad_id = tokenizer.encode_special("assistant_end")
        self.step = 0
        self.metrics: dict = {}
        self.tag = args.tag
        self.run_dir = ckpt.run_dir("rl", self.tag)
        self.log_path = ckpt.checkpoints_root().parent / "logs" / f"rl-{self.tag}.jsonl"

    # ---- one step ------------------------------------------------------------------------------
    def _lr_multiplier(self, step: int) -> float:
        from picochat.train.schedules import linear_to_zero

        return linear_to_zero(step, self.num_steps, init_frac=self.args.init_lr_frac)

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.sampler))

    def rollouts(self, step: int) -> list[Rollout]:
        """This rank's rollouts for `step`, graded, with advantages."""
        a, w = self.args, self.world
        out: list[Rollout] = []
        per_rank = a.examples_per_step // w.world_size
        for j in range(per_rank):
            row = self.order(step * a.examples_per_step + w.rank + j * w.world_size)
            conversation = self.train_task[row]
            # Fitted to the context here, as the engine would, so prompt + completion always fits a forward.
            prompt, max_new = self.engine.fit_prompt(self.tokenizer.render_for_completion(conversation),
                                                     a.max_new_tokens)
            seeds = [self._draw_seed() for _ in range(-(-a.num_samples // a.device_batch_size))]
            group = sample_rollouts(self.engine, prompt, a.num_samples, a.device_batch_size, max_new,
                                    a.temperature, a.top_k, seeds)
            grade(self.train_task, conversation, group, self.tokenizer)
            out += group
        return out

    def train_step(self, step: int) -> dict:
        from picochat.optim.distributed import sync_gradients

        lrm = self._lr_multiplier(step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        t0 = time.time()
        rollouts = self.rollouts(step)
        t_sample = time.time() - t0
        valid = sum(r.valid_tokens for r in rollouts)
        rewards = [r.reward for r in rollouts]
        groups = [rewards[i : i + self.args.num_samples] for i in range(0, len(rewards), self.args.num_samples)]
        stats = self._sum([float(valid), sum(rewards), float(len(rewards)), float(sum(any(g) for g in groups)),
                           float(len(groups)), float(sum(len(r.tokens) for r in rollouts))])
        total_valid, reward_sum, n_rollouts, solved, n_groups, gen_tokens = stats
        learning = [r for r in rollouts if r.advantage != 0.0]
        loss_sum = 0.0
        for i in range(0, len(learning), self.args.device_batch_size):
            inputs, targets, adv = policy_batch(learning[i : i + self.args.device_batch_size], self.pad_id)
            dev = self.engine.device
            loss = policy_gradient_loss(self.model, inputs.to(dev), targets.to(dev), adv, int(total_valid),
                                        self.compute_dtype)
            # sync_gradients averages over ranks; scale so the result is the sum over all ranks.
            (loss * self.world.world_size).backward()
            loss_sum += loss.item()
        for p in self.model.parameters():  # a rank with nothing to learn still steps (zero gradient)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sync_gradients(self.model)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        (loss_sum,) = self._sum([loss_sum])
        return {"step": step + 1, "loss": loss_sum, "reward": reward_sum / n_rollouts, "solved": solved / n_groups,
                "valid_tokens": int(total_valid), "mean_length": gen_tokens / n_rollouts, "lrm": lrm,
                "dt": time.time() - t0, "sample_s": t_sample}

    def _sum(self, values: list[float]) -> list[float]:
        if not self.world.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- eval, save, resume --------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        from picochat.eval.chat_eval import evaluate_generative

        a = self.args
        r = evaluate_generative(self.engine, self.tokenizer, self.eval_task, num_samples=a.eval_samples,
                                max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                seed=a.seed, rank=self.world.rank, world_size=self.world.world_size,
                                desc=f"eval step {step}")
        return {"pass@1": r["pass@1"], f"pass@{a.eval_samples}": r["pass@k"]}

    def state_dict(self) -> dict:
        from picochat.train.loop import _gather, _rng_state

        return {"step": self.step, "optimizers": [o.state_dict() for o in self.optimizers],
                "metrics": self.metrics, "world_size": self.world.world_size,
                "per_rank": _gather({"rng": _rng_state(), "sampler": self.sampler.get_state()}, self.world)}

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.world.is_main:
            args = {k: v for k, v in vars(self.args).items() if not k.startswith("_")}
            meta = {"stage": "rl", "tag": self.tag, "num_steps": self.num_steps, "metrics": self.metrics,
                    "world_size": self.world.world_size, "start_from": str(self.start_from), "args": args,
                    "train_task": self.train_task.name}
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, meta, state,
                                           keep_last=self.args.keep_last)
            log0(f"saved {path}")
        if self.world.enabled:
            dist.barrier()

    def resume(self) -> None:
        from safetensors.torch import load_file

        from picochat.errors import DataError
        from picochat.train.loop import _set_rng_state

        steps = ckpt.list_steps(self.run_dir)
        if not steps:
            log0(f"--resume: no checkpoint under {self.run_dir} yet; starting from {self.start_from}")
            return
        path = self.run_dir / f"step_{steps[-1]}"
        state = ckpt.load_training_state(path)
        if state["world_size"] != self.world.world_size:
            raise DataError(f"{path} was saved by {state['world_size']} processes and this run has "
                            f"{self.world.world_size}; resume with the same number (sampling state is per rank)")
        weights = ckpt.clean_state_dict(load_file(str(path / "model.safetensors"), device=str(self.engine.device)))
        self.model.load_state_dict(weights)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        mine = state["per_rank"][self.world.rank]
        _set_rng_state(mine["rng"])
        self.sampler.set_state(mine["sampler"])
        self.step, self.metrics = state["step"], state["metrics"]
        log0(f"resumed from {path} at step {self.step}")

    def _log(self, record: dict) -> None:
        if self.world.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _maybe_eval(self, step: int, last: bool) -> None:
        every = self.args.eval_every
        if self.eval_task is None or not (last or (every > 0 and step % every == 0)):
            return
        results = self.evaluate(step)
        self.metrics.update(results)
        log0(f"step {step:5d} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
        self._log({"step": step, "eval": results})

    def run(self) -> dict:
        a = self.args
        log0(f"rl: {self.num_steps} steps x {a.examples_per_step} problems x {a.num_samples} samples "
              f"from {self.train_task.name} | start {self.start_from} | world {self.world.world_size}")
        while True:
            step = self.step
            last = step == self.num_steps
            self._maybe_eval(step, last)
            if last:
                self.save()
                return {"step": step, **self.metrics}
            record = self.train_step(step)
            self.step = step + 1
            log0(f"step {self.step:5d}/{self.num_steps} | reward {record['reward']:.3f} | solved "
                  f"{record['solved']:.3f} | len {record['mean_length']:.1f} | valid tok {record['valid_tokens']} | "
                  f"loss {record['loss']:+.5f} | lrm {record['lrm']:.4f} | dt {record['dt']:.2f}s "
                  f"(sampling {record['sample_s']:.2f}s)")
            self._log(record)
            if a.save_every > 0 and self.step % a.save_every == 0 and self.step != self.num_steps:
                self.save()


def run(args: argparse.Namespace) -> int:
    from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import init_distributed, pick_dtype, seed_everything, shutdown_distributed

    resolve(args, DEFAULTS, section="rl", section_only=True)
    world = init_distributed(args.device)
    try:
        _check(args, world.world_size)
        seed_everything(args.seed)
        start_from = find_checkpoint(args.from_stage, args.from_tag, args.from_step)
        model, tokenizer, _ = load_checkpoint_dir(start_from, world.device)
        broadcast_parameters(model)
        args.tag = args.tag or start_from.parent.name
        rl = RLRun(args, model, tokenizer, world, pick_dtype(world.device, args.dtype), start_from)
        if args.resume:
            rl.resume()
        result = rl.run()
        log0(f"done: {json.dumps(result)}")
        return 0
    finally:
        shutdown_distributed()
