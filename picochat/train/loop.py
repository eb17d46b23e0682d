"""The one training loop, shared by base, mid and SFT training.

A stage hands the loop *data*, not code: a batch source with state_dict(), the
LR schedule, the evals to run, where to save. The loop does gradient
accumulation, cross-rank gradient sync, the optimiser step with scheduled LR and
Muon momentum, one log line per step (and a JSON line in the metrics log),
periodic eval/sampling/checkpoints, exact resume and a clean Ctrl-C.

Definitions (logged): a *step* is one optimiser update over `grad_accum_steps`
micro-batches on every rank. The run has `num_iterations` steps; the loop runs
steps 0..num_iterations-1 and then evaluates and saves once more at
step == num_iterations.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from picochat.optim.distributed import sync_gradients
from picochat.runtime import Dist, log0
from picochat.train import checkpoint as ckpt
from picochat.train.mfu import peak_flops


@dataclass
class LoopConfig:
    stage: str
    tag: str
    num_iterations: int
    grad_accum_steps: int
    tokens_per_step: int  # for tok/s and MFU (all ranks, all micro-batches)
    eval_every: int = -1  # <= 0: only at the end
    sample_every: int = -1
    save_every: int = -1  # <= 0: only at the end
    keep_last: int = 2
    grad_clip: float = 0.0
    log_every: int = 1
    loss_weighting: str = "mean"  # "mean": average micro-batch means; "tokens": weight by supervised tokens
    extra_meta: dict = field(default_factory=dict)


def wandb_logger(run_name: str | None, project_stage: str, config: dict) -> Callable[[dict], None] | None:
    """A log hook sending each step record to Weights & Biases, or None when no run name is given."""
    if not run_name:
        return None
    try:
        import wandb
    except ImportError as e:
        from picochat.errors import ConfigError

        raise ConfigError("--wandb needs the wandb package: pip install 'picochat[wandb]'") from e
    run = wandb.init(project="picochat", name=run_name, group=project_stage,
                     config={k: v for k, v in config.items() if not k.startswith("_")})

    def log(record: dict) -> None:
        flat = {**{k: v for k, v in record.items() if k != "eval"}, **record.get("eval", {})}
        run.log(flat, step=record["step"])

    return log


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any, world: Dist) -> list:
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """Runs one stage's optimisation. `batches` yields (inputs, targets) and has state_dict()."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        batches,
        config: LoopConfig,
        world: Dist,
        tokenizer,
        lr_multiplier: Callable[[int], float],
        momentum: Callable[[int], float] | None = None,
        evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
        sample: Callable[[torch.nn.Module, int], None] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        train_model: torch.nn.Module | None = None,
        run_meta: dict | None = None,
        on_log: Callable[[dict], None] | None = None,
    ):
        self.model = model  # the uncompiled model: saved, evaluated, sampled
        self.train_model = train_model or model  # possibly torch.compile'd, used for the forward
        self.optimizers = optimizers
        self.batches = batches
        self.cfg = config
        self.world = world
        self.tokenizer = tokenizer
        self.lr_multiplier = lr_multiplier
        self.momentum = momentum
        self.evaluate = evaluate
        self.sample = sample
        self.compute_dtype = compute_dtype
        self.run_meta = run_meta or {}
        self.on_log = on_log
        self.step = 0
        self.smooth_loss = 0.0
        self.train_time = 0.0  # seconds spent in timed steps (excludes the first steps: warm-up/compile)
        self.metrics: dict = {}
        self.ckpt_dir = ckpt.run_dir(config.stage, config.tag)
        self.log_path = ckpt.checkpoints_root().parent / "logs" / f"{config.stage}-{config.tag}.jsonl"
        self._stop_requested = False
        device = next(model.parameters()).device
        self.device = device
        self.flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0
        self.peak = peak_flops(device, compute_dtype)

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "loop": {"smooth_loss": self.smooth_loss, "train_time": self.train_time, "metrics": self.metrics},
            "world_size": self.world.world_size,
            "per_rank": _gather({"loader": self.batches.state_dict(), "rng": _rng_state()}, self.world),
        }

    def resume(self, path: Path) -> None:
        """Restore weights, optimisers, data position, RNG and accumulators from a step directory."""
        from safetensors.torch import load_file

        from picochat.errors import DataError

        state = ckpt.load_training_state(path)
        meta = json.loads((path / "meta.json").read_text())
        if state["world_size"] != self.world.world_size:
            raise DataError(
                f"{path} was saved by {state['world_size']} processes and this run has {self.world.world_size}; "
                "resume with the same --nproc_per_node (the data position and RNG are per rank)"
            )
        if meta.get("tokenizer_hash") != self.tokenizer.hash:
            raise DataError(f"{path} was trained with tokenizer {meta.get('tokenizer_hash')}, this run uses "
                            f"{self.tokenizer.hash}; resume with the same tokenizer")
        weights = ckpt.clean_state_dict(load_file(str(path / "model.safetensors"), device=str(self.device)))
        self.model.load_state_dict(weights)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        mine = state["per_rank"][self.world.rank]
        self.batches.load_state_dict(mine["loader"])
        _set_rng_state(mine["rng"])
        self.step = state["step"]
        self.smooth_loss = state["loop"]["smooth_loss"]
        self.train_time = state["loop"]["train_time"]
        self.metrics = state["loop"]["metrics"]
        log0(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.world.is_main:
            meta = {
                "stage": self.cfg.stage, "tag": self.cfg.tag, "num_iterations": self.cfg.num_iterations,
                "metrics": self.metrics, "world_size": self.world.world_size, "loop": asdict(self.cfg),
                **self.run_meta,
            }
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.tokenizer, meta, state,
                                        keep_last=self.cfg.keep_last)
            log0(f"saved {path}")
        if self.world.enabled:
            dist.barrier()

    # ---- one step ------------------------------------------------------------------------------
    def _set_hyperparameters(self, step: int) -> tuple[float, float | None]:
        lrm = self.lr_multiplier(step)
        mom = self.momentum(step) if self.momentum else None
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if mom is not None and "momentum" in group and group.get("kind", "muon") == "muon":
                    group["momentum"] = mom
        return lrm, mom

    def _train_step(self) -> tuple[float, int]:
        """Forward/backward over the micro-batches, sync, step. Returns (loss, supervised tokens)."""
        micro = []
        for _ in range(self.cfg.grad_accum_steps):
            micro.append(next(self.batches))
        n_tokens = [int((y >= 0).sum()) for _, y in micro]
        total_tokens = sum(n_tokens)
        if self.cfg.loss_weighting == "tokens" and self.world.enabled:
            t = torch.tensor([total_tokens], dtype=torch.long, device=self.device)
            dist.all_reduce(t)
            total_tokens = int(t.item())
        loss_sum = 0.0
        for (x, y), n in zip(micro, n_tokens):
            with torch.autocast(self.device.type, dtype=self.compute_dtype,
                                enabled=self.compute_dtype != torch.float32):
                if self.cfg.loss_weighting == "tokens":
                    # Sum over supervised tokens / all supervised tokens of the step (across ranks):
                    # a micro-batch with no supervised tokens adds exactly nothing.
                    loss = self.train_model(x, y, loss_reduction="sum")
                    scaled = loss / max(1, total_tokens) * self.world.world_size
                else:
                    loss = self.train_model(x, y)
                    scaled = loss / self.cfg.grad_accum_steps
            scaled.backward()
            loss_sum += scaled.detach().float().item()
        if self.cfg.loss_weighting == "tokens":
            loss_sum /= self.world.world_size
        sync_gradients(self.model)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return loss_sum, total_tokens

    # ---- the loop ------------------------------------------------------------------------------
    def _agree_to_stop(self) -> bool:
        flag = self._stop_requested
        if self.world.enabled:
            t = torch.tensor([1 if flag else 0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Strict JSON lines: a value that is not finite (MFU with no known peak) is written as null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def _eval_and_sample(self, step: int, last: bool) -> None:
        cfg = self.cfg
        if self.evaluate and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            results = self.evaluate(self.model, step)
            self.metrics.update(results)
            log0(f"step {step:5d} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
            self._log({"step": step, "eval": results})
        if self.sample and (last or (cfg.sample_every > 0 and step % cfg.sample_every == 0 and step > 0)):
            self.sample(self.model, step)

    def run(self) -> dict:
        cfg = self.cfg
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self._stop_requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self._stop_requested = True
            log0("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, on_sigint)
        try:
            return self._run(cfg)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _run(self, cfg: LoopConfig) -> dict:
        self.model.train()
        timed_steps = 0
        t_run = time.time()
        while True:
            step = self.step
            last = step == cfg.num_iterations
            self._eval_and_sample(step, last)
            if last:
                self.metrics["train_time_s"] = self.train_time
                self.metrics["wall_time_s"] = self.metrics.get("wall_time_s", 0.0) + time.time() - t_run
                self.save()
                break
            lrm, mom = self._set_hyperparameters(step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            loss, ntok = self._train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            if not math.isfinite(loss):
                from picochat.errors import UserError

                self.save()
                raise UserError(f"loss became {loss} at step {step}; lower the learning rates or check the data "
                                f"(state saved at step {self.step})")
            self.step = step + 1
            beta = 0.9
            self.smooth_loss = beta * self.smooth_loss + (1 - beta) * loss
            debiased = self.smooth_loss / (1 - beta ** self.step)
            if step >= 3:  # the first steps pay for warm-up and compilation
                self.train_time += dt
                timed_steps += 1
            tok_per_s = cfg.tokens_per_step / dt
            mfu = 100 * self.flops_per_token * tok_per_s / self.peak if self.peak == self.peak else float("nan")
            remaining = cfg.num_iterations - self.step
            eta = remaining * (self.train_time / max(1, timed_steps)) if timed_steps else float("nan")
            epoch = getattr(self.batches, "epoch", None)
            if step % cfg.log_every == 0 or self.step == cfg.num_iterations:
                mom_text = f" | mom {mom:.3f}" if mom is not None else ""
                epoch_text = f" | epoch {epoch}" if epoch is not None else ""
                mfu_text = f"{mfu:.1f}%" if math.isfinite(mfu) else "-"  # no peak known for this device
                eta_text = f"{eta / 60:.1f}m" if math.isfinite(eta) else "-"  # until the warm-up steps are past
                log0(f"step {self.step:5d}/{cfg.num_iterations} | loss {debiased:.4f} | lrm {lrm:.3f}{mom_text} | "
                     f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu_text}{epoch_text} | eta {eta_text}")
            self._log({"step": self.step, "loss": loss, "smooth_loss": debiased, "lrm": lrm, "momentum": mom,
                       "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "epoch": epoch, "supervised_tokens": ntok})
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step != cfg.num_iterations:
                self.save()
            if self._agree_to_stop():
                self.save()
                log0(f"stopped at step {self.step}; continue with --resume")
                return {"step": self.step, "stopped": True, **self.metrics}
        return {"step": self.step, "stopped": False, **self.metrics}
