"""The options every training stage shares, as typed dataclass fields (see picochat.config.Options).

`StageOptions` is what all four stages have (base LRs, checkpoints, seed, logging, device);
`LoopOptions` adds what the gradient stages (base, mid, SFT) have on top: the time budget, Muon's
momentum warmup, compile, the gradient reduction's dtype and the memory check. Each stage's own
dataclass (BaseTrainConfig, MidConfig, SFTConfig, RLConfig) extends one of them and may give a field
another default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from picochat import kernels
from picochat.config import DeviceOptions, Options, option

OPTIM, SAVE, RUN = "optimisation", "eval and checkpoints", "runtime"
CPU_COMPILE_MINUTES = 5.0  # the shortest --time-budget for which --compile auto compiles on a CPU


@dataclass
class StageOptions(DeviceOptions):
    preset: str | None = option(None, "the --preset the options came from", cli=False)
    embedding_lr: float = option(0.2, "AdamW LR of the token embedding", group=OPTIM)
    unembedding_lr: float = option(0.004, "AdamW LR of lm_head", group=OPTIM)
    matrix_lr: float = option(0.02, "Muon LR of the block matrices", group=OPTIM)
    weight_decay: float = option(0.0, "weight decay of the AdamW groups", group=OPTIM)
    save_every: int = option(-1, "checkpoint every N steps (<=0: at the end only)", group=SAVE)
    save_every_minutes: float = option(
        -1.0, "also checkpoint when this many minutes of wall time passed since the last save (<=0: off)",
        group=SAVE)
    keep_last: int = option(2, "keep this many newest checkpoints (0: keep every one)", group=SAVE, minimum=0)
    resume: bool = option(False, "continue from the newest complete checkpoint of this tag", group=SAVE,
                          store_true=True)
    tag: str | None = option(None, "run name (default: the starting checkpoint's tag)", group=SAVE)
    seed: int = option(42, "seed for weights, data order and everything random", group=RUN)
    wandb: str | None = option(None, "log to Weights & Biases under this run name", group=RUN, metavar="RUN")


@dataclass
class LoopOptions(StageOptions):
    momentum_warmup_steps: int = option(300, "Muon momentum 0.85 -> 0.95 over this many steps", group=OPTIM)
    time_budget: float = option(
        -1.0, "train for this many minutes: the horizon is set from the first steps' throughput, then fixed "
        "(and kept on --resume); <=0: the stage's own horizon", group=OPTIM, metavar="MINUTES")
    compile: str = option(
        "auto", f"torch.compile the model (auto: on for CUDA, and on a CPU for a bf16 run with a --time-budget of "
        f"at least {CPU_COMPILE_MINUTES:g} minutes and a C++ compiler)", group=RUN, choices=("auto", "on", "off"))
    grad_reduce_dtype: str = option(
        "fp32", "dtype of the cross-rank gradient reduction (bf16 halves the traffic, e.g. across nodes; the sum "
        "is rounded to bf16)", group=RUN, choices=("fp32", "bf16"))
    no_plan_check: bool = option(False, "start even if the memory estimate says the run does not fit", group=RUN,
                                 store_true=True)
    batch_from_flag: bool = option(True, "whether --device-batch-size was given (else the preset's may be lowered "
                                   "to divide the step at this world size)", cli=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        given = getattr(args, "device_batch_size", None) is not None
        return dataclasses.replace(super().from_args(args), batch_from_flag=given)

    def compiles(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether the stage trains a torch.compile'd model on this device type, in this compute dtype.

        auto on a CPU: a graph costs ~20 s to build there, after which a bf16 step of the cpu preset
        takes ~0.75x the eager one (docs/LOG.md). fp32, what auto picks on CPUs without fast bf16,
        stays eager: it gained less (1.13x) where measured, and was not measured on those CPUs. The
        compiler's kernels need a C++ compiler."""
        if self.compile != "auto" or device_type != "cpu":
            return self.compile == "on" or (self.compile == "auto" and device_type == "cuda")
        return dtype == torch.bfloat16 and self.time_budget >= CPU_COMPILE_MINUTES and kernels.compiler("C++") is not None


@dataclass
class ParentOptions(Options):
    """Which checkpoint a later stage starts from (chosen once, on rank 0)."""

    from_stage: str = option("base", "stage of the starting checkpoint", group="start from",
                             choices=("base", "mid", "sft"))
    from_tag: str | None = option(None, "tag of the starting checkpoint (default: the newest)", group="start from")
    from_step: int | None = option(None, "step of the starting checkpoint (default: the newest)", group="start from")
    muon: str = option("parent", "Muon's update rule: parent (the one the starting checkpoint was trained with, "
                       "e.g. Polar Express and NorMuon after the 2026 recipe) or classic", group=OPTIM,
                       choices=("parent", "classic"))

    def muon_options(self, parent_meta: dict):
        """The MuonOptions this stage trains with: the parent's recorded rule (a base checkpoint from before
        rules were recorded: its flags), or the classic rule."""
        from picochat.optim import MuonOptions  # the optimisers pull in torch; options stay light

        if self.muon == "classic":
            return MuonOptions()
        if "muon" in parent_meta:
            return MuonOptions(**parent_meta["muon"])
        return muon_options_from_flags(parent_meta.get("args") or {})


def muon_options_from_flags(flags: dict):
    """The MuonOptions base-train's Muon flags ask for, `flags` by field name (`BaseTrainConfig.to_dict()`,
    or the args a checkpoint recorded); args recorded before these flags existed give the classic rule."""
    from picochat.optim import MuonOptions  # the optimisers pull in torch; options stay light

    return MuonOptions(orthogonalizer=flags.get("muon_orthogonalizer", "newton_schulz"),
                       ns_steps=flags.get("muon_ns_steps", 5), row_equilibration=bool(flags.get("muon_eq")),
                       renormalize=bool(flags.get("muon_plus")),
                       normuon_beta2=flags.get("normuon_beta2", 0.9) if flags.get("normuon") else None,
                       cautious_weight_decay=bool(flags.get("cautious_wd")))
