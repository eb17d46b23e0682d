"""Recipe benchmark: picochat and the reference system trained side by side on the same data.

    python bench/recipe.py --reference-dir ~/src/nanochat                   # cpu geometry, 1 seed
    python bench/recipe.py --reference-dir ~/src/nanochat --seeds 1 2       # mean and spread of 2 seeds
    python bench/recipe.py --reference-dir ~/src/nanochat --pico-args="--preset cpu --recipe 2026"
    python bench/recipe.py --systems pico --steps 50                        # picochat alone, short

Runs (`--systems`):
- `pico`: `picochat base-train` with `--pico-args` (default `--preset cpu`; anything base-train
  accepts passes through) and then the bench's geometry, data, tokenizer, seed and dtype flags,
  which win over the same flags in `--pico-args`.
- `ref`: the reference checkout at `--reference-dir`, imported in a worker process: its GPT
  (window pattern `--window-pattern`, default "L": full attention everywhere), its
  `setup_optimizer`, and its own BOS-aligned best-fit loader (imported, not reimplemented),
  which reads our shards through symlinks in a scratch `$NANOCHAT_BASE_DIR` and gets
  picochat's token ids through a two-method tokenizer shim. Its hyperparameters are its
  training script's defaults at this batch, reimplemented here from reading them: LRs
  embedding 0.3, unembedding 0.008, matrix 0.02, scalars 0.5, each times sqrt(B / 2^19)
  (B = tokens per step; 1/11.3 at 4,096); Muon weight decay 0.28 * sqrt(B / 2^19) * D12 / D,
  where D = 12 (its tokens:params ratio) * scaling parameters (block matrices + lm_head) and
  D12 the same for its depth-12 model at our width rule and vocab; LR multiplier: 40 linear
  warm-up steps, constant, then the last 65% linearly down to 0.05 (picochat's
  `warmup_constant_warmdown` computes the same formula); Muon momentum 0.85 -> 0.97 over the
  first 400 steps, then 0.97, and 0.97 -> 0.90 across the warmdown, the warm-up taking
  precedence where both apply; weight decay times (1 + cos(pi * step / horizon)) / 2. The
  model is torch.compile'd, as its training script does (`--ref-compile off` to skip).
- `ref-rescaled`: the same with the LR batch factor sqrt(B / 2^19) undone (LRs at their
  2^19-token values); the weight decay keeps its factor.

Every run trains on the same built-in-corpus shards (`--data-dir`), at the same geometry
(default: the cpu preset's), with one tokenizer: picochat's BPE at `--vocab`, trained once by
`picochat tok-train` into the scratch directory (`--scratch`) and reused while the shards
are the same. Checkpoints and logs go to a directory of this invocation's own under
`<scratch>/runs/`, removed at the end, so benchmarks sharing a scratch directory never mix
their runs. Both systems compute in `--dtype` (auto: what picochat picks here).

Modes (`--modes`): `tokens` trains `--steps` steps of the same tokens per step;
`wall` trains for `--wall-seconds` (default: the seconds picochat's `tokens` run of the same
seed trained, so picochat's `wall` row is that run). Wall time counts the training steps only
(forward, backward, optimiser, the loader's next batch), not the first 3 steps
(warm-up and compilation), evaluations or checkpoints. A `wall` run sets its LR
schedule horizon as picochat's `--time-budget` does: it times at least 8 steps after the first 3,
and 3% of the budget, under the schedule of an endless run, then fixes the horizon to the steps that fit in the seconds
left, and runs to it (so it ends near, not exactly at, the budget). picochat's own `wall`
run, when `--wall-seconds` is given, is `base-train --time-budget`, whose clock counts its
whole loop (and whose `--compile auto` compiles a bf16 run of 5 minutes or more, as the cpu preset's
pretraining is; add `--compile off` to `--pico-args` for an eager row).

One evaluator for every model (picochat's `evaluate_bpb`, run in a worker process): each model
is wrapped in `LogitsLoss`, which asks it for (B, T, vocab) logits and takes the cross-entropy
itself, on token rows built here from the val shard:
- whole val text: every val document with <|bos|> in front, concatenated, cut into rows of
  `--seq-len` targets (the last row padded with ignored targets): every token but the first
  is scored exactly once;
- document starts: the first `--seq-len` targets of each val document (<|bos|> as the first
  input), padded: the only text the best-fit loader ever trains on at this context.
Curves: train loss (mean over every `--loss-every` steps) and val bpb at every `--eval-every`
steps of the `tokens` runs (from checkpoints saved during training), scored on the first
`--curve-tokens` targets of the whole-text rows (131,072 by default, about a third of the
built-in val text: an evaluation costs about a training step per batch on a CPU).
Compute multiplier: the tokens picochat needs to reach another system's final bpb on those
same targets (interpolated linearly in log tokens between eval points), relative to that
system's tokens; above 1 picochat needs fewer tokens. It is computed on the seed-mean curves.
`--reuse FILE` takes the runs (seed, system, mode) a previous results file of the same
configuration holds instead of running them again (run seed 1, then `--seeds 1 2 --reuse` its
file); `--rerun pico` runs picochat again all the same, e.g. after a preset has changed, or with other
`--pico-args` against the same reference runs.

Every training and evaluation runs in its own process, one at a time, with `--threads`
threads; both systems run with the OpenMP settings picochat makes on import. Prints the
machine, progress lines, a table (mean and, with several seeds, +- half the max-min spread)
and one JSON line; the JSON file at --out (default $PICOCHAT_HOME/bench/recipe-<time>.json)
also holds every run's curves. After each seed the file holds the seeds so far, marked
`"partial": true` (which the complete file does not have), so a stopped run can be continued with
`--reuse` that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from machine import describe_machine, format_machine
from results import default_out, write_results

from picochat.config import PRESETS
from picochat.data.shards import default_data_dir, iter_texts, list_shards
from picochat.errors import ConfigError, DataError, UserError
from picochat.eval.bpb import evaluate_bpb
from picochat.runtime import home, pick_dtype
from picochat.train.schedules import warmup_constant_warmdown

RESULT_PREFIX = "RECIPE_RESULT "
SYSTEMS = ("pico", "ref", "ref-rescaled")
MODES = ("tokens", "wall")
UNTIMED_STEPS = 3  # the first steps pay for warm-up and compilation (as picochat's loop counts)
MEASURE_STEPS = 8  # timed steps before a wall-time run fixes its horizon (as picochat's --time-budget),
MEASURE_FRACTION = 0.03  # and the share of the wall budget they must have taken
UNFIXED_HORIZON = 2**31  # the horizon the schedule sees until then: no decay has started
STEP_LINE = re.compile(r"^step\s+(\d+)/")
# The reference training script's defaults (read from it, not imported: it is a script).
REF_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}
REF_WEIGHT_DECAY, REF_RATIO, REF_BATCH, REF_DEPTH = 0.28, 12.0, 2**19, 12
REF_WARMUP, REF_WARMDOWN, REF_FINAL_LR = 40, 0.65, 0.05
REF_MOMENTUM_WARMUP = 400


# ---- the reference's schedules and hyperparameters (pure) ----------------------------------------

def ref_lr_multiplier(step: int, horizon: int) -> float:
    return warmup_constant_warmdown(step, horizon, REF_WARMUP, REF_WARMDOWN, REF_FINAL_LR)


def ref_muon_momentum(step: int, horizon: int) -> float:
    """0.85 -> 0.97 over the first 400 steps (first), 0.97 -> 0.90 across the warmdown, else 0.97."""
    warmdown = round(REF_WARMDOWN * horizon)
    if step < REF_MOMENTUM_WARMUP:
        return 0.85 + (0.97 - 0.85) * step / REF_MOMENTUM_WARMUP
    if warmdown and step >= horizon - warmdown:
        return 0.97 + (0.90 - 0.97) * (step - (horizon - warmdown)) / warmdown
    return 0.97


def ref_weight_decay(step: int, horizon: int, initial: float) -> float:
    return initial * 0.5 * (1 + math.cos(math.pi * step / horizon))


def ref_hyperparameters(batch_tokens: int, scaling_params: int, d12_scaling_params: int, rescaled: bool) -> dict:
    """`setup_optimizer` keyword arguments: the script's defaults at this batch (LR batch factor
    undone when `rescaled`), and its weight decay for this model size and batch."""
    batch_scale = math.sqrt(batch_tokens / REF_BATCH)
    lr_scale = 1.0 if rescaled else batch_scale
    decay = REF_WEIGHT_DECAY * batch_scale * (REF_RATIO * d12_scaling_params) / (REF_RATIO * scaling_params)
    return {**{k: v * lr_scale for k, v in REF_LRS.items()}, "weight_decay": decay}


# ---- evaluation rows and the compute multiplier (pure) ------------------------------------------

def whole_text_rows(docs: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (R, T) over the concatenated documents; the last row's missing targets are -1."""
    stream = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
    rows = -(-(len(stream) - 1) // seq_len)
    padded = torch.full((rows * seq_len + 1,), -1, dtype=torch.long)
    padded[:len(stream)] = stream
    inputs, targets = padded[:-1].view(rows, seq_len).clone(), padded[1:].view(rows, seq_len)
    return inputs.clamp(min=0), targets  # a padded input position only precedes ignored targets


def doc_start_rows(docs: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (docs, T): the first T+1 tokens of each document, padded targets -1."""
    inputs = torch.zeros(len(docs), seq_len, dtype=torch.long)
    targets = torch.full((len(docs), seq_len), -1, dtype=torch.long)
    for i, doc in enumerate(docs):
        head = torch.tensor(doc[:seq_len + 1], dtype=torch.long)
        inputs[i, :len(head) - 1], targets[i, :len(head) - 1] = head[:-1], head[1:]
    return inputs, targets


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> tuple[float, bool] | None:
    """(tokens, exact) at which an ascending-tokens (tokens, bpb) curve first reaches `target`,
    linear in log tokens between eval points; exact is False when the first point already
    does (an upper bound); None when no point does."""
    previous = None
    for tokens, bpb in curve:
        if bpb <= target:
            if previous is None:
                return float(tokens), False
            t0, b0 = previous
            frac = (b0 - target) / (b0 - bpb)
            return math.exp(math.log(t0) + frac * (math.log(tokens) - math.log(t0))), True
        previous = (tokens, bpb)
    return None


class LogitsLoss(torch.nn.Module):
    """Per-token cross-entropy (B, T), 0 where targets are -1, from any model that maps (B, T)
    ids to (B, T, vocab) logits: the one scorer both systems are evaluated through."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_reduction: str = "none") -> torch.Tensor:
        logits = self.model(x)  # (B, T, vocab)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
        return losses.view_as(y)


# ---- worker side ----------------------------------------------------------------------------------

class ReferenceTokenizer:
    """The two calls the reference's loader makes, answered by picochat's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def get_bos_token_id(self) -> int:
        return self.tokenizer.bos_id

    def encode(self, texts, prepend=None, num_threads=None):
        return self.tokenizer.encode(texts, prepend=prepend, num_threads=num_threads)


def import_reference(reference_dir: str):
    """The reference's gpt and dataloader modules (its dtype is fixed by $NANOCHAT_DTYPE at import)."""
    sys.path.insert(0, reference_dir)
    # Imported here: only a worker with the checkout on sys.path can import them.
    from nanochat import dataloader, gpt

    return gpt, dataloader


def build_reference_model(gpt, spec: dict, depth: int, device: str = "meta"):
    """Its GPT at our geometry, as its training script sizes it: width rounded up to head_dim."""
    width = -(-depth * spec["aspect_ratio"] // spec["head_dim"]) * spec["head_dim"]
    heads = width // spec["head_dim"]
    config = gpt.GPTConfig(sequence_len=spec["seq_len"], vocab_size=spec["vocab"], n_layer=depth, n_head=heads,
                           n_kv_head=heads, n_embd=width, window_pattern=spec["window_pattern"])
    with torch.device("meta"):
        model = gpt.GPT(config)
    if device != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


def scaling_params(model) -> int:
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def ref_train(spec: dict) -> dict:
    """Train the reference for `steps` steps, or for `wall_seconds`; checkpoints at `save_steps`."""
    from picochat.tokenizer import Tokenizer

    gpt, dataloader = import_reference(spec["reference_dir"])
    torch.manual_seed(spec["seed"])
    model = build_reference_model(gpt, spec, spec["depth"], "cpu")
    hyper = ref_hyperparameters(spec["batch_tokens"], scaling_params(model),
                                scaling_params(build_reference_model(gpt, spec, REF_DEPTH)), spec["rescaled"])
    optimizer = model.setup_optimizer(**hyper)
    train_model = torch.compile(model, dynamic=False) if spec["compile"] else model
    tokenizer = ReferenceTokenizer(Tokenizer.load(spec["tokenizer_dir"]))
    loader = dataloader.tokenizing_distributed_data_loader_bos_bestfit(
        tokenizer, spec["device_batch"], spec["seq_len"], "train", device="cpu")
    accum = spec["batch_tokens"] // (spec["device_batch"] * spec["seq_len"])
    wall = spec.get("wall_seconds")
    horizon = UNFIXED_HORIZON if wall else spec["steps"]
    x, y = next(loader)
    steps, timed, checkpoints = [], 0.0, {}
    while len(steps) < horizon:
        step = len(steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * ref_lr_multiplier(step, horizon)
            if group["kind"] == "muon":
                group["momentum"] = ref_muon_momentum(step, horizon)
                group["weight_decay"] = ref_weight_decay(step, horizon, hyper["weight_decay"])
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        for _ in range(accum):
            loss = train_model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach().float()
            x, y = next(loader)  # the loader's work counts in the step, as in its training script
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss_sum.item() / accum
        dt = time.perf_counter() - t0
        steps.append({"step": step + 1, "loss": loss_value, "dt": dt})
        timed += dt if step >= UNTIMED_STEPS else 0.0
        if wall and horizon == UNFIXED_HORIZON and ((step + 1 - UNTIMED_STEPS >= MEASURE_STEPS
                                                       and timed >= MEASURE_FRACTION * wall) or timed >= wall):
            per_step = timed / max(1, step + 1 - UNTIMED_STEPS)
            horizon = step + 1 + max(0, int((wall - timed) // per_step))
            print(f"wall time {wall:.0f}s: {per_step * 1000:.0f} ms/step -> horizon fixed at {horizon} steps", flush=True)
        print(f"step {step + 1:5d}/{horizon if horizon != UNFIXED_HORIZON else '?'} | loss {loss_value:.4f} | "
              f"dt {dt * 1000:.0f}ms | tok/s {spec['batch_tokens'] / dt:,.0f}", flush=True)
        if step + 1 == horizon or (not wall and (step + 1) % spec["save_every"] == 0):
            path = Path(spec["out_dir"]) / f"step_{step + 1}.pt"
            torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, path)
            checkpoints[step + 1] = str(path)
    return {"steps": steps, "horizon": horizon, "checkpoints": checkpoints, "hyperparameters": hyper,
            "lrs": [group["initial_lr"] for group in optimizer.param_groups]}


def load_for_eval(item: dict, spec: dict) -> torch.nn.Module:
    """A saved model of either system, ready to give logits."""
    from picochat.checkpoint import load_checkpoint_dir

    if item["system"] == "pico":
        return load_checkpoint_dir(Path(item["path"]), "cpu")[0]
    gpt, _ = import_reference(spec["reference_dir"])
    saved = torch.load(item["path"], map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**saved["config"]))
    model.to_empty(device="cpu")
    model.init_weights()  # the buffers (rotary tables) and the dtype of its embeddings
    model.load_state_dict(saved["state_dict"])
    return model


def bpb_and_bytes(scorer, rows: tuple[torch.Tensor, torch.Tensor], batch: int, token_bytes: torch.Tensor,
                  dtype: torch.dtype) -> tuple[float, int]:
    """(bpb, UTF-8 bytes of the scored targets) of (inputs, targets) rows, `batch` rows at a time."""
    inputs, targets = rows
    batches = [(inputs[i:i + batch], targets[i:i + batch]) for i in range(0, len(inputs), batch)]
    nbytes = int(token_bytes[targets.clamp(min=0)][targets >= 0].sum())
    return evaluate_bpb(scorer, iter(batches), len(batches), token_bytes, dtype), nbytes


def evaluate(spec: dict) -> dict:
    """Curve bpb (the first `curve_tokens` val targets) of every listed checkpoint; for a run's
    final checkpoint also the whole-text and document-start val bpb."""
    from picochat.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(spec["tokenizer_dir"])
    texts = [t for _, docs in iter_texts(Path(spec["val_file"])) for t in docs if t]
    docs = tokenizer.encode(texts, prepend=tokenizer.bos_id)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    dtype = pick_dtype(torch.device("cpu"), spec["dtype"])
    inputs, targets = whole_text_rows(docs, spec["seq_len"])
    head = spec["curve_tokens"] // spec["seq_len"] or len(inputs)
    curve_rows, rest_rows = (inputs[:head], targets[:head]), (inputs[head:], targets[head:])
    out = {}
    for item in spec["checkpoints"]:
        scorer = LogitsLoss(load_for_eval(item, spec))
        curve, curve_bytes = bpb_and_bytes(scorer, curve_rows, spec["batch"], token_bytes, dtype)
        result = {"curve_bpb": curve}
        if item["final"]:  # the whole text = the curve's rows + the rest, weighted by their bytes
            rest, rest_bytes = bpb_and_bytes(scorer, rest_rows, spec["batch"], token_bytes, dtype) \
                if len(rest_rows[0]) else (0.0, 0)
            result["val_bpb"] = (curve * curve_bytes + rest * rest_bytes) / (curve_bytes + rest_bytes)
            result["val_bpb_doc_starts"] = bpb_and_bytes(scorer, doc_start_rows(docs, spec["seq_len"]), spec["batch"],
                                                         token_bytes, dtype)[0]
        out[item["key"]] = result
        print(f"eval {item['key']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    return {"results": out, "val_docs": len(docs), "val_tokens": sum(map(len, docs)),
            "curve_tokens": int((curve_rows[1] >= 0).sum())}


def worker_main(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    result = {"ref-train": ref_train, "eval": evaluate}[spec["kind"]](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- driver side ----------------------------------------------------------------------------------

def run_process(cmd: list[str], label: str, env_extra: dict, threads: int, progress_every: int) -> dict:
    """Run one process, echoing its progress; returns its result line's JSON, or {'error': ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env_extra}
    tail: deque[str] = deque(maxlen=8)
    result = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                continue
            tail.append(line)
            m = STEP_LINE.match(line)
            if (m and int(m.group(1)) % progress_every == 0) or line.startswith(("eval ", "wall time", "time budget")):
                print(f"  [{label}] {line}", flush=True)
    if proc.returncode != 0:
        return {"error": f"{label}: exit {proc.returncode}: " + " | ".join(list(tail)[-3:])}
    return result


def run_worker(spec: dict, label: str, args, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    return run_process(cmd, label, env_extra or {}, args.threads, args.progress_every)


def prepare_tokenizer(args, data_dir: Path, scratch: Path) -> Path:
    """picochat's BPE at --vocab over these shards, trained once per (vocab, shard set)."""
    train_files, val_file = list_shards(data_dir)
    stamp = {"vocab": args.vocab, "data_dir": str(data_dir.resolve()),
             "files": [[f.name, f.stat().st_size] for f in [*train_files, val_file]]}
    tok_dir = scratch / f"tokenizer-{args.vocab}"
    stamp_file = tok_dir / "bench-stamp.json"
    scratch.mkdir(parents=True, exist_ok=True)
    with FileLock(scratch / f"tokenizer-{args.vocab}.lock"):  # two benchmarks at once train it once
        if not (stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp):
            train_tokenizer(args, data_dir, scratch, tok_dir)
            stamp_file.write_text(json.dumps(stamp))
    return tok_dir


def train_tokenizer(args, data_dir: Path, scratch: Path, tok_dir: Path) -> None:
    print(f"training the tokenizer (vocab {args.vocab:,}) into {tok_dir}", flush=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "picochat", "tok-train", "--preset", "cpu", "--vocab-size", str(args.vocab),
           "--data-dir", str(data_dir), "--output-dir", str(tok_dir)]
    result = run_process(cmd, "tok-train", {"PICOCHAT_HOME": str(scratch)}, args.threads, args.progress_every)
    if "error" in result:
        raise DataError(f"training the bench tokenizer failed: {result['error']}")


def link_reference_data(data_dir: Path, runs_dir: Path) -> Path:
    """A $NANOCHAT_BASE_DIR whose shard directory links to our shards (the last sorted one is val there too)."""
    base = runs_dir / "ref-base"
    shard_dir = base / "base_data_climbmix"
    shard_dir.mkdir(parents=True)
    train_files, val_file = list_shards(data_dir)
    for f in [*train_files, val_file]:
        (shard_dir / f.name).symlink_to(f.resolve())
    return base


def pico_command(args, ctx: dict, seed: int, tag: str, wall: float | None) -> list[str]:
    horizon = ["--time-budget", f"{wall / 60:.6f}"] if wall else ["--num-iterations", str(args.steps)]
    saves = ["--save-every", "-1", "--keep-last", "1"] if wall else \
        ["--save-every", str(args.eval_every), "--keep-last", str(args.steps // args.eval_every + 2)]
    return [sys.executable, "-m", "picochat", "base-train", *shlex.split(args.pico_args),
            "--depth", str(args.depth), "--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim),
            "--max-seq-len", str(args.seq_len), "--device-batch-size", str(args.device_batch_size),
            "--total-batch-size", str(args.total_batch_size), *horizon, *saves,
            "--eval-every", "-1", "--eval-tokens", str(args.device_batch_size * args.seq_len), "--sample-every", "0",
            "--tag", tag, "--seed", str(seed), "--dtype", ctx["dtype"], "--device", "cpu",
            "--data-dir", str(ctx["data_dir"]), "--tokenizer-dir", str(ctx["tokenizer_dir"])]


def run_pico(args, ctx: dict, seed: int, mode: str, wall: float | None) -> dict:
    tag = f"recipe-pico-{mode}-s{seed}"
    run_home = ctx["runs_dir"] / "pico"  # this invocation's own: no other run writes its log or checkpoints
    log_path = run_home / "logs" / f"base-{tag}.jsonl"
    result = run_process(pico_command(args, ctx, seed, tag, wall), f"seed {seed} pico {mode}",
                         {"PICOCHAT_HOME": str(run_home)}, args.threads, args.progress_every)
    if "error" in result:
        return result
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = [{"step": r["step"], "loss": r["loss"], "dt": r["dt"]} for r in records if "loss" in r]
    run_dir = run_home / "checkpoints" / "base" / tag
    checkpoints = {int(p.name.split("_")[1]): str(p) for p in run_dir.glob("step_*") if (p / "meta.json").exists()}
    return {"steps": steps, "checkpoints": checkpoints}


def run_ref(args, ctx: dict, system: str, seed: int, mode: str, wall: float | None) -> dict:
    out_dir = ctx["runs_dir"] / "ref" / f"{system}-{mode}-s{seed}"
    out_dir.mkdir(parents=True)
    spec = {"kind": "ref-train", "reference_dir": str(args.reference_dir.resolve()), "seed": seed,
            "rescaled": system == "ref-rescaled", "compile": args.ref_compile == "on", "out_dir": str(out_dir),
            "wall_seconds": wall, "steps": args.steps, "save_every": args.eval_every, **ctx["geometry"]}
    env = {"NANOCHAT_BASE_DIR": str(ctx["ref_base"]), "NANOCHAT_DTYPE": ctx["nanochat_dtype"]}
    return run_worker(spec, f"seed {seed} {system} {mode}", args, env)


def run_seed(args, ctx: dict, seed: int, have: dict | None = None) -> dict:
    """Every (system, mode) run of one seed that `have` (runs of a --reuse file) lacks, then one evaluation
    of all their checkpoints."""
    have = have or {}
    runs: dict[str, dict] = {system: {} for system in ctx["systems"]}
    fresh: dict[str, dict] = {system: {} for system in ctx["systems"]}
    for mode in [m for m in MODES if m in args.modes]:
        for system in ctx["systems"]:
            if mode in have.get(system, {}):
                runs[system][mode] = have[system][mode]
                continue
            wall = None
            if mode == "wall":
                if system == "pico" and args.wall_seconds is None:
                    continue  # its tokens run is its wall run (below)
                wall = args.wall_seconds or runs["pico"].get("tokens", {}).get("train_s")
                if not wall:
                    runs[system][mode] = {"error": "no wall time: picochat's tokens run did not finish"}
                    continue
            print(f"seed {seed}: {system}, {mode} " + (f"({wall:.0f} s)" if wall else f"({args.steps} steps)"),
                  flush=True)
            raw = run_pico(args, ctx, seed, mode, wall) if system == "pico" else \
                run_ref(args, ctx, system, seed, mode, wall)
            runs[system][mode] = fresh[system][mode] = summarise_run(raw, args)
    evaluate_runs(args, ctx, seed, fresh)
    pico = runs.get("pico", {})
    if "wall" in args.modes and args.wall_seconds is None and "tokens" in pico and "wall" not in pico:
        pico["wall"] = {**pico["tokens"], "same_as": "tokens"}
    return runs


def summarise_run(raw: dict, args) -> dict:
    """Steps, tokens, timed seconds, tok/s and the train-loss curve of one run's step records."""
    if "error" in raw:
        print(f"  error: {raw['error']}", flush=True)
        return raw
    steps = raw["steps"]
    timed = [s["dt"] for s in steps if s["step"] > UNTIMED_STEPS]
    train_s = sum(timed)
    losses = [[s["step"], sum(r["loss"] for r in steps[i - args.loss_every + 1:i + 1]) / args.loss_every]
              for i, s in enumerate(steps) if s["step"] % args.loss_every == 0]
    out = {"steps": len(steps), "tokens": len(steps) * args.total_batch_size, "train_s": round(train_s, 2),
           "tok_per_s": round(len(timed) * args.total_batch_size / train_s, 1) if train_s else None,
           "train_loss": losses, "checkpoints": raw["checkpoints"],
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    return {**out, **{k: raw[k] for k in ("hyperparameters", "lrs") if k in raw}}


def evaluate_runs(args, ctx: dict, seed: int, runs: dict) -> None:
    """One evaluation worker scores every checkpoint of this seed; fills curves and final bpbs."""
    done = [(system, mode, run) for system, modes in runs.items() for mode, run in modes.items() if "error" not in run]
    items = [{"key": f"{system}/{mode}/{step}", "system": "pico" if system == "pico" else "ref", "path": path,
              "final": int(step) == run["steps"]}
             for system, mode, run in done
             for step, path in sorted(run.pop("checkpoints").items(), key=lambda kv: int(kv[0]))
             if mode == "tokens" or int(step) == run["steps"]]
    if not items:
        return
    spec = {"kind": "eval", "checkpoints": items, "val_file": str(ctx["val_file"]), "batch": args.device_batch_size,
            "curve_tokens": args.curve_tokens,
            "reference_dir": str(args.reference_dir.resolve()) if args.reference_dir else None, **ctx["geometry"]}
    result = run_worker(spec, f"seed {seed} eval", args, {"NANOCHAT_DTYPE": ctx["nanochat_dtype"]})
    for system, mode, run in done:
        if "error" in result:
            run["error"] = result["error"]
            continue
        scores = {int(k.rsplit("/", 1)[1]): v for k, v in result["results"].items() if k.startswith(f"{system}/{mode}/")}
        run["curve"] = [[step, step * args.total_batch_size, scores[step]["curve_bpb"]] for step in sorted(scores)]
        run.update(scores.get(run["steps"], {}))


# ---- summary ----------------------------------------------------------------------------------------

def mean_spread(values: list) -> dict | None:
    """Mean, max - min and the values themselves, over the seeds that have one."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "spread": max(values) - min(values), "values": values}


def finished(all_runs: dict, system: str, mode: str) -> list[dict]:
    rows = [runs.get(system, {}).get(mode) for runs in all_runs.values()]
    return [r for r in rows if r and "error" not in r and "val_bpb" in r]


def summarise(all_runs: dict, systems: list[str]) -> dict:
    """{system: {mode: {metric: mean_spread}}} over the seeds."""
    summary: dict = {}
    for system in systems:
        for mode in MODES:
            rows = finished(all_runs, system, mode)
            if rows:
                summary.setdefault(system, {})[mode] = {"seeds": len(rows), **{
                    k: mean_spread([r.get(k) for r in rows])
                    for k in ("val_bpb", "val_bpb_doc_starts", "curve_bpb", "tok_per_s", "train_s", "steps", "tokens")}}
    return summary


def seed_mean_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(tokens, mean bpb) at the eval points every seed has."""
    common = set.intersection(*({point[1] for point in r["curve"]} for r in rows))
    return [(tokens, sum(p[2] for r in rows for p in r["curve"] if p[1] == tokens) / len(rows))
            for tokens in sorted(common)]


def multipliers(all_runs: dict, summary: dict, systems: list[str]) -> dict:
    """Per other system and mode: picochat's tokens to its final whole-text bpb, as a ratio."""
    pico_rows = finished(all_runs, "pico", "tokens")
    out: dict = {}
    if not pico_rows:
        return out
    curve = seed_mean_curve(pico_rows)
    for system in [s for s in systems if s != "pico"]:
        for mode, row in summary.get(system, {}).items():
            target, tokens = row["curve_bpb"]["mean"], row["tokens"]["mean"]
            reach = tokens_to_reach(curve, target)
            entry = {"target_bpb": target, "other_tokens": tokens}
            if reach is None:
                entry.update(multiplier=None, note=f"not reached: picochat's last eval point is {curve[-1][1]:.4f} "
                                                   f"at {curve[-1][0]:,} tokens, above {target:.4f}")
            else:
                entry.update(multiplier=tokens / reach[0], pico_tokens=reach[0],
                             note="" if reach[1] else "reached by the first eval point: the multiplier is a lower bound")
            out.setdefault(system, {})[mode] = entry
    return out


def fmt(stat: dict | None, digits: int, width: int) -> str:
    if stat is None:
        return f"{'-':>{width}}"
    text = f"{stat['mean']:,.{digits}f}"
    if len(stat["values"]) > 1:
        text += f" ±{stat['spread'] / 2:,.{digits}f}"
    return f"{text:>{width}}"


def print_table(summary: dict, mults: dict) -> None:
    print(f"\n{'system':<13} {'mode':<6} {'seeds':>5} {'steps':>13} {'tokens':>11} {'train s':>13} {'tok/s':>13} "
          f"{'val bpb whole':>17} {'val bpb doc starts':>18}")
    for system, modes in summary.items():
        for mode, r in modes.items():
            print(f"{system:<13} {mode:<6} {r['seeds']:>5} {fmt(r['steps'], 0, 13)} {r['tokens']['mean']:>11,.0f} "
                  f"{fmt(r['train_s'], 0, 13)} {fmt(r['tok_per_s'], 0, 13)} {fmt(r['val_bpb'], 4, 17)} "
                  f"{fmt(r['val_bpb_doc_starts'], 4, 18)}")
    for system, modes in mults.items():
        for mode, m in modes.items():
            value = "-" if m["multiplier"] is None else f"{m['multiplier']:.2f}x"
            print(f"compute multiplier vs {system} ({mode}): {value} (its final {m['target_bpb']:.4f} after "
                  f"{m['other_tokens']:,.0f} tokens{'; ' + m['note'] if m['note'] else ''})")


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpu = PRESETS["cpu"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="a checkout of the reference system (directory holding nanochat/gpt.py)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--pico-args", default="--preset cpu",
                   help="base-train flags, e.g. --pico-args='--preset cpu --recipe 2026' (the bench's own flags win)")
    p.add_argument("--wall-seconds", type=float, default=None,
                   help="training seconds of the wall runs (default: picochat's tokens run of the same seed)")
    g = p.add_argument_group("geometry (default: the cpu preset's)")
    g.add_argument("--depth", type=int, default=cpu["depth"])
    g.add_argument("--aspect-ratio", type=int, default=cpu["aspect_ratio"])
    g.add_argument("--head-dim", type=int, default=cpu["head_dim"])
    g.add_argument("--seq-len", type=int, default=cpu["max_seq_len"])
    g.add_argument("--device-batch-size", type=int, default=cpu["device_batch_size"])
    g.add_argument("--total-batch-size", type=int, default=cpu["total_batch_size"], help="tokens per step")
    g.add_argument("--steps", type=int, default=500,
                   help="steps of the tokens runs (the cpu preset itself trains for a time budget)")
    g.add_argument("--vocab", type=int, default=cpu["vocab_size"], help="BPE vocabulary of the shared tokenizer")
    g = p.add_argument_group("runs and output")
    g.add_argument("--eval-every", type=int, default=None, help="val bpb curve point every N steps (default steps/5)")
    g.add_argument("--curve-tokens", type=int, default=131_072,
                   help="val targets the bpb curve and the multiplier are scored on (the first ones; 0: all)")
    g.add_argument("--loss-every", type=int, default=10, help="train-loss curve point every N steps (their mean)")
    g.add_argument("--window-pattern", default="L", help="the reference's attention window pattern (L: full)")
    g.add_argument("--ref-compile", choices=["on", "off"], default="on", help="torch.compile the reference's model")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="compute dtype of every run")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--data-dir", type=Path, default=None, help="shards (default: the built-in corpus)")
    g.add_argument("--scratch", type=Path, default=None,
                   help="tokenizer, checkpoints and logs (default $PICOCHAT_HOME/bench/recipe-scratch)")
    g.add_argument("--progress-every", type=int, default=50, help="echo every Nth step line of a run")
    g.add_argument("--reuse", type=Path, default=None,
                   help="a previous results file of the same configuration: the runs it holds are not run again")
    g.add_argument("--rerun", nargs="+", choices=SYSTEMS, default=[],
                   help="with --reuse: systems to run again all the same (when what their flags mean has changed, "
                        "e.g. a preset's contents)")
    g.add_argument("--out", type=Path, default=None, help="JSON file (default $PICOCHAT_HOME/bench/recipe-<time>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("depth", "aspect_ratio", "head_dim", "seq_len", "device_batch_size", "total_batch_size", "steps",
                 "loss_every", "threads", "progress_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.total_batch_size % (args.device_batch_size * args.seq_len):
        p.error(f"--total-batch-size {args.total_batch_size} is not a multiple of --device-batch-size x --seq-len "
                f"({args.device_batch_size * args.seq_len}); choose a multiple")
    args.eval_every = args.eval_every or max(1, args.steps // 5)
    if not 1 <= args.eval_every <= args.steps:
        p.error(f"--eval-every {args.eval_every} must be between 1 and --steps {args.steps}")
    if args.wall_seconds is not None and args.wall_seconds <= 0:
        p.error("--wall-seconds must be positive")
    if "wall" in args.modes and args.wall_seconds is None and not ("pico" in args.systems and "tokens" in args.modes):
        p.error("--modes wall needs --wall-seconds here: by default the wall runs train for the seconds picochat's "
                "tokens run trained, and this run has none (--systems pico and --modes tokens)")
    if args.curve_tokens < 0:
        p.error("--curve-tokens must be 0 (all) or more")
    if args.rerun and not args.reuse:
        p.error("--rerun names systems to run again over a --reuse file; give --reuse FILE or drop --rerun")
    if args.rerun and "wall" in args.modes and args.wall_seconds is None:
        p.error("--rerun with wall runs needs --wall-seconds: the reused runs' wall time was the earlier "
                "picochat run's")
    if args.reference_dir is not None and not (args.reference_dir / "nanochat" / "gpt.py").exists():
        p.error(f"--reference-dir {args.reference_dir}: no nanochat/gpt.py there; point it at a reference checkout")


# Configuration keys that only one side's runs depend on: they may differ when that side is rerun.
ONE_SIDE_KEYS = {"pico_args": ("pico",), "ref_compile": ("ref", "ref-rescaled")}


def reused_runs(path: Path, config: dict, rerun: tuple[str, ...] = ()) -> dict[int, dict]:
    """{seed: {system: {mode: run}}} of a previous results file whose configuration (seeds, systems and
    modes aside, and keys only rerun systems depend on, such as `--pico-args` with `--rerun pico`) is
    this one, less the systems in `rerun`. Each run keeps the file it came from."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--reuse {path}: not a readable results file ({e})") from e
    own = {k for k, systems in ONE_SIDE_KEYS.items() if set(systems) & set(config["systems"]) <= set(rerun)}
    differ = sorted(k for k in {*config, *saved.get("config", {})} - {"seeds", "systems", "modes"} - own
                    if config.get(k) != saved.get("config", {}).get(k))
    if differ:
        raise ConfigError(f"--reuse {path}: its configuration differs in {', '.join(differ)}; "
                          "run with the same flags or drop --reuse")
    return {int(seed): {system: {mode: {"reused_from": str(path), **run}  # a run's own origin wins
                                 for mode, run in modes.items() if "error" not in run}
                        for system, modes in runs.items() if system in config["systems"] and system not in rerun}
            for seed, runs in saved["runs"].items()}


def run_benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.device("cpu"))
    print(format_machine(machine), flush=True)
    notes, systems = [], list(args.systems)
    if args.reference_dir is None and any(s != "pico" for s in systems):
        notes.append("reference runs skipped: no --reference-dir given")
        systems = [s for s in systems if s == "pico"]
    data_dir = args.data_dir or default_data_dir()
    scratch = args.scratch or home() / "bench" / "recipe-scratch"
    _, val_file = list_shards(data_dir)
    dtype = pick_dtype(torch.device("cpu"), args.dtype)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"the compute dtype resolves to {dtype}; pass --dtype fp32 or bf16")
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    tokenizer_dir = prepare_tokenizer(args, data_dir, scratch)
    from picochat.tokenizer import Tokenizer

    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    geometry = {"depth": args.depth, "aspect_ratio": args.aspect_ratio, "head_dim": args.head_dim,
                "seq_len": args.seq_len, "vocab": vocab, "device_batch": args.device_batch_size,
                "batch_tokens": args.total_batch_size, "window_pattern": args.window_pattern,
                "tokenizer_dir": str(tokenizer_dir), "threads": args.threads, "dtype": dtype_name}
    # This invocation's checkpoints and logs, apart from any other benchmark using the same scratch.
    runs_dir = scratch / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    ctx = {"systems": systems, "runs_dir": runs_dir, "data_dir": data_dir, "val_file": val_file,
           "tokenizer_dir": tokenizer_dir, "dtype": dtype_name, "geometry": geometry,
           "nanochat_dtype": "bfloat16" if dtype_name == "bf16" else "float32",
           "ref_base": link_reference_data(data_dir, runs_dir) if systems != ["pico"] else None}
    config = {**{k: v for k, v in geometry.items() if k not in ("tokenizer_dir", "threads")},
              "steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "systems": systems,
              "modes": args.modes, "pico_args": args.pico_args, "wall_seconds": args.wall_seconds,
              "ref_compile": args.ref_compile, "threads": args.threads, "data_dir": str(data_dir),
              "tokenizer_hash": Tokenizer.load(tokenizer_dir).hash}
    print(f"config: {json.dumps(config)}", flush=True)
    reused = reused_runs(args.reuse, config, tuple(args.rerun)) if args.reuse else {}
    out = args.out or default_out("recipe")
    all_runs: dict[int, dict] = {}
    try:
        for seed in args.seeds:
            all_runs[seed] = run_seed(args, ctx, seed, reused.get(seed))
            # The seeds so far, in case the run is stopped (a seed takes an hour or more); --reuse reads them.
            write_results(out, {"machine": machine, "config": config, "notes": notes, "partial": True,
                                "runs": all_runs}, announce=False)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    summary = summarise(all_runs, systems)
    mults = multipliers(all_runs, summary, systems)
    print_table(summary, mults)
    report = {"machine": machine, "config": config, "summary": summary, "multiplier": mults, "notes": notes,
              "errors": [f"seed {seed} {system} {mode}: {run['error']}" for seed, runs in all_runs.items()
                         for system, modes in runs.items() for mode, run in modes.items() if "error" in run]}
    for line in notes + report["errors"]:
        print(f"note: {line}")
    print(json.dumps(report), flush=True)
    write_results(out, {**report, "runs": all_runs})
    return 1 if report["errors"] else 0


def main() -> int:
    args = parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    try:
        return run_benchmark(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
