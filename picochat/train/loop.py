"""The one training loop, shared by base, mid, SFT and RL training.

A stage hands the loop a batch source (or a step function, as RL does) and its stateful
parts, the LR schedule, the evals to run, where to save. The loop does gradient
accumulation, cross-rank gradient sync, the optimiser step with scheduled LR and
Muon momentum, one log line per step (and a JSON line in the metrics log),
periodic eval/sampling/checkpoints, exact resume, a clean Ctrl-C and the non-finite guard.

Definitions (logged): a *step* is one optimiser update over `grad_accum_steps`
micro-batches on every rank. The run has `num_iterations` steps; the loop runs
steps 0..num_iterations-1 and then evaluates and saves once more at
step == num_iterations.

Numbers in the step line: tok/s counts the tokens of every rank (for padded SFT rows the
real, non-pad tokens); MFU is those tokens' FLOP/s over world size * one device's peak;
mem is the largest peak memory of any rank so far (see `picochat.mfu.peak_memory_bytes`; the
other ranks' as of the step's backward, this process's after its optimiser step); eta is the
steps left at this process's mean step time plus the evals and samples still due (periodic and
final) at this process's mean time for each (a kind not yet timed here counts nothing; saves
are not counted). A step is timed (in the train time, the mean step time and the report's
throughput) unless it is one of this process's first WARMUP_STEPS or some rank compiled a graph in it.

Agreement across ranks: once per step, after the backward and before the optimiser step,
one all-reduce carries the Ctrl-C flag, the "a wall-clock save is due" flag, the
"my loss is not finite" flag, the "I traced a torch.compile graph" flag, the token counts and
loss shares to sum (the logged loss is the whole step's, over every rank) and each rank's peak
memory in a slot of its own. So a NaN on any rank skips the update on every rank, every rank
saves (a collective) and every rank stops with the same error, instead of one rank saving while
the others wait in another collective.

Time budget (`time_budget_s` > 0): the horizon is unknown at the start; the first steps run
with the schedule of an endless run (UNFIXED_HORIZON), their throughput is measured (at least
`budget_measure_steps` steps after the warm-up ones, and 3% of the budget), and the
horizon is then fixed (agreed as the minimum over ranks) so that the loop ends when the
budget is spent: its steps, and the periodic evals, samples and saves due before it at the time
they took so far (the final eval and save come on top). The fixed horizon is saved in every checkpoint,
so a resumed run keeps it and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import json
import math
import random
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt
from picochat.errors import ConfigError, DataError, UserError
from picochat.mfu import mfu_percent, peak_flops, peak_memory_bytes
from picochat.optim.sharded import shard_optimizers
from picochat.runtime import Dist, home, log0, seed_everything

LOSS_WEIGHTINGS = ("mean", "tokens")
WARMUP_STEPS = 3  # each process's first steps pay for warm-up and compilation: not in train time or step time
# (nor is a later step in which torch.compile traced a graph on some rank: a new SFT row width)
# The horizon the schedule sees while a time-budgeted run measures its throughput: far
# enough that no schedule has started its decay.
UNFIXED_HORIZON = 2**31


class _AllRanks:
    """An error every rank raises with the same message: the CLI prints it once per node."""

    all_ranks = True


class SharedHomeError(_AllRanks, ConfigError):
    """Ranks see different $PICOCHAT_HOME contents."""


class NonFiniteLossError(_AllRanks, UserError):
    """The loss was NaN or inf on some rank."""


class CheckpointSaveError(_AllRanks, DataError):
    """Rank 0 could not write a checkpoint."""


@dataclass
class LoopConfig:
    stage: str
    tag: str
    num_iterations: int
    grad_accum_steps: int
    tokens_per_step: int  # tokens of one step, all ranks (the report counts with it); 0: it varies (RL, SFT)
    eval_every: int = -1  # <= 0: only at the end
    sample_every: int = -1
    save_every: int = -1  # <= 0: only at the end
    save_every_minutes: float = -1.0  # > 0: also save when this much wall time passed since the last save
    keep_last: int = 2
    grad_clip: float = 0.0
    loss_weighting: Literal["mean", "tokens"] = "mean"  # mean: of micro-batch means; tokens: per supervised token
    grad_reduce_dtype: str = "fp32"  # dtype of the cross-rank gradient reduction: fp32 or bf16
    time_budget_s: float = -1.0  # > 0: the horizon comes from throughput (num_iterations is ignored)
    budget_measure_steps: int = 8  # timed steps measured before a time budget fixes the horizon,
    budget_measure_fraction: float = 0.03  # and at least this share of the budget spent in them

    def __post_init__(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting {self.loss_weighting!r} is unknown; choose one of "
                              f"{', '.join(LOSS_WEIGHTINGS)}")


def wandb_logger(run_name: str | None, project_stage: str, config: dict) -> Callable[[dict], None] | None:
    """A log hook sending each step record to Weights & Biases, or None when no run name is given."""
    if not run_name:
        return None
    try:
        import wandb  # optional dependency (pip install 'picochat[wandb]'), needed only with --wandb
    except ImportError as e:
        raise ConfigError("--wandb needs the wandb package: pip install 'picochat[wandb]'") from e
    run = wandb.init(project="picochat", name=run_name, group=project_stage,
                     config={k: v for k, v in config.items() if not k.startswith("_")})
    return lambda record: run.log({k: v for k, v in record.items() if k != "eval"} | record.get("eval", {}),
                                  step=record["step"])


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def from_main(value: Any, world: Dist) -> Any:
    """Rank 0's `value` on every rank (broadcast in a world > 1; what the other ranks pass is ignored)."""
    shared = [value]
    if world.enabled:
        dist.broadcast_object_list(shared)
    return shared[0]


def all_reduced(values: list[float], world: Dist, device: torch.device, op: Any = None) -> list:
    """`values` reduced element-wise over the ranks with `op` (default: the sum), in float64 on `device`
    (exact for integers below 2**53); `values` as they are in a world of 1."""
    if not world.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.tolist()


def verify_shared_home(world: Dist) -> None:
    """Every rank must see the same $PICOCHAT_HOME (a shared filesystem on many nodes).

    Rank 0 writes a random nonce file, every rank reads it back after a barrier, and the
    verdict is agreed by all-reduce, so a node with its own home fails at once on every
    rank with the same message instead of training on different checkpoints.
    """
    if not world.enabled:
        return
    nonce = from_main(secrets.token_hex(8) if world.is_main else None, world)
    probe = home() / ".world-check" / f"{nonce}.txt"
    if world.is_main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce)
    dist.barrier()
    try:
        seen = probe.read_text() == nonce
    except OSError:
        seen = False
    [bad] = all_reduced([0 if seen else 1], world, world.device)
    dist.barrier()  # everyone has read the probe before rank 0 removes it
    if world.is_main:
        probe.unlink(missing_ok=True)
    if bad:
        raise SharedHomeError(
            f"{int(bad)} of {world.world_size} processes do not see the file rank 0 wrote under "
            f"$PICOCHAT_HOME ({home()} on rank 0): every node needs the same PICOCHAT_HOME on a shared "
            "filesystem (checkpoints, data and the tokenizer are read from there)")


@dataclass
class StepWork:
    """What one step's forward and backward left on this rank (the gradients sit in .grad)."""

    loss: float  # this rank's share of the step's loss: the shares add up over the ranks
    tokens: int  # real (non-pad) input tokens of this rank
    supervised_tokens: int  # target tokens of this rank
    record: dict = field(default_factory=dict)  # more numbers for the step line and the metrics log


@dataclass
class StepOutcome(StepWork):
    """What one step produced, summed over the ranks (the loss: the step's, NaN if a share is), with the
    flags all ranks agreed on."""

    stop: bool = False  # Ctrl-C on some rank
    save_due: bool = False  # the wall-clock save interval passed on some rank
    nonfinite_ranks: int = 0  # ranks whose loss was NaN or inf
    peak_mem_bytes: int = 0  # the largest peak memory of any rank, as of the backward
    compiled: bool = False  # torch.compile traced a graph on some rank: the step paid for compiling it


def _graphs_traced() -> int:
    """Graphs torch.compile has traced in this process so far (none when it never ran)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def _due(every: int, start: int, end: int, skip_zero: bool = False) -> int:
    """How many steps k, start <= k < end, an eval (or sample) every `every` steps falls on
    (`skip_zero`: not on step 0)."""
    if every <= 0 or end <= start:
        return 0
    return -(-end // every) + (start // -every) - (1 if skip_zero and start == 0 else 0)


def _with_token_count(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, targets, real tokens): a padded batch says how many; otherwise every input counts."""
    return batch if len(batch) == 3 else (*batch, batch[0].numel())


def _finite_json(value: Any) -> Any:
    """`value` with every float that is not finite, however deeply nested, as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _gather(obj: Any, world: Dist) -> list:
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """Runs one stage's optimisation.

    `batches` yields (inputs, targets), or (inputs, targets, real_tokens) when rows are padded,
    and has state_dict(). A stage with its own step (RL) passes `step_fn(step) -> StepWork`
    instead, which runs the forward and backward; `parts` are more per-rank stateful parts
    (state_dict / load_state_dict), saved with every checkpoint under their names.
    `lr_multiplier(step, num_iterations)` and `momentum(step)` schedule
    the optimisers; `weight_decay_multiplier(step, num_iterations)` scales the decay of every group
    that carries `initial_weight_decay` (Muon's).
    """

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], batches,
                 config: LoopConfig, world: Dist, tokenizer, lr_multiplier: Callable[[int, int], float],
                 momentum: Callable[[int], float] | None = None,
                 evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
                 sample: Callable[[torch.nn.Module, int], None] | None = None,
                 compute_dtype: torch.dtype = torch.float32,
                 train_model: Callable[..., torch.Tensor] | None = None,
                 run_meta: dict | None = None, on_log: Callable[[dict], None] | None = None,
                 weight_decay_multiplier: Callable[[int, int], float] | None = None,
                 step_fn: Callable[[int], StepWork] | None = None, parts: dict[str, Any] | None = None):
        self.model = model  # the uncompiled model: saved, evaluated, sampled
        # Possibly torch.compile'd, used for the forward (not `or`: a compiled module's truth value asks
        # the model for its len(), which raises)
        self.train_model = model if train_model is None else train_model
        # In a world > 1 each rank keeps and updates only its share of the optimiser state
        # (picochat.optim.sharded); in a world of 1 the optimisers are used as given.
        self.gradients, self.optimizers = shard_optimizers(model, optimizers, world.rank, world.world_size,
                                                           config.grad_reduce_dtype)
        self.batches = batches
        self.step_fn = step_fn or self._supervised_work
        self.parts = {**({"loader": batches} if batches is not None else {}), **(parts or {})}
        self.cfg, self.world, self.tokenizer = config, world, tokenizer
        self.lr_multiplier, self.momentum = lr_multiplier, momentum
        self.weight_decay_multiplier = weight_decay_multiplier
        self.evaluate, self.sample, self.compute_dtype = evaluate, sample, compute_dtype
        self.run_meta, self.on_log = run_meta or {}, on_log
        self.step, self.smooth_loss = 0, 0.0
        self.train_time = 0.0  # seconds spent in timed steps (excludes the first steps: warm-up/compile)
        self.elapsed_s = 0.0  # wall time of the loop over every run of this training (for a time budget)
        self.horizon_fixed = config.time_budget_s <= 0
        self._last_save = time.time()
        self.num_iterations = config.num_iterations if self.horizon_fixed else UNFIXED_HORIZON
        self.metrics: dict = {}
        self.ckpt_dir = ckpt.run_dir(config.stage, config.tag)
        self.log_path = ckpt.checkpoints_root().parent / "logs" / f"{config.stage}-{config.tag}.jsonl"
        self._stop_requested = False
        self._nonfinite_step: int | None = None  # the step whose loss was not finite, for the save that stops
        self._earlier_steps: list[int] = []  # an earlier run's checkpoints under this tag, for the first save
        self._resumed = False
        self._side_work = {kind: (0.0, 0) for kind in ("eval", "sample", "save")}  # this process's (seconds, count)
        self.device = next(model.parameters()).device
        self.flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0
        self.peak = peak_flops(self.device, compute_dtype)

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizers": [o.state_dict() for o in self.optimizers],  # collective: the full state on rank 0
            "loop": {"smooth_loss": self.smooth_loss, "train_time": self.train_time, "metrics": self.metrics,
                     "num_iterations": self.num_iterations, "horizon_fixed": self.horizon_fixed,
                     "elapsed_s": self.elapsed_s, "nonfinite_step": self._nonfinite_step},
            "world_size": self.world.world_size,
            "per_rank": _gather({"rng": _rng_state(), **{k: p.state_dict() for k, p in self.parts.items()}},
                                self.world),
        }

    def resume(self, path: Path) -> None:
        """Restore weights, optimisers, data position, RNG and accumulators from a step directory."""
        state = ckpt.load_training_state(path)
        meta = ckpt.read_json_object(path / "meta.json")
        resharded = state["world_size"] != self.world.world_size
        fixed = sorted(name for name, part in self.parts.items() if not hasattr(part, "reshard_state"))
        if resharded and fixed:
            raise DataError(f"{path} was saved by {state['world_size']} processes and this run has "
                            f"{self.world.world_size}; this stage's {', '.join(fixed)} position is per rank: "
                            "resume with the same --nproc_per_node")
        if meta.get("tokenizer_hash") != self.tokenizer.hash:
            raise DataError(f"{path} was trained with tokenizer {meta.get('tokenizer_hash')}, this run uses "
                            f"{self.tokenizer.hash}; resume with the same tokenizer")
        ckpt.load_weights_into(self.model, path, meta, self.device)
        # Every param group's settings (all but its parameters), per optimiser.
        ours = [[{k: v for k, v in g.items() if k not in ("params", "names")} for g in opt.param_groups]
                for opt in self.optimizers]
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self._keep_group_settings(ours)
        self.step = state["step"]
        self._resumed = True
        # Resharded, every part restarts at the earliest position any old rank had reached (some data is
        # seen twice, none skipped); the RNG streams are new ones, so the run continues, not bit-exactly.
        per_rank = state["per_rank"]
        for name, part in self.parts.items():
            part.load_state_dict(part.reshard_state([r[name] for r in per_rank]) if resharded
                                 else per_rank[self.world.rank][name])
        if resharded:
            seed_everything(1_000_003 * self.step + self.world.rank)
            log0(f"resuming {state['world_size']} processes' checkpoint on {self.world.world_size}: the data "
                 "restarts at the earliest position of any old rank, with fresh random streams")
        else:
            _set_rng_state(per_rank[self.world.rank]["rng"])
        loop = state["loop"]
        self.smooth_loss, self.train_time = loop["smooth_loss"], loop["train_time"]
        self.metrics, self.elapsed_s = loop["metrics"], loop.get("elapsed_s", 0.0)
        saved_cfg = meta.get("loop") or {}
        saved_horizon = loop["num_iterations"] if loop.get("horizon_fixed") else None
        if self.cfg.time_budget_s > 0 and saved_horizon is not None:
            # The horizon the first run measured and fixed: the schedule continues exactly.
            self.num_iterations, self.horizon_fixed = saved_horizon, True
            saved_budget = saved_cfg.get("time_budget_s", -1.0)
            if saved_budget != self.cfg.time_budget_s:
                log0(f"note: the horizon of {saved_horizon} steps was fixed by the checkpoint's "
                     + (f"--time-budget of {saved_budget / 60:g} min" if saved_budget > 0 else "step count")
                     + f" and stays; this run's --time-budget {self.cfg.time_budget_s / 60:g} is not used "
                     "(give --num-iterations to change the horizon)")
        elif self.horizon_fixed and saved_horizon != self.num_iterations:
            log0(f"note: {path} was trained toward a horizon of "
                 f"{f'{saved_horizon} steps' if saved_horizon is not None else 'a time budget not yet fixed'}; "
                 f"this run's horizon is {self.num_iterations} steps: the schedules follow it from step "
                 f"{self.step} on")
        saved_tokens = saved_cfg.get("tokens_per_step", self.cfg.tokens_per_step)
        if saved_tokens != self.cfg.tokens_per_step:
            log0(f"note: {saved_tokens} tokens per step in the checkpoint, {self.cfg.tokens_per_step} now: "
                 f"the steps from {self.step} on take this run's batch")
        if loop.get("nonfinite_step") is not None:
            log0(f"note: {path} was saved when the loss of step {loop['nonfinite_step']} was not finite: "
                 "the batch of that step is skipped (this run continues with the data after it)")
        if self.horizon_fixed and self.step > self.num_iterations:
            raise ConfigError(
                f"{path} is at step {self.step}, past this run's horizon of {self.num_iterations} steps (a schedule "
                f"cannot continue beyond its end): resume with a horizon of at least {self.step} steps "
                "(--num-iterations or the flags that set it) or start a new run under another --tag")
        log0(f"resumed from {path} at step {self.step}"
             + (f" (horizon {self.num_iterations} steps, fixed by the time budget)"
                if self.cfg.time_budget_s > 0 and self.horizon_fixed else ""))

    def _keep_group_settings(self, ours: list[list[dict]]) -> None:
        """After loading optimiser states: this run's group settings (its flags' LRs, betas, weight decay)
        replace the checkpoint's, and each one that differs is said. The settings the loop schedules
        every step (lr, Muon's momentum and decay) are not compared."""
        changed = []
        for opt, groups in zip(self.optimizers, ours):
            for g, (group, mine) in enumerate(zip(opt.param_groups, groups)):
                scheduled = {"lr", "momentum"} | ({"weight_decay"} if "initial_weight_decay" in group else set())
                for key, value in mine.items():
                    old = group.get(key)
                    if key not in scheduled and not torch.is_tensor(value) and old != value:
                        changed.append(f"{type(opt).__name__} group {g} {key} {old} in the checkpoint, {value} now")
                    group[key] = value
        if changed:
            log0("note: this run's optimiser settings replace the checkpoint's: " + "; ".join(changed))

    def resume_and_run(self, resume: bool) -> dict:
        """With `resume` (--resume), first continue from the newest undamaged checkpoint of this run (chosen
        on rank 0), if any; then the run. Logs the final metrics and returns them."""
        if resume:
            step = from_main(ckpt.newest_resumable_step(self.ckpt_dir) if self.world.is_main else None, self.world)
            if step is None:
                log0(f"--resume: no checkpoint under {self.ckpt_dir} yet; starting fresh")
            else:
                self.resume(self.ckpt_dir / f"step_{step}")
        result = self.run()
        log0(f"done: {json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)})}")
        return result

    def save(self) -> None:
        """Collective: rank 0 writes, and every rank learns whether it could (a failed save raises the same
        error on every rank, instead of leaving the others waiting for rank 0)."""
        # The report reads a checkpoint's times: current in every one (a stopped or crashed run's too).
        self.metrics.update(train_time_s=self.train_time, wall_time_s=self.elapsed_s)
        state = self.state_dict()  # collective: every rank takes part
        error = None
        if self.world.is_main:
            meta = {"stage": self.cfg.stage, "tag": self.cfg.tag,
                    "num_iterations": self.num_iterations if self.horizon_fixed else None,
                    "metrics": self.metrics, "world_size": self.world.world_size, "loop": asdict(self.cfg),
                    **self.run_meta}
            try:
                path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.tokenizer, meta, state,
                                            keep_last=self.cfg.keep_last)
            except (UserError, OSError) as e:
                error = e
            else:
                log0(f"saved {path}")
                # An earlier run's lower steps: not this run's to keep.
                for old in [s for s in self._earlier_steps if s < self.step]:
                    shutil.rmtree(self.ckpt_dir / f"step_{old}", ignore_errors=True)
                self._earlier_steps = []
        message = None if error is None else str(error) if isinstance(error, UserError) else \
            f"cannot save step {self.step} in {self.ckpt_dir} ({error})"
        message = from_main(message, self.world)  # in place of a barrier: every rank waits for rank 0's save
        if message is not None:
            raise CheckpointSaveError(message) from error
        self._last_save = time.time()

    # ---- one step ------------------------------------------------------------------------------
    def _set_hyperparameters(self, step: int) -> tuple[float, float | None]:
        lrm = self.lr_multiplier(step, self.num_iterations)
        mom = self.momentum(step) if self.momentum else None
        wdm = self.weight_decay_multiplier(step, self.num_iterations) if self.weight_decay_multiplier else 1.0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if mom is not None and "momentum" in group:  # Muon's groups (AdamW's have betas)
                    group["momentum"] = mom
                if "initial_weight_decay" in group:
                    group["weight_decay"] = group["initial_weight_decay"] * wdm
        return lrm, mom

    def _train_step(self, step: int) -> StepOutcome:
        """The stage's forward/backward, agreement across ranks, then gradient sync and the update.

        The update is skipped on every rank when any rank's loss is not finite.
        """
        graphs = _graphs_traced()
        work = self.step_fn(step)
        outcome = self._agree(work, compiled=_graphs_traced() != graphs)
        self.gradients.wait()  # every rank finishes the reductions the last backward started
        if not outcome.nonfinite_ranks:
            if self.cfg.grad_clip > 0:
                self.gradients.clip_grad_norm_(self.cfg.grad_clip)
            for opt in self.optimizers:
                opt.step()
        self.model.zero_grad(set_to_none=True)
        return outcome

    def _supervised_work(self, step: int) -> StepWork:
        """Forward/backward over `grad_accum_steps` micro-batches of `batches`, weighted as configured."""
        micro = [_with_token_count(next(self.batches)) for _ in range(self.cfg.grad_accum_steps)]
        # Supervised tokens per micro-batch: one host sync for the whole step, not one per micro-batch.
        n_tokens = torch.stack([(y >= 0).sum() for _, y, _ in micro]).tolist()
        total_tokens = sum(n_tokens)
        if self.cfg.loss_weighting == "tokens":
            total_tokens = int(all_reduced([total_tokens], self.world, self.device)[0])
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read once, after the loop
        for i, (x, y, _) in enumerate(micro):
            if i == len(micro) - 1:
                self.gradients.arm()  # the last backward: each gradient's reduction starts once it is final
            with torch.autocast(self.device.type, dtype=self.compute_dtype,
                                enabled=self.compute_dtype != torch.float32):
                if self.cfg.loss_weighting == "tokens":
                    # Sum over supervised tokens / all supervised tokens of the step (across ranks):
                    # a micro-batch with no supervised tokens adds exactly nothing.
                    scaled = (self.train_model(x, y, loss_reduction="sum") / max(1, total_tokens)
                              * self.world.world_size)
                else:
                    scaled = self.train_model(x, y) / self.cfg.grad_accum_steps
            scaled.backward()
            loss_sum += scaled.detach().double()
        # The step's one host sync for the loss (the non-finite check needs it). The gradient
        # sync averages over ranks, so this rank's share of the step's loss is 1/world of it.
        return StepWork(loss=loss_sum.item() / self.world.world_size, tokens=sum(n for _, _, n in micro),
                        supervised_tokens=sum(n_tokens))

    def _agree(self, work: StepWork, compiled: bool = False) -> StepOutcome:
        """One all-reduce per step: stop, save-due, non-finite and compiled flags, token counts, loss shares
        and peak memories."""
        minutes = self.cfg.save_every_minutes
        save_due = minutes > 0 and time.time() - self._last_save >= 60 * minutes
        values = [int(self._stop_requested), int(save_due), int(not math.isfinite(work.loss)), work.tokens,
                  work.supervised_tokens, int(compiled), work.loss]
        memory = [0] * self.world.world_size  # a slot per rank: the sum hands every rank each one's peak
        memory[self.world.rank] = peak_memory_bytes(self.device)
        summed = all_reduced(values + memory, self.world, self.device)  # SUM: a flag is set by any rank
        stop, save_due, nonfinite, tokens, supervised, compiled = map(int, summed[:6])
        return StepOutcome(summed[6], tokens, supervised, work.record, stop=stop > 0, save_due=save_due > 0,
                           nonfinite_ranks=nonfinite, peak_mem_bytes=int(max(summed[7:])),
                           compiled=compiled > 0)

    def _stop_on_nonfinite(self, step: int, outcome: StepOutcome) -> None:
        """Every rank: save the last good weights (collectively), then raise the same error.

        The data position saved is the one after the step's batch (the loader has read it): a resume
        continues with the next batch, and both this error and the resume say so.
        """
        self._nonfinite_step = step
        self.save()
        raise NonFiniteLossError(
            f"the loss was not finite (NaN or inf) on {outcome.nonfinite_ranks} of {self.world.world_size} "
            f"process(es) at step {step}; the update was skipped and the weights before it saved at step "
            f"{self.step} in {self.ckpt_dir}, where --resume continues with the batch after the one of step "
            f"{step} (that batch is skipped): lower the learning rates (e.g. --matrix-lr; a resume trains with "
            "the flags given to it) or check the data, then continue with --resume")

    # ---- the loop ------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Strict JSON lines: a value that is not finite (MFU with no known peak, a NaN eval) is written as null.
        record = _finite_json(record)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time()

    def _timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        """fn(), its seconds added to this process's time for `kind` (eval, sample or save)."""
        t0 = self._clock()
        out = fn()
        seconds, count = self._side_work[kind]
        self._side_work[kind] = (seconds + self._clock() - t0, count + 1)
        return out

    def _side_seconds(self, start: int, end: int, final: bool, step_s: float) -> float:
        """Seconds of the evals, samples and saves due at steps start..end-1 (`final`: and of the last ones,
        at `end`), each at this process's mean time for its kind; a kind not yet timed here counts nothing.
        Saves every --save-every-minutes are counted from the time since the last save and `step_s` a step."""
        cfg = self.cfg
        saves = _due(cfg.save_every, start, end, skip_zero=True)
        if cfg.save_every_minutes > 0 and step_s > 0:  # any save restarts that clock: the two kinds are not added
            interval = 60 * cfg.save_every_minutes
            first = start + max(0, math.ceil((interval - (time.time() - self._last_save)) / step_s))
            if first < end:  # then one every ceil(interval / step_s) steps; one at `end` is the final save
                saves = max(saves, 1 + (end - 1 - first) // math.ceil(interval / step_s))
        due = {"eval": _due(cfg.eval_every, start, end) + final if self.evaluate else 0,
               "sample": _due(cfg.sample_every, start, end, skip_zero=True) + final if self.sample else 0,
               "save": saves + final}
        return sum(n * seconds / count for kind, n in due.items()
                   for seconds, count in [self._side_work[kind]] if count)

    def _eval_and_sample(self, step: int, last: bool) -> None:
        cfg = self.cfg
        if self.evaluate and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            results = self._timed("eval", lambda: self.evaluate(self.model, step))
            self.metrics.update(results)
            log0(f"step {step:5d} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
            self._log({"step": step, "eval": results})
        if self.sample and (last or (cfg.sample_every > 0 and step % cfg.sample_every == 0 and step > 0)):
            self._timed("sample", lambda: self.sample(self.model, step))

    def run(self) -> dict:
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self._stop_requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self._stop_requested = True
            log0("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, on_sigint)
        earlier = ckpt.list_steps(self.ckpt_dir) if not self._resumed and self.world.is_main else []
        self._earlier_steps = earlier  # this fresh run's first save removes them (higher ones: save_checkpoint)
        if earlier:
            log0(f"note: {self.ckpt_dir} holds checkpoints of an earlier run (steps {', '.join(map(str, earlier))}); "
                 "this fresh run replaces them as it saves (continue that run instead with --resume)")
        try:
            return self._run(self.cfg)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _run(self, cfg: LoopConfig) -> dict:
        self.model.train()
        timed_steps, timed_s = 0, 0.0  # this process's timed steps (a resumed run's train_time holds earlier ones)
        run_steps = 0  # steps this process has taken: its first ones pay for warm-up and compilation, resumed or not
        t_run = time.time()
        self._last_save = t_run
        elapsed_before = self.elapsed_s
        while True:
            step = self.step
            last = step >= self.num_iterations
            self._eval_and_sample(step, last)
            if last:
                self.elapsed_s = elapsed_before + time.time() - t_run  # every process of this training
                self._timed("save", self.save)  # with train_time_s and wall_time_s in its metrics
                break
            lrm, mom = self._set_hyperparameters(step)
            t0 = self._clock()
            outcome = self._train_step(step)
            dt = self._clock() - t0
            if outcome.nonfinite_ranks:
                self._stop_on_nonfinite(step, outcome)
            self.step = step + 1
            self.elapsed_s = elapsed_before + time.time() - t_run
            timed = run_steps >= WARMUP_STEPS and not outcome.compiled  # compiling is not the step's pace
            if timed:
                self.train_time += dt
                timed_steps, timed_s = timed_steps + 1, timed_s + dt
            run_steps += 1
            if not self.horizon_fixed and self._budget_measured(timed_steps):
                self._fix_horizon(timed_steps, timed_s)
            self._log_step(outcome, dt, lrm, mom, timed_steps and timed_s / timed_steps, timed)
            periodic = cfg.save_every > 0 and self.step % cfg.save_every == 0
            if (periodic or outcome.save_due) and self.step != self.num_iterations:
                self._timed("save", self.save)
            if outcome.stop:
                self.save()
                log0(f"stopped at step {self.step}; continue with --resume")
                return {"step": self.step, "stopped": True, **self.metrics}
        return {"step": self.step, "stopped": False, **self.metrics}

    def _budget_measured(self, timed_steps: int) -> bool:
        """Time budget: enough steps timed and enough of the budget spent to fix the horizon now.

        Decided from the largest train time of any rank, so that every rank fixes the horizon (a
        collective) at the same step; each rank's own clock could cross the threshold a step apart.
        """
        if timed_steps < self.cfg.budget_measure_steps:
            return False
        # One small all-reduce per step (in a world > 1), only until the horizon is fixed.
        [spent] = all_reduced([self.train_time], self.world, self.device, dist.ReduceOp.MAX)
        return spent >= self.cfg.budget_measure_fraction * self.cfg.time_budget_s

    def _fix_horizon(self, timed_steps: int, timed_s: float) -> None:
        """Time budget: the horizon that spends what is left of the budget at the step time measured here,
        the evals, samples and saves due before it at the time they took here."""
        seconds_per_step = max(timed_s / timed_steps, 1e-6)  # a coarse clock can time steps at 0 s
        left = self.cfg.time_budget_s - self.elapsed_s
        horizon = self.step + max(0, int(left // seconds_per_step))
        side_seconds = functools.partial(self._side_seconds, self.step, final=False, step_s=seconds_per_step)
        if side_seconds(horizon) > 0:  # the largest horizon that fits: bisect
            low = self.step
            while low < horizon:
                mid = (low + horizon + 1) // 2
                cost = (mid - self.step) * seconds_per_step + side_seconds(mid)
                low, horizon = (mid, horizon) if cost <= left else (low, mid - 1)
        if self.world.enabled:  # ranks measured slightly different times: agree on the smallest
            horizon = int(all_reduced([horizon], self.world, self.device, dist.ReduceOp.MIN)[0])
        self.num_iterations, self.horizon_fixed = horizon, True
        side = side_seconds(horizon)
        log0(f"time budget {self.cfg.time_budget_s / 60:.2f} min: {seconds_per_step * 1000:.0f} ms/step over "
             f"{timed_steps} steps, {self.elapsed_s:.0f}s spent -> horizon fixed at {horizon} steps"
             + (f" (with {side:.0f}s of evals, samples and saves)" if side > 0 else ""))

    def _log_step(self, outcome: StepOutcome, dt: float, lrm: float, mom: float | None,
                  seconds_per_step: float, timed: bool) -> None:
        """One step's line and JSONL record; seconds_per_step is 0 until steps are timed,
        `timed`: the step counts in the train time (not one of this process's warm-up steps)."""
        beta = 0.9
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * outcome.loss
        debiased = self.smooth_loss / (1 - beta ** self.step)
        tok_per_s = outcome.tokens / dt if dt > 0 else float("nan")  # a coarse clock can time a step at 0 s
        mfu = mfu_percent(self.flops_per_token, tok_per_s, self.peak, self.world.world_size)
        peak_mem = max(peak_memory_bytes(self.device), outcome.peak_mem_bytes)  # the largest of any rank
        horizon = self.num_iterations if self.horizon_fixed else None
        eta = ((horizon - self.step) * seconds_per_step + self._side_seconds(self.step, horizon, True, seconds_per_step)
               if seconds_per_step and horizon is not None else float("nan"))
        epoch = getattr(self.batches, "epoch", None)
        mom_text = f" | mom {mom:.3f}" if mom is not None else ""
        epoch_text = f" | epoch {epoch}" if epoch is not None else ""
        mfu_text = f"{mfu:.1f}%" if math.isfinite(mfu) else "-"  # no peak known for this device (or dt 0)
        tok_text = f"{tok_per_s:,.0f}" if math.isfinite(tok_per_s) else "-"
        eta_text = f"{eta / 60:.1f}m" if math.isfinite(eta) else "-"  # until the warm-up steps are past
        extra_text = "".join(f" | {k} {v:.4g}" for k, v in outcome.record.items())
        log0(f"step {self.step:5d}/{horizon if horizon is not None else '?'} | loss {debiased:.4f} | "
             f"lrm {lrm:.3f}{mom_text} | dt {dt * 1000:.0f}ms | tok/s {tok_text} | mfu {mfu_text} | "
             f"mem {peak_mem / 2**30:.2f}GiB{epoch_text} | eta {eta_text}{extra_text}")
        self._log({"step": self.step, "loss": outcome.loss, "smooth_loss": debiased, "lrm": lrm, "momentum": mom,
                   "dt": dt, "timed": timed, "tokens": outcome.tokens, "tok_per_s": tok_per_s, "mfu": mfu,
                   "peak_mem_bytes": peak_mem, "epoch": epoch, "supervised_tokens": outcome.supervised_tokens,
                   "num_iterations": horizon, "eta_s": eta if math.isfinite(eta) else None, **outcome.record})
