"""Optimisers for the GPT: Muon for the hidden matrices, AdamW for embedding and lm_head.

The architecture options' parameters (picochat.model.gpt) get AdamW groups of their own, each
with its own LR, betas and weight decay (AdamWGroup): value embeddings, resid lambdas, x0
lambdas, and the smear gate, smear lambda and backout lambda together; the value-embedding
gates live in the blocks and go to Muon with the other block matrices.

Every parameter goes to exactly one group (checked), every group carries `initial_lr`
(the training loop sets lr = initial_lr * lr_multiplier), Muon groups carry
`momentum` (the loop schedules it with `muon_momentum`) and `initial_weight_decay`
(the loop sets weight_decay = initial_weight_decay * its weight-decay multiplier). The
assignment is printed once at start, so a run's log says which parameter was trained how.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from picochat.optim.distributed import broadcast_parameters, sync_gradients
from picochat.optim.muon import Muon, MuonOptions, newton_schulz, polar_express
from picochat.runtime import is_main_process

__all__ = ["AdamWGroup", "Muon", "MuonOptions", "assign_param_groups", "broadcast_parameters", "build_optimizers",
           "describe_params", "muon_momentum", "newton_schulz", "polar_express", "sync_gradients"]

ADAMW_EPS = 1e-10
REFERENCE_WIDTH = 768  # AdamW LRs were tuned at this width; other widths scale by (width/768)**-0.5


@dataclass(frozen=True)
class AdamWGroup:
    """LR, betas and weight decay of one AdamW group of the architecture options' parameters.
    `width_scaled`: the LR is scaled by (n_embd / 768) ** -0.5, as the embedding's is."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    width_scaled: bool = False


# The options' parameters (by name, or name prefix) -> their AdamW group.
OPTION_GROUPS = {"value_embeds.": "value_embeds", "resid_lambdas": "resid_lambdas", "x0_lambdas": "x0_lambdas",
                 "smear_gate": "scalars", "smear_lambda": "scalars", "backout_lambda": "scalars"}
NAMED_GROUPS = {"transformer.wte.weight": "embedding", "lm_head.weight": "unembedding"}


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95, *,
                  final: float | None = None, warmdown_ratio: float = 0.0, num_iterations: int = 0) -> float:
    """Muon momentum at `step`: linear from `start` to `end` over the first `warmup_steps` steps.

    With `final`, it then goes linearly from `end` to `final` over the last `warmdown_ratio` of
    the `num_iterations` steps (the LR warmdown); without, it stays at `end`.
    """
    warmdown = round(warmdown_ratio * num_iterations)
    if final is not None and warmdown > 0 and step >= max(warmup_steps, num_iterations - warmdown):
        return end + min((step - (num_iterations - warmdown)) / warmdown, 1.0) * (final - end)
    if warmup_steps <= 0:
        return end
    return start + min(max(step, 0) / warmup_steps, 1.0) * (end - start)


def assign_param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split the parameters into 'matrix' (Muon), 'embedding', 'unembedding' and the options'
    groups (AdamW: 'value_embeds', 'resid_lambdas', 'x0_lambdas', 'scalars'; empty when off).

    Raises if a parameter fits no group, so a new kind of parameter can never go untrained.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {
        "matrix": [], "embedding": [], "unembedding": [], **{g: [] for g in OPTION_GROUPS.values()}}
    for name, p in model.named_parameters():
        option = next((g for prefix, g in OPTION_GROUPS.items() if name.startswith(prefix)), None)
        matrix = "matrix" if name.startswith("transformer.h.") and p.ndim == 2 else None
        group = NAMED_GROUPS.get(name) or matrix or option
        if group is None:
            raise RuntimeError(f"parameter {name} {tuple(p.shape)} has no optimiser group; "
                               "extend picochat.optim.assign_param_groups")
        groups[group].append((name, p))
    return groups


def describe_params(names: list[str]) -> str:
    """Compact list of names: transformer.h.0..N share one entry, 'transformer.h.{0-3}.mlp.c_fc.weight'."""
    layers: dict[str, list[int]] = defaultdict(list)
    for name in names:
        if match := re.match(r"^(.*\.h\.)(\d+)(\..*)$", name):
            layers[match.group(1) + "{}" + match.group(3)].append(int(match.group(2)))
        else:
            layers[name] = []

    def shown(idx: list[int]) -> str:  # the layer numbers: a range when consecutive, else each
        if idx == list(range(idx[0], idx[-1] + 1)):
            return f"{{{idx[0]}-{idx[-1]}}}" if len(idx) > 1 else str(idx[0])
        return "{" + ",".join(map(str, idx)) + "}"

    return ", ".join(pattern.replace("{}", shown(idx)) if idx else pattern for pattern, idx in layers.items())


RESID_LAMBDAS = AdamWGroup(0.005, (0.8, 0.95), 0.05)
X0_LAMBDAS = AdamWGroup(0.5, (0.96, 0.95), 0.0)
SCALARS = AdamWGroup(0.2, (0.8, 0.95), 0.0)


def build_optimizers(model: nn.Module, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float,
                     weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                     muon_momentum: float = 0.95, muon_options: MuonOptions | None = None,
                     muon_weight_decay: float | None = None, world: Any = None,
                     embedding: AdamWGroup | None = None, unembedding: AdamWGroup | None = None,
                     value_embeds: AdamWGroup | None = None, resid_lambdas: AdamWGroup = RESID_LAMBDAS,
                     x0_lambdas: AdamWGroup = X0_LAMBDAS, scalars: AdamWGroup = SCALARS) -> list[torch.optim.Optimizer]:
    """[AdamW for wte, lm_head and the options' parameters, Muon for the block matrices]; prints
    the groups on rank 0.

    AdamW LRs are scaled by (n_embd / 768) ** -0.5: wider models take proportionally
    smaller steps in the embedding/unembedding, Muon's orthogonal updates need no such scaling.
    The options' AdamW groups, each left out when its option is off, default to the values they
    were tuned with: `value_embeds` (None: half embedding_lr, width-scaled, betas (0.8, 0.995),
    weight decay 0.01), `resid_lambdas` (0.005, (0.8, 0.95), 0.05), `x0_lambdas` (0.5,
    (0.96, 0.95), 0: a slow first moment) and `scalars`, the smear gate and lambda and the backout
    lambda (0.2, (0.8, 0.95), 0); only the value embeddings' LR is width-scaled.
    `embedding` / `unembedding` replace the wte / lm_head groups' (LR, `adam_betas`,
    `weight_decay`) when a recipe tunes them apart. `muon_options` chooses Muon's update rule
    (default: the classic one); `muon_weight_decay` is Muon's decay (default: `weight_decay`).
    """
    groups = assign_param_groups(model)
    width_scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    adam_groups = []
    specs = {"unembedding": unembedding or AdamWGroup(unembedding_lr, adam_betas, weight_decay, width_scaled=True),
             "embedding": embedding or AdamWGroup(embedding_lr, adam_betas, weight_decay, width_scaled=True),
             "value_embeds": value_embeds or AdamWGroup(embedding_lr / 2, (0.8, 0.995), 0.01, width_scaled=True),
             "resid_lambdas": resid_lambdas, "x0_lambdas": x0_lambdas, "scalars": scalars}
    for key, spec in specs.items():
        if groups[key]:
            lr = spec.lr * (width_scale if spec.width_scaled else 1.0)
            adam_groups.append({"params": [p for _, p in groups[key]], "names": [n for n, _ in groups[key]],
                                "lr": lr, "initial_lr": lr, "betas": spec.betas, "weight_decay": spec.weight_decay})
    # The fused kernel runs one pass over all of a group's tensors (CPU and CUDA).
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=ADAMW_EPS, weight_decay=weight_decay,
                              fused=fused)
    matrices = groups["matrix"]
    muon_wd = weight_decay if muon_weight_decay is None else muon_weight_decay
    options = muon_options or MuonOptions()
    muon = Muon([{"params": [p for _, p in matrices], "names": [n for n, _ in matrices],
                  "lr": matrix_lr, "initial_lr": matrix_lr, "initial_weight_decay": muon_wd}],
                momentum=muon_momentum, weight_decay=muon_wd, **asdict(options))

    is_main = world.is_main if world is not None else is_main_process()
    if is_main:
        for kind, opt in (("adamw", adamw), ("muon", muon)):
            for g in opt.param_groups:
                count = sum(p.numel() for p in g["params"])
                extra = (f" momentum={g['momentum']} {options.describe()}".rstrip() if kind == "muon"
                         else f" betas={g['betas']}")
                print(f"optim {kind}: lr={g['lr']:.6g}{extra} wd={g['weight_decay']} "
                      f"({len(g['params'])} tensors, {count:,} params): {describe_params(g['names'])}",
                      flush=True)
    return [adamw, muon]
