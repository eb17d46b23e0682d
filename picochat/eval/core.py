"""CORE: score a base model on the DCLM few-shot suite (multiple choice, schema, language modelling).

Every item becomes one or more token rows `<|bos|> few-shot examples + context | continuation`:

- multiple_choice: one shared context, one row per choice; the choice with the lowest *mean*
  cross-entropy over its continuation tokens is the model's answer.
- schema: one row per context option, all sharing the same continuation; same rule.
- language_modeling: one row; correct only if the greedy argmax reproduces every continuation token.

Few-shot examples are drawn from the task's *other* items with `random.Random(1234 + item index)`,
so an item's prompt never depends on `--max-per-task` or on the rank that scores it; a task with
fewer items than shots uses what exists. Rows longer than the model's context are cut from the left.
Items are shuffled once (`Random(1337)`), cut to `max_per_task`, then striped over ranks
(rank r takes r::world) and the counts are all-reduced.

centered = (accuracy - baseline) / (1 - baseline) with the task's random baseline;
CORE = mean centered accuracy over the tasks that ran.

The model is any callable `logits = model(ids)` with ids (B, T) -> logits (B, T, vocab).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat.errors import ConfigError, DataError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
EXAMPLE_SEPARATOR = "\n\n"


class TextEncoder(Protocol):
    bos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class CoreTask:
    """One CORE task: its items in the DCLM jsonl schema and how to prompt them."""

    label: str
    task_type: str  # one of TASK_TYPES
    items: list[dict]
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0  # chance accuracy as a fraction in [0, 1)


@dataclass
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    items: int
    accuracy: float
    random_baseline: float
    centered: float
    seconds: float


@dataclass
class CoreResult:
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def core(self) -> float:
        """Mean centered accuracy over the tasks that ran."""
        if not self.tasks:
            raise DataError("no CORE task ran, so there is no CORE score; check --tasks and the bundle")
        return sum(t.centered for t in self.tasks) / len(self.tasks)


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 at perfect."""
    if not 0.0 <= baseline < 1.0:
        raise ConfigError(f"random baseline {baseline} must be a fraction in [0, 1)")
    return (accuracy - baseline) / (1.0 - baseline)


# ---- prompts ----------------------------------------------------------------------------------
def fewshot_indices(num_items: int, index: int, num_fewshot: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """Indices of the few-shot examples for item `index`: distinct, never itself, at most what exists."""
    pool = [i for i in range(num_items) if i != index]
    return random.Random(seed + index).sample(pool, min(num_fewshot, len(pool)))


def join_continuation(context: str, continuation: str, delimiter: str) -> tuple[str, str]:
    """Split `context + delimiter + continuation` into (context text, continuation text).

    The delimiter's trailing spaces go with the continuation (" Paris" is one token in a
    GPT-style BPE), the rest with the context ("\\nAnswer:" stays context, never scored).
    """
    if not delimiter:
        return context, continuation
    head = delimiter.rstrip(" ")
    tail = delimiter[len(head):]
    return context.rstrip() + head, tail + continuation.lstrip()


def item_pairs(task: CoreTask, item: dict) -> list[tuple[str, str]]:
    """(context, continuation) texts of one item: one pair per choice / context option / the one answer."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        return [join_continuation(item["query"], choice, d) for choice in item["choices"]]
    if task.task_type == "schema":
        return [join_continuation(option, item["continuation"], d) for option in item["context_options"]]
    return [join_continuation(item["context"], item["continuation"], d)]


def gold_index(task: CoreTask, item: dict) -> int:
    return 0 if task.task_type == "language_modeling" else int(item["gold"])


def solved_text(task: CoreTask, item: dict) -> str:
    """An item with its correct answer filled in: a few-shot example."""
    context, continuation = item_pairs(task, item)[gold_index(task, item)]
    return context + continuation


def render_item(task: CoreTask, index: int) -> list[tuple[str, str]]:
    """Full prompts of item `index`: few-shot examples, a blank line, then each (context, continuation)."""
    shots = fewshot_indices(len(task.items), index, task.num_fewshot)
    prefix = "".join(solved_text(task, task.items[i]) + EXAMPLE_SEPARATOR for i in shots)
    return [(prefix + context, continuation) for context, continuation in item_pairs(task, task.items[index])]


# ---- tokens -----------------------------------------------------------------------------------
@dataclass
class Row:
    ids: list[int]
    start: int  # index of the first scored continuation token (>= 1)
    end: int  # one past the last continuation token (== len(ids))


def encode_row(tokenizer: TextEncoder, context: str, continuation: str, max_len: int | None) -> Row:
    """BOS + context + continuation as ids; cut from the left to `max_len`, keeping >= 1 context token."""
    context_ids = [tokenizer.bos_id] + list(tokenizer.encode(context))
    continuation_ids = list(tokenizer.encode(continuation))
    if not continuation_ids:
        raise DataError(f"continuation {continuation!r} encodes to no tokens; every CORE answer needs text")
    ids = context_ids + continuation_ids
    start = len(context_ids)
    if max_len is not None and len(ids) > max_len:
        if max_len < 2:
            raise ConfigError(f"sequence length {max_len} is too short to score anything; it must be >= 2")
        cut = len(ids) - max_len
        # A continuation longer than the context window loses its first tokens to the context.
        ids, start = ids[cut:], max(1, start - cut)
    return Row(ids=ids, start=start, end=len(ids))


@torch.no_grad()
def score_rows(model: Callable[[torch.Tensor], torch.Tensor], rows: Sequence[Row], pad_id: int,
               device: torch.device) -> tuple[list[float], list[bool]]:
    """One forward over all rows of an item: (mean continuation loss, greedy-exact-match) per row."""
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [pad_id] * (width - len(r.ids)) for r in rows], dtype=torch.long,
                       device=device)
    logits = model(ids)  # (B, T, V)
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise DataError(f"the model returned logits of shape {tuple(logits.shape)} for ids {tuple(ids.shape)}")
    logits = logits[:, :-1].float()  # position t predicts token t + 1
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    losses = losses.view(targets.shape)  # (B, T-1)
    hits = logits.argmax(dim=-1) == targets  # (B, T-1)
    spans = [(i, slice(r.start - 1, r.end - 1)) for i, r in enumerate(rows)]
    return [losses[i, s].mean().item() for i, s in spans], [bool(hits[i, s].all().item()) for i, s in spans]


def evaluate_item(model: Callable, tokenizer: TextEncoder, task: CoreTask, index: int,
                  max_len: int | None, device: torch.device) -> bool:
    """Whether the model gets item `index` of `task` right."""
    try:
        rows = [encode_row(tokenizer, c, k, max_len) for c, k in render_item(task, index)]
    except (DataError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"task {task.label}, item {index}: cannot build its prompt ({e})") from e
    mean_losses, exact = score_rows(model, rows, tokenizer.bos_id, device)
    if task.task_type == "language_modeling":
        return exact[0]
    # Lowest mean loss wins; ties go to the first option (so a constant model is not lucky).
    return min(range(len(rows)), key=lambda i: mean_losses[i]) == gold_index(task, task.items[index])


def selected_indices(num_items: int, max_per_task: int | None) -> list[int]:
    """Item indices to evaluate: a fixed shuffle, cut to `max_per_task` (None or < 0: all)."""
    order = list(range(num_items))
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order if max_per_task is None or max_per_task < 0 else order[:max_per_task]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (as they are without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate_task(model: Callable, tokenizer: TextEncoder, task: CoreTask, *, max_len: int | None = None,
                  max_per_task: int | None = None, device: torch.device | str = "cpu") -> TaskResult:
    """Accuracy of one task, its items striped over the ranks and the counts summed."""
    if task.task_type not in TASK_TYPES:
        raise DataError(f"task {task.label}: unknown type {task.task_type!r}; expected one of {TASK_TYPES}")
    device = torch.device(device)
    t0 = time.time()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = selected_indices(len(task.items), max_per_task)[rank::world]
    correct = sum(evaluate_item(model, tokenizer, task, i, max_len, device) for i in mine)
    n_correct, n = (int(v) for v in all_reduce_sum([correct, len(mine)], device))
    if n == 0:
        raise DataError(f"task {task.label} has no items to evaluate; check its data file or --max-per-task")
    accuracy = n_correct / n
    return TaskResult(label=task.label, task_type=task.task_type, num_fewshot=task.num_fewshot, items=n,
                      accuracy=accuracy, random_baseline=task.random_baseline,
                      centered=centered_accuracy(accuracy, task.random_baseline), seconds=time.time() - t0)


def evaluate_core(model: Callable, tokenizer: TextEncoder, tasks: Sequence[CoreTask], *,
                  max_len: int | None = None, max_per_task: int | None = None,
                  device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> CoreResult:
    """Run every task in order, logging one line per task, and collect the CORE result."""
    result = CoreResult()
    for i, task in enumerate(tasks):
        r = evaluate_task(model, tokenizer, task, max_len=max_len, max_per_task=max_per_task, device=device)
        result.tasks.append(r)
        log(f"[{i + 1:2d}/{len(tasks)}] {r.label:<34s} acc {r.accuracy:.4f}  centered {r.centered:+.4f}  "
            f"({r.items} items, {r.num_fewshot}-shot, {r.seconds:.1f}s)")
    return result


def format_table(result: CoreResult) -> str:
    """A fixed-width table of the per-task results with the CORE score as the last line."""
    lines = [f"{'task':<34s} {'type':<17s} {'shots':>5s} {'items':>6s} {'acc':>7s} {'base':>6s} {'centered':>9s}"]
    for t in result.tasks:
        lines.append(f"{t.label:<34s} {t.task_type:<17s} {t.num_fewshot:>5d} {t.items:>6d} {t.accuracy:>7.4f} "
                     f"{t.random_baseline:>6.2f} {t.centered:>+9.4f}")
    lines.append(f"{'CORE':<34s} {'':<17s} {'':>5s} {'':>6s} {'':>7s} {'':>6s} {result.core:>+9.4f}")
    return "\n".join(lines)
