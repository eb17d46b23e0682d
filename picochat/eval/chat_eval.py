"""`picochat chat-eval`: MMLU, ARC-Easy/Challenge, GSM8K, HumanEval and SpellingBee accuracy of a chat model.

    picochat chat-eval --stage sft                       # newest sft checkpoint, all six tasks
    picochat chat-eval --stage rl -a "GSM8K|HumanEval" --num-samples 8 --temperature 0.8
    picochat chat-eval --stage mid --max-problems 200    # an evenly spread subset of each task
    torchrun --nproc_per_node 8 -m picochat chat-eval --stage sft   # items split over the ranks

Two kinds of task:
- categorical (MMLU, ARC): one forward pass per batch of prompts; the next-token logits are
  restricted to each item's own option letters (picochat.eval.categorical), so the answer is
  always a valid letter. Chance accuracy is 1/options, averaged over the items.
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples `--num-samples` completions per
  problem with the calculator tool live; each completion, as render_conversation parts, is graded
  by the task's own `evaluate` (final '#### n' for GSM8K, the sandboxed unit tests for HumanEval,
  the last number for SpellingBee; GSM8K and SpellingBee read only the model's text parts, never a
  calculator call or output). An item passes if any sample is right (pass@k); pass@1 is
  the mean over samples. Chance accuracy is 0.

ChatCORE = mean over the six tasks of the centered accuracy (acc - chance) / (1 - chance); it is
reported only when all six ran. Data is the offline test splits (registry packages; SpellingBee
generated from held-out words) unless `--source hf`.

Writes $PICOCHAT_HOME/eval/chat_eval_<stage>_<tag>_step<N>.json and prints a table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
from picochat.config import Options, add_checkpoint_arguments, add_device_arguments, option
from picochat.errors import ConfigError, DataError
from picochat.eval.categorical import evaluate_categorical
from picochat.eval.core import all_reduce_sum, centered_accuracy
from picochat.eval.core_data import eval_dir
from picochat.fileio import write_json
from picochat.infer import Engine
from picochat.infer.streaming import TextStreamer
from picochat.runtime import init_distributed, log0, pick_dtype, shutdown_distributed
from picochat.tasks import load_task
from picochat.tasks.base import Task

# Display name -> (load_task name, split, extra load_task kwargs).
CHAT_TASKS: dict[str, tuple[str, str, dict]] = {
    "MMLU": ("mmlu", "test", {}),
    "ARC-Easy": ("arc_easy", "test", {}),
    "ARC-Challenge": ("arc_challenge", "test", {}),
    "GSM8K": ("gsm8k", "test", {}),
    "HumanEval": ("humaneval", "test", {}),
    "SpellingBee": ("spelling_bee", "test", {"size": 256}),
}


@dataclass
class TaskResult:
    """One task's score. For categorical tasks pass@1 == accuracy and num_samples is 1."""

    name: str
    kind: str  # "categorical" | "generative"
    accuracy: float  # pass@k for generative tasks
    pass_at_1: float
    baseline: float  # chance accuracy
    items: int
    num_samples: int
    seconds: float

    @property
    def centered(self) -> float:
        return centered_accuracy(self.accuracy, self.baseline)


def chat_core(results: dict[str, TaskResult]) -> float | None:
    """Mean centered accuracy over the six chat tasks, or None unless all six ran."""
    complete = set(results) == set(CHAT_TASKS)
    return sum(r.centered for r in results.values()) / len(results) if complete else None


def pass_at_k(graded: list[list[bool]]) -> tuple[float, float]:
    """(pass@k, pass@1) of k graded samples per item: any-correct rate, and mean per-sample accuracy."""
    if not graded or any(not row for row in graded):
        raise ValueError("pass_at_k needs at least one item with at least one sample each")
    passed = sum(any(row) for row in graded)
    return passed / len(graded), sum(sum(row) / len(row) for row in graded) / len(graded)


def parse_task_names(text: str | None) -> list[str]:
    """'MMLU|gsm8k,ARC-Easy' -> canonical names in CHAT_TASKS order; None or '' -> all six."""
    if not text:
        return list(CHAT_TASKS)
    by_key = {name.lower().replace("-", "").replace("_", ""): name for name in CHAT_TASKS}
    chosen = set()
    for raw in text.replace(",", "|").split("|"):
        key = raw.strip().lower().replace("-", "").replace("_", "")
        if not key:
            continue
        if key not in by_key:
            raise ConfigError(f"-a: unknown task {raw.strip()!r}; choose from {'|'.join(CHAT_TASKS)}")
        chosen.add(by_key[key])
    if not chosen:
        raise ConfigError(f"-a {text!r} names no task; choose from {'|'.join(CHAT_TASKS)}")
    return [name for name in CHAT_TASKS if name in chosen]


class SpreadSubset(Task):
    """`count` rows of `task` at evenly spaced positions: row i is task[i * len(task) // count]."""

    def __init__(self, task: Task, count: int):
        super().__init__()
        self.task, self.count, self.eval_type = task, count, task.eval_type

    def num_rows(self) -> int:
        return self.count

    def get_row(self, index: int) -> dict:
        return self.task[index * len(self.task) // self.count]

    def evaluate(self, conversation: dict, response):
        return self.task.evaluate(conversation, response)

    @property
    def name(self) -> str:
        return self.task.name


def spread_subset(task: Task, max_problems: int) -> Task:
    """`max_problems` rows spread evenly over the whole task (all rows when <= 0), so a subset spans
    every subject of a task stored in subject order."""
    return task if max_problems <= 0 or max_problems >= len(task) else SpreadSubset(task, max_problems)


def _progress(total: int, desc: str, rank: int):
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=rank != 0, leave=False)


# ---- categorical ---------------------------------------------------------------------------------
def evaluate_multiple_choice(model, tokenizer, task, batch_size: int = 8, rank: int = 0, world_size: int = 1,
                             compute_dtype: torch.dtype = torch.float32, desc: str = "") -> dict:
    """Letter-restricted accuracy and mean chance level over `task`, in chunks for a progress bar."""
    device = next(model.parameters()).device
    chunk = batch_size * world_size * 4  # rows per call across all ranks
    correct, total, chance = 0, 0, 0.0  # chance: the sum of 1/options over this rank's items
    with _progress(len(task), desc, rank) as bar:
        for start in range(0, len(task), chunk):
            part = task[start : start + chunk]
            result = evaluate_categorical(model, tokenizer, part, batch_size=batch_size, rank=rank,
                                          world_size=world_size, compute_dtype=compute_dtype)
            correct += result["correct"]
            total += result["total"]  # already summed over ranks
            chance += sum(1.0 / len(part[i]["letters"]) for i in range(rank, len(part), world_size))
            bar.update(len(part))
    (chance,) = all_reduce_sum([chance], device)
    if total == 0:
        raise DataError(f"{task.name}: no items to evaluate")
    return {"accuracy": correct / total, "correct": correct, "total": total, "baseline": chance / total}


# ---- generative ----------------------------------------------------------------------------------
def completion_parts(tokenizer, tokens: list[int]) -> list[dict]:
    """Generated ids -> assistant parts (text / python / python_output), the conversation format."""
    streamer = TextStreamer(tokenizer)
    for token in tokens:
        streamer.push(token)
    streamer.finish()
    return [part for part in streamer.parts if part["text"] or part["type"] != "text"]


def evaluate_generative(engine, tokenizer, task, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, seed: int = 42, rank: int = 0,
                        world_size: int = 1, desc: str = "") -> dict:
    """pass@k and pass@1 over `task`: rank r samples items r::world, seeded by item index (so the
    result does not depend on the number of ranks), and the counts are summed over ranks."""
    graded: list[list[bool]] = []
    indices = range(rank, len(task), world_size)
    with _progress(len(indices), desc, rank) as bar:
        for i in indices:
            conv = task[i]
            samples, _ = engine.generate_batch(tokenizer.render_for_completion(conv), num_samples=num_samples,
                                               max_tokens=max_new_tokens, temperature=temperature,
                                               top_k=top_k, seed=seed + i)
            graded.append([bool(task.evaluate(conv, completion_parts(tokenizer, t))) for t in samples])
            bar.update(1)
    counts = [sum(any(row) for row in graded), sum(sum(row) / len(row) for row in graded), len(graded)]
    passed, mean_correct, total = all_reduce_sum(counts, engine.device)
    if total == 0:
        raise DataError(f"{task.name}: no problems to evaluate")
    return {"pass@k": passed / total, "pass@1": mean_correct / total, "passed": int(passed), "total": int(total)}


# ---- the suite -----------------------------------------------------------------------------------
def run_chat_eval(model, tokenizer, names: list[str], *, source: str = "offline", max_problems: int = -1,
                  num_samples: int = 1, temperature: float = 0.0, top_k: int | None = 50,
                  max_new_tokens: int = 512, batch_size: int = 8, seed: int = 42, rank: int = 0,
                  world_size: int = 1, compute_dtype: torch.dtype = torch.float32, log=print) -> dict[str, TaskResult]:
    """Score `model` on the named chat tasks (keys of CHAT_TASKS)."""
    engine = Engine(model, tokenizer, compute_dtype=compute_dtype)
    results: dict[str, TaskResult] = {}
    for name in names:
        task_name, split, kwargs = CHAT_TASKS[name]
        task = spread_subset(load_task(task_name, split, source=source, **kwargs), max_problems)
        t0 = time.time()
        if task.eval_type == "categorical":
            r = evaluate_multiple_choice(model, tokenizer, task, batch_size, rank, world_size, compute_dtype, name)
            scores = ("categorical", r["accuracy"], r["accuracy"], r["baseline"], r["total"], 1)
        else:
            r = evaluate_generative(engine, tokenizer, task, num_samples, max_new_tokens, temperature, top_k,
                                    seed, rank, world_size, name)
            scores = ("generative", r["pass@k"], r["pass@1"], 0.0, r["total"], num_samples)
        results[name] = result = TaskResult(name, *scores, round(time.time() - t0, 2))
        log(f"{name:<14} acc {result.accuracy:.4f} | pass@1 {result.pass_at_1:.4f} | centered {result.centered:+.4f} "
            f"| {result.items} items | {result.seconds}s")
    return results


def format_table(results: dict[str, TaskResult], core: float | None) -> str:
    k = max((r.num_samples for r in results.values()), default=1)
    lines = [f"{'task':<14} {'kind':<12} {'items':>6} {f'pass@{k}':>8} {'pass@1':>8} {'chance':>7} {'centered':>9}"]
    for r in results.values():
        lines.append(f"{r.name:<14} {r.kind:<12} {r.items:>6} {r.accuracy:>8.4f} {r.pass_at_1:>8.4f} "
                     f"{r.baseline:>7.4f} {r.centered:>+9.4f}")
    lines.append(f"{'ChatCORE':<14} {'':<12} {'':>6} {'':>8} {'':>8} {'':>7} "
                 + (f"{core:>+9.4f}" if core is not None else f"{'(needs all six)':>9}"))
    return "\n".join(lines)


def results_payload(results: dict[str, TaskResult], core: float | None, run_info: dict) -> dict:
    """{"MMLU": acc, ..., "ChatCORE": x, "details": {task: {...}}, "run": {...}}."""
    payload = {name: r.accuracy for name, r in results.items()}
    payload |= {"ChatCORE": core} if core is not None else {}
    details = {name: {**asdict(r), "centered": r.centered} for name, r in results.items()}
    return {**payload, "details": details, "run": run_info}


# ---- command line --------------------------------------------------------------------------------
@dataclass
class ChatEvalConfig(Options):
    """What chat-eval runs and how it samples (the checkpoint and the device are flags of their own)."""

    tasks: str | None = option(None, f"tasks to run, '|'-separated (default: {'|'.join(CHAT_TASKS)})", short="-a")
    source: str = option("offline", "task data: registry packages (offline) or the Hugging Face hub",
                         choices=("offline", "hf"))
    max_problems: int | None = option(None, "items per task, evenly spread, >= 1 (default: every item)")
    num_samples: int = option(1, "samples per generative problem: pass@k", minimum=1)
    temperature: float | None = option(None, "sampling temperature (default: 0 = greedy for one sample, "
                                       "1.0 for several)")
    top_k: int = option(50, "sample among the k most likely tokens")
    max_new_tokens: int = option(512, "tokens per completion", minimum=1)
    batch_size: int = option(8, "prompts per forward pass for MMLU/ARC", minimum=1)
    seed: int = option(42, "base sampling seed; problem i uses seed + i")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_problems is not None and self.max_problems < 1:
            raise ConfigError(f"--max-problems must be >= 1, got {self.max_problems}; omit it to run every problem")
        if self.temperature is None:
            self.temperature = 0.0 if self.num_samples == 1 else 1.0

    def run_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in ("tasks", "batch_size")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p, "sft")
    ChatEvalConfig.add_arguments(p)
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = ChatEvalConfig.from_args(args)
    names = parse_task_names(cfg.tasks)
    world = init_distributed(args.device)
    try:
        path = find_checkpoint(args.stage, args.tag, args.step)
        model, tokenizer, meta = load_checkpoint_dir(path, world.device)
        dtype = pick_dtype(world.device, args.dtype)
        model.eval().cast_weights_(dtype)  # evaluation never trains: weights in the compute dtype once
        log0(f"chat-eval {path} | tasks {', '.join(names)} | {cfg.num_samples} samples, temperature "
             f"{cfg.temperature}, top-k {cfg.top_k} | world {world.world_size}")
        t0 = time.time()
        every = -1 if cfg.max_problems is None else cfg.max_problems  # -1: every item
        results = run_chat_eval(model, tokenizer, names, source=cfg.source, max_problems=every,
                                num_samples=cfg.num_samples, temperature=cfg.temperature, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                                rank=world.rank, world_size=world.world_size, compute_dtype=dtype, log=log0)
        core = chat_core(results)
        if world.is_main:
            print(format_table(results, core))
            tag, step = path.parent.name, int(meta["step"])
            run_info = {"checkpoint": str(path), "stage": args.stage, "tag": tag, "step": step,
                        **cfg.run_info(), "max_problems": every, "world_size": world.world_size,
                        "seconds": round(time.time() - t0, 2)}
            out = eval_dir() / f"chat_eval_{args.stage}_{tag}_step{step}.json"
            write_json(out, results_payload(results, core, run_info), indent=1)
            print(f"ChatCORE {core:.4f} -> {out}" if core is not None else f"results -> {out}")
        return 0
    finally:
        shutdown_distributed()
