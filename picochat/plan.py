"""`picochat plan`: will a run fit on a device, how long will it take, what will it cost?

    picochat plan --preset d20 --gpu H100-80GB --gpus 8
    picochat plan --preset d32 --gpu H200 --gpus 8 --nodes 2 --price-per-gpu-hour 3.5
    picochat plan --depth 12 --device-batch-size 16 --gpu RTX4090

Memory per device during training, by term (bytes; P = parameters, V = vocabulary,
C = width, L = depth, N = tokens of one micro-batch on one device):
- parameters: fp32 master weights, 4 P (value embeddings included; the options' few scalars
  and gates are not counted).
- bf16 weight copies: with bf16 autocast, each block matrix is cast once per forward and the
  copy is kept for the backward (2 bytes each); compiled, lm_head too. The embedding is a
  lookup, never cast.
- gradients: fp32, 4 P, whole on every rank, when micro-batches accumulate into them. With
  one micro-batch per step they are created during the backward as activations are freed
  and the step zeroes them to None, so they add nothing to the peak (end of the forward).
- optimiser state: AdamW moments for the embedding, the value embeddings and lm_head (8 bytes per parameter),
  a Muon momentum buffer for every block matrix (4 bytes). With more than one rank it is
  assumed sharded over the ranks (ZeRO-2 style), so each holds 1/world of it.
- activations kept for the backward, per token: L a C + 12 C + 16 with a = 51 in bf16 and 77
  in fp32 eager (measured on CPU with saved-tensor hooks: 50.4 and 76.4, docs/LOG.md);
  compiled a = 30 (what the fused graph must keep: matmul inputs, attention q/k/v/out and the
  MLP hidden; an estimate, not measured here). 12 C + 16: the token ids, the embedding and
  final norms' inputs and the loss's gradient with respect to the hidden states.
- logits / loss buffers: eager runs lm_head + softcap + cross-entropy in chunks of 64M
  elements on a GPU (two fp32 buffers and one bf16) and 32M on a CPU (one buffer in the compute
  dtype: the fused C kernel), a bf16 copy of lm_head and its fp32 gradient, or, if larger, the
  loss's gradients at the start of the backward (lm_head's twice, the hidden states'); compiled
  materialises bf16 logits and their gradient, 4 N V.
- optimiser step temporaries: the peak may instead come at the optimiser step, when the
  gradients this rank owns exist (all of them in a world of 1) and Muon works through the
  matrices this rank updates one shape at a time, all of a shape as one stack: per matrix its
  Nesterov update and its copy in the stack (4 bytes each), the Newton-Schulz iterate and the
  next one, and two Gram matrices of its shorter side (4 bytes each in fp32, 2 in bf16: the
  orthogonalisation's dtype on a GPU and on a CPU with fast bf16).
  The largest such stack counts (`muon_step_temporaries`).
  The larger of the two moments (with rl, of three: below) is reported, with the terms alive at it.
- communication buffers: with more than one rank, two 32 MiB buckets in flight plus this
  rank's reduced gradient shard, 4 P / world.
- sampling (rl only): between steps, with no gradient and no activation alive, the Engine samples
  a batch of rows; a third moment: the parameters, optimiser state and communication buffers
  with the Engine's buffers instead (`sampling_memory`: the compute-dtype copy of the weights,
  the KV cache, one step's logits and, on a CPU, the decode path's weight copies).
- headroom: what is left for the CUDA context, NCCL and fragmentation: max(2 GiB, 5%) of a
  GPU; on a CPU 1 GiB per process (Python and torch themselves) plus 10%.

Time: steps * FLOPs per step / (devices * peak * MFU), with MFU an assumption (--mfu) and the peak
of the compute dtype: a GPU's dense bf16 peak, its plain fp32 one with --fp32; with --gpu cpu the
peak measured here in the dtype training here would pick (fp32 where bf16 matmuls are slow),
shared by the --gpus processes.
base-train, mid-train, sft and rl run the same estimate at start-up (see `check_fits`); rl's shape
adds its sampling (`sample_group`, `eval_rows`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from picochat.config import ModelOptions, add_preset_argument, option
from picochat.errors import ConfigError
from picochat.fileio import write_json
from picochat.infer.decode import MAX_COPY_BYTES as DECODE_COPY_BYTES
from picochat.infer.unembed import MAX_COPY_BYTES as UNEMBED_COPY_BYTES
from picochat.mfu import peak_flops
from picochat.model.gpt import GPT
from picochat.optim.muon import orthogonalisation_dtype
from picochat.optim.sharded import assign_owners
from picochat.runtime import home, pick_dtype

GiB = 2**30
BUCKET_BYTES = 32 << 20
ACT_EAGER_BF16, ACT_EAGER_FP32, ACT_COMPILED = 51, 77, 30  # bytes per token per layer, per unit of width


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int  # what torch.cuda.get_device_properties reports as total_memory
    peak_bf16: float  # dense FLOP/s (tensor cores)
    peak_fp32: float  # dense FLOP/s of plain fp32 matmuls (TF32 is never turned on)


DEVICES: dict[str, Device] = {
    "H100-80GB": Device("H100-80GB", 85_045_936_128, 989e12, 67e12),
    "H200": Device("H200", 150_110_011_392, 989e12, 67e12),
    "A100-40GB": Device("A100-40GB", 42_505_273_344, 312e12, 19.5e12),
    "A100-80GB": Device("A100-80GB", 85_198_045_184, 312e12, 19.5e12),
    "L4": Device("L4", 23_580_639_232, 121e12, 30.3e12),
    "RTX4090": Device("RTX4090", 25_393_692_672, 165e12, 82.6e12),
}


@dataclass(frozen=True)
class Shape:
    """What memory depends on: the model's size, one micro-batch, the world and how it runs."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    vocab_size: int
    seq_len: int  # tokens per row of a micro-batch
    device_batch_size: int
    world_size: int = 1
    compiled: bool = False
    bf16: bool = True
    on_gpu: bool = True
    total_batch_tokens: int = 0  # tokens per optimiser step, all ranks; 0: unknown (assume accumulation)
    mlp_ratio: int = 4
    value_embed_params: int = 0  # lookup tables trained by AdamW, like the embedding
    windows: tuple[int | None, ...] = ()  # per-layer attention windows (None: whole context); (): all whole
    sample_group: int = 0  # rl: completions per problem, min(device batch, this) sampled at once; 0: none
    eval_rows: int = 0  # rl: rows of one eval generation (the pass@k samples of a problem)

    @property
    def accumulates(self) -> bool:
        """More than one micro-batch per step (then gradients live across the forward)."""
        per_micro = self.device_batch_size * self.seq_len * self.world_size
        return self.total_batch_tokens <= 0 or self.total_batch_tokens > per_micro

    @property
    def sampling_rows(self) -> int:
        """Rows of the largest batch the Engine samples between steps (rl); 0 for the other stages."""
        return max(min(self.device_batch_size, self.sample_group), self.eval_rows) if self.sample_group else 0

    @classmethod
    def from_config(cls, config, device_batch_size: int, seq_len: int | None = None, **kw) -> Shape:
        kw.setdefault("mlp_ratio", config.mlp_ratio)
        kw.setdefault("value_embed_params", len(config.value_embed_layers()) * config.vocab_size
                      * config.n_kv_head * config.head_dim)
        kw.setdefault("windows", tuple(config.window_sizes()))
        return cls(config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.vocab_size,
                   seq_len or config.sequence_len, device_batch_size, **kw)

    @property
    def matrix_params(self) -> int:
        C, kv = self.n_embd, self.n_kv_head * (self.n_embd // self.n_head)
        return self.n_layer * (2 * C * C + 2 * C * kv + 2 * self.mlp_ratio * C * C)

    @property
    def params(self) -> int:
        return self.matrix_params + 2 * self.vocab_size * self.n_embd + self.value_embed_params

    def flops_per_token(self) -> int:
        """As GPT.flops_per_token: 6 per matmul parameter plus attention over the context (its window)."""
        scaling = self.matrix_params + self.vocab_size * self.n_embd
        T = self.seq_len
        attended = sum(T if w is None else min(w, T) for w in self.windows) if self.windows else self.n_layer * T
        return 6 * scaling + 12 * self.n_embd * attended


def muon_step_temporaries(s: Shape) -> int:
    """Bytes Muon's step allocates at its peak on the busiest rank. Muon updates the matrices of one
    shape together (picochat.optim.muon.Muon.step), those this rank owns (picochat.optim.sharded's
    assign_owners); per (rows, cols) matrix: its Nesterov update and its copy in the stack (fp32), the
    Newton-Schulz iterate, the next one and two Gram matrices of its shorter side (in the orthogonalisation
    dtype: bf16 on a GPU and on a CPU with fast bf16, where the fp32 result next to the last bf16 iterate
    can be the larger moment)."""
    e = orthogonalisation_dtype(torch.device("cuda" if s.on_gpu else "cpu")).itemsize
    C, kv = s.n_embd, s.n_kv_head * (s.n_embd // s.n_head)
    hidden = s.mlp_ratio * C
    # The block matrices in parameter order: q, k, v, attention out, MLP in, MLP out.
    shapes = [(C, C), (kv, C), (kv, C), (C, C), (hidden, C), (C, hidden)] * s.n_layer
    owners = assign_owners([rows * cols for rows, cols in shapes], s.world_size)
    stacks = Counter(zip(owners, shapes))  # (rank, shape) -> matrices in one stack
    return max(max((8 + 2 * e) * rows * cols + 2 * e * min(rows, cols) ** 2, (10 + e) * rows * cols) * count
               for (_, (rows, cols)), count in stacks.items())


SAMPLING = "sampling (weights copy, KV cache)"


def sampling_memory(s: Shape) -> int:
    """Bytes the Engine (picochat.infer.engine) holds at once while rl samples `sampling_rows` rows of
    up to seq_len positions between steps; 0 for a shape that does not sample. Counted:
    - the compute-dtype copy of the weights a generation reads (GPT.with_weights_in): 2 bytes per
      parameter in bf16; fp32 weights computing in fp32 are read as they are;
    - the KV cache: keys and values of every layer in fp32 (the lean decode path's dtype; the compute
      dtype's otherwise, no more), and the smear option's fp32 embeddings whether the option is on or not;
    - one decode step's logits and the sampler's two copies of them (fp32, rows x V each);
    - on a CPU, the per-generation copies of the block matrices (picochat.infer.decode) and of lm_head
      (picochat.infer.unembed; fp32 at most), each made only under its module's MAX_COPY_BYTES.
    Left out: the prefill (one row, in inference mode: no activation is kept past its layer) and a
    prefill padded beyond seq_len on a CPU (fewer than 64 positions, picochat.infer.engine.PREFILL_BUCKET).
    """
    rows = s.sampling_rows
    if not rows:
        return 0
    low, C, V = (2 if s.bf16 else 4), s.n_embd, s.vocab_size
    kv = s.n_kv_head * (C // s.n_head)
    weights = low * s.params if s.bf16 else 0
    cache = rows * s.seq_len * (8 * s.n_layer * kv + 4 * C)
    logits = 3 * 4 * rows * V
    if s.on_gpu:
        return weights + cache + logits
    blocks = low * s.matrix_params
    head = 4 * V * C if low * V * C <= UNEMBED_COPY_BYTES else 0
    return weights + cache + logits + (blocks if blocks <= DECODE_COPY_BYTES else 0) + head


def memory_terms(s: Shape) -> dict[str, int]:
    """Training memory of one device by term at its peak, in bytes (headroom not included).

    Two moments compete: the end of the forward (activations and loss buffers alive) and the
    optimiser step (every gradient alive, plus the update's temporaries); with rl's sampling a third,
    its Engine's buffers (`sampling_memory`, a term of its own). The largest one is returned.
    """
    P, V, C, L = s.params, s.vocab_size, s.n_embd, s.n_layer
    N = s.device_batch_size * s.seq_len
    embed = V * C
    optimiser = 8 * (2 * embed + s.value_embed_params) + 4 * s.matrix_params
    a = ACT_COMPILED if s.compiled else (ACT_EAGER_BF16 if s.bf16 else ACT_EAGER_FP32)
    activations = N * (L * a * C + 12 * C + 16)
    if s.compiled and s.on_gpu:  # on a CPU only the trunk is compiled (gpt.compiled_for_training)
        logits = 4 * N * V
    else:
        low = 2 if s.bf16 else 4  # bytes of the compute dtype
        per_element = (8 + (2 if s.bf16 else 0)) if s.on_gpu else low
        buffers = min(N, ((64 if s.on_gpu else 32) << 20) // V) * V * per_element
        # At the start of the backward the chunk buffers are gone, but the saved lm_head gradient is
        # scaled into a new tensor, lm_head's .grad is created and the hidden states' gradient copied.
        backward = 8 * V * C + (0 if s.accumulates else 4 * V * C) + 4 * N * C
        logits = max(buffers + 4 * V * C + low * V * C, backward)
    # Every moment has every term, in this order: 0 where the term holds nothing at that moment.
    zero = dict.fromkeys(["parameters", "bf16 weight copies", "gradients", "optimiser state", "activations",
                          "logits / loss buffers", "optimiser step temporaries", "communication buffers",
                          *([SAMPLING] if s.sample_group else [])], 0)
    fixed = {**zero, "parameters": 4 * P, "optimiser state": optimiser // s.world_size,
             "communication buffers": (2 * BUCKET_BYTES + 4 * P // s.world_size) if s.world_size > 1 else 0}
    copies = 2 * (s.matrix_params + (embed if s.compiled else 0)) if s.bf16 else 0
    forward_end = {**fixed, "bf16 weight copies": copies, "gradients": 4 * P if s.accumulates else 0,
                   "activations": activations, "logits / loss buffers": logits}
    # The optimiser step: every gradient exists (sharded, a rank keeps only the gradients of what it
    # owns once they are reduced), and Muon orthogonalises one shape's matrices at a time.
    step = {**fixed, "gradients": 4 * P // s.world_size,
            "optimiser step temporaries": muon_step_temporaries(s)}
    moments = [forward_end, step]
    if s.sample_group:  # rl samples between steps, after the step has zeroed the gradients to None
        moments.append({**fixed, SAMPLING: sampling_memory(s)})
    return max(moments, key=lambda terms: sum(terms.values()))


def headroom(capacity: int, on_gpu: bool) -> int:
    return max(2 * GiB, capacity // 20) if on_gpu else GiB + capacity // 10


def fits(s: Shape, capacity: int) -> bool:
    return sum(memory_terms(s).values()) + headroom(capacity, s.on_gpu) <= capacity


def largest_batch(s: Shape, capacity: int, candidates: list[int] | None = None) -> int:
    """The largest device batch (of `candidates`, default 1..1024) that fits, or 0."""
    batches = candidates or range(1, 1025)
    return max((b for b in batches if fits(replace(s, device_batch_size=b), capacity)), default=0)


def valid_batches(total: int, seq_len: int, world: int) -> list[int]:
    """Device batches B for which total tokens per step is a whole number of micro-batches."""
    rows = total // seq_len if total % seq_len == 0 else 0
    return [b for b in range(1, rows // world + 1) if rows % (b * world) == 0] if rows else []


def explain_batch_divisibility(total: int, batch: int, seq_len: int, world: int, total_flag: str,
                               batch_flag: str = "--device-batch-size") -> str | None:
    """None when `total` splits into micro-batches of batch*seq_len*world; else the fix, in words."""
    per_micro = batch * seq_len * world
    if total % per_micro == 0:
        return None
    head = (f"{total_flag} {total} must be a multiple of {batch_flag.lstrip('-').replace('-', '_')}*seq_len*world "
            f"= {batch}*{seq_len}*{world} = {per_micro}")
    b = max([c for c in valid_batches(total, seq_len, world) if c < batch], default=0)
    if b:
        return (f"{head}; with {world} process(es) use {batch_flag} {b} "
                f"({total // (b * seq_len * world)} micro-batch(es) per step), or a {total_flag} that is a "
                f"multiple of {per_micro}")
    return f"{head}; use a {total_flag} that is a multiple of {per_micro} (or fewer processes)"


# ---- the start-up check of the training commands ------------------------------------------------


def local_capacity(device) -> tuple[int, str]:
    """(bytes one process may use, a description) for the device this process trains on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), props.name
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return total // local, f"CPU RAM / {local} process(es)"


def check_fits(s: Shape, device, batch_flag: str, candidates: list[int]) -> None:
    """Refuse, before anything is allocated, a run whose estimate does not fit this device.

    The error names `batch_flag` and the largest of `candidates` that fits.
    """
    if device.type not in ("cuda", "cpu"):
        return
    capacity, what = local_capacity(device)
    s = replace(s, on_gpu=device.type == "cuda")
    need = sum(memory_terms(s).values()) + headroom(capacity, s.on_gpu)
    if need <= capacity:
        return
    best = largest_batch(s, capacity, [b for b in candidates if b < s.device_batch_size])
    fix = (f"use {batch_flag} {best}" if best else
           "no smaller batch fits either: use a smaller model, more processes or a bigger device")
    raise ConfigError(f"{batch_flag} {s.device_batch_size} needs ~{need / GiB:.1f} GiB per device "
                      f"(estimate of `picochat plan`) but {what} has {capacity / GiB:.1f} GiB; {fix} "
                      "(or --no-plan-check to try anyway)")


# ---- the command --------------------------------------------------------------------------------

B_REF = 2 ** 19  # tokens per step the 2026 recipe was tuned at, on a depth-12 model
REF_DEPTH = 12
SIZE, TARGET = "model and batch (default: the preset's, else d20's)", "target"


@dataclass
class PlanConfig(ModelOptions):
    """What `picochat plan` plans: a pretraining run's model, batch and horizon, and the hardware."""

    PRETRAINING: ClassVar[bool] = True

    preset: str | None = option(None, "the --preset the options came from", cli=False)
    vocab_size: int = option(65536, "tokenizer vocabulary size", group=SIZE)
    device_batch_size: int = option(32, "sequences per micro-batch per device", group=SIZE, minimum=1)
    total_batch_size: int = option(524288, "tokens per optimiser step (-1: automatic, as base-train)", group=SIZE)
    num_iterations: int = option(-1, "optimiser steps (default: from the data ratio)", group=SIZE)
    target_param_data_ratio: float = option(20.0, "tokens per scaling parameter", group=SIZE)
    time_budget: float = option(-1.0, "a preset's minutes of pretraining", cli=False)
    gpu: str = option("H100-80GB", "device kind", group=TARGET, choices=[*DEVICES, "cpu"])
    gpus: int = option(8, "devices per node", group=TARGET)
    nodes: int = option(1, "nodes", group=TARGET)
    price_per_gpu_hour: float | None = option(None, "price of one device-hour, for the cost", group=TARGET)
    mfu: float | None = option(None, "assumed model FLOPs utilisation in percent (default 40 on GPUs, 30 on a CPU)",
                               group=TARGET)
    eager: bool = option(False, "plan an uncompiled run (default: compiled on GPUs)", group=TARGET, store_true=True)
    fp32: bool = option(False, "plan fp32 compute instead of bf16 (with --gpu cpu: instead of what training "
                                 "here picks)", group=TARGET, store_true=True)
    out: str | None = option(None, "write the plan as JSON here (default $PICOCHAT_HOME/plans/...)")
    batch_from_flag: bool = option(True, "whether --device-batch-size was given (else the preset's is lowered "
                                   "to divide the step over the world, as base-train does)", cli=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        given = getattr(args, "device_batch_size", None) is not None
        return replace(super().from_args(args), batch_from_flag=given)


def scaling_params(config) -> int:
    """The model's matmul parameters (GPT.num_scaling_params), counted on the meta device."""
    with torch.device("meta"):
        return GPT(config).num_scaling_params()


def batch_growth(opts: ModelOptions, config) -> float:
    """D / D_ref at a fixed tokens-per-parameter ratio: this model's scaling parameters over those
    of a depth-12 model with the same options."""
    return scaling_params(config) / scaling_params(opts.model_config(config.vocab_size, depth=REF_DEPTH))


def auto_batch(growth: float) -> int:
    """Tokens per step for a horizon `growth` times the depth-12 one: 2^19 growth^0.383, to a power of 2."""
    return 2 ** round(math.log2(B_REF * growth ** 0.383))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p)
    PlanConfig.add_arguments(p)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _target(cfg: PlanConfig) -> tuple[Device, torch.dtype]:
    """The device planned for and its compute dtype: fp32 with --fp32; else bf16 on a GPU, and on the CPU
    what training there would pick (pick_dtype: fp32 where bf16 matmuls are slow)."""
    if cfg.gpu != "cpu":
        return DEVICES[cfg.gpu], torch.float32 if cfg.fp32 else torch.bfloat16
    dtype = torch.float32 if cfg.fp32 else pick_dtype(torch.device("cpu"))
    # --gpus processes share this CPU: each gets its share of the memory and of the cores (init_distributed).
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = peak_flops(torch.device("cpu"), dtype) / max(1, cfg.gpus)
    return Device("cpu", total // max(1, cfg.gpus), peak, peak), dtype


def build_plan(cfg: PlanConfig) -> dict:
    """Everything the command prints, as one JSON-ready dict."""
    if cfg.gpus < 1 or cfg.nodes < 1:
        raise ConfigError(f"--gpus {cfg.gpus} --nodes {cfg.nodes}: both must be at least 1")
    if cfg.total_batch_size != -1 and cfg.total_batch_size < 1:
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size}: give tokens per step, or -1 for automatic")
    if cfg.mfu is not None and not 0 < cfg.mfu <= 100:
        raise ConfigError(f"--mfu {cfg.mfu}: give the assumed utilisation in percent, above 0 and at most 100")
    device, dtype = _target(cfg)
    world = cfg.gpus * cfg.nodes
    on_gpu = cfg.gpu != "cpu"
    config = cfg.model_config(cfg.vocab_size)
    if cfg.total_batch_size == -1:
        cfg.total_batch_size = auto_batch(batch_growth(cfg, config))
    candidates = valid_batches(cfg.total_batch_size, cfg.max_seq_len, world)
    batch = cfg.device_batch_size
    if batch not in candidates and not cfg.batch_from_flag:  # base-train's check_batch lowers a preset's batch
        batch = max([b for b in candidates if b < batch], default=batch)
    s = Shape.from_config(config, batch, world_size=world, compiled=on_gpu and not cfg.eager,
                          bf16=dtype != torch.float32, on_gpu=on_gpu, total_batch_tokens=cfg.total_batch_size)
    terms = memory_terms(s)
    room = headroom(device.memory_bytes, on_gpu)
    mfu = (cfg.mfu if cfg.mfu is not None else (40.0 if on_gpu else 30.0)) / 100
    steps = cfg.num_iterations if cfg.num_iterations and cfg.num_iterations > 0 else \
        int(cfg.target_param_data_ratio * (s.matrix_params + s.vocab_size * s.n_embd)) // cfg.total_batch_size
    peak = device.peak_fp32 if dtype == torch.float32 else device.peak_bf16
    step_s = s.flops_per_token() * cfg.total_batch_size / (world * peak * mfu)
    if cfg.time_budget and cfg.time_budget > 0:  # the preset trains for a time: the steps that fit in it
        steps = int(60 * cfg.time_budget / step_s)
    hours = steps * step_s / 3600
    return {
        "model": {"depth": config.n_layer, "width": config.n_embd, "heads": config.n_head, "vocab": config.vocab_size,
                  "seq_len": config.sequence_len, "params": s.params, "flops_per_token": s.flops_per_token()},
        "target": {"device": device.name, "devices_per_node": cfg.gpus, "nodes": cfg.nodes, "world": world,
                   "memory_bytes": device.memory_bytes, "compiled": s.compiled, "dtype": DTYPE_NAMES[dtype],
                   "optimiser_state_sharded": world > 1},
        "device_batch_size": s.device_batch_size,
        "device_batch_lowered_from": cfg.device_batch_size if batch != cfg.device_batch_size else None,
        "memory_bytes": terms, "total_bytes": sum(terms.values()), "headroom_bytes": room,
        "fits": sum(terms.values()) + room <= device.memory_bytes,
        "batch_divides": s.device_batch_size in candidates,
        "largest_device_batch": largest_batch(s, device.memory_bytes, candidates) if candidates else 0,
        "largest_device_batch_eager": (largest_batch(replace(s, compiled=False), device.memory_bytes,
                                                     candidates) if candidates else 0),
        "mfu_assumed": mfu, "steps": steps, "step_seconds": step_s, "hours": hours,
        "cost": hours * world * cfg.price_per_gpu_hour if cfg.price_per_gpu_hour is not None else None,
    }


def render(plan: dict, name: str) -> str:
    m, t = plan["model"], plan["target"]
    world = t["world"]
    lines = [(f"plan {name}: depth {m['depth']}, width {m['width']}, {m['params'] / 1e6:,.0f}M params, "
              f"device batch {plan['device_batch_size']} x {m['seq_len']} tokens"
              + (f" (the preset's {plan['device_batch_lowered_from']}, lowered to divide the step, as base-train "
                 "does)" if plan.get("device_batch_lowered_from") else "") + ", "
              f"{'compiled' if t['compiled'] else 'eager'} {t['dtype']}"),
             (f"target: {t['devices_per_node']} x {t['device']} x {t['nodes']} node(s) = {world} device(s), "
              f"{t['memory_bytes'] / GiB:.1f} GiB each"),
             "memory per device" + (f" (optimiser state assumed sharded over the {world} ranks, ZeRO-2 style):"
                                    if world > 1 else ":")]
    for term, b in plan["memory_bytes"].items():
        note = " (one micro-batch per step: made during the backward)" if term == "gradients" and not b else ""
        lines.append(f"  {term:<28}{b / GiB:8.2f} GiB{note}")
    lines += [f"  {'total':<28}{plan['total_bytes'] / GiB:8.2f} GiB",
              f"  {'headroom':<28}{plan['headroom_bytes'] / GiB:8.2f} GiB "
              + ("(CUDA context, NCCL, fragmentation)" if t["device"] != "cpu" else "(Python and torch themselves)"),
              f"fits: {'yes' if plan['fits'] else 'NO'} ({(plan['total_bytes'] + plan['headroom_bytes']) / GiB:.1f} "
              f"of {t['memory_bytes'] / GiB:.1f} GiB)"
              + ("" if plan["batch_divides"] else "; the device batch does not divide --total-batch-size here"),
              (f"largest device batch that fits: {plan['largest_device_batch']}"
               f" ({plan['largest_device_batch_eager']} uncompiled)"),
              (f"time: {plan['steps']:,} steps x {plan['step_seconds']:.2f} s at {plan['mfu_assumed']:.0%} MFU "
               f"(assumed) = {plan['hours']:.2f} h")]
    if plan["cost"] is not None:
        lines.append(f"cost: {plan['hours']:.2f} h x {world} devices = {plan['hours'] * world:.1f} device-hours "
                     f"= {plan['cost']:,.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = PlanConfig.from_args(args)
    plan = build_plan(cfg)
    name = cfg.preset or f"d{cfg.depth}"
    print(render(plan, name))
    out = cfg.out or home() / "plans" / f"{name}-{cfg.gpu}-{cfg.gpus}x{cfg.nodes}.json"
    try:
        write_json(out, plan, indent=1)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the plan there ({e.strerror or e}); "
                          "give a file path in a writable directory") from e
    print(f"written to {out}")
    return 0

