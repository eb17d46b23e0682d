"""The CORE scorer: prompts, few-shot draws, continuation spans, the three task types, centering."""

from __future__ import annotations

import math

import pytest
import torch

from picochat.errors import ConfigError, DataError
from picochat.eval.core import (
    CoreResult,
    CoreTask,
    Row,
    TaskResult,
    centered_accuracy,
    encode_row,
    evaluate_core,
    evaluate_task,
    fewshot_indices,
    format_table,
    join_continuation,
    render_item,
    score_rows,
    selected_indices,
)
from tests.eval.fixtures.core_fakes import VOCAB, AnswerKeyModel, ByteTokenizer

TOK = ByteTokenizer()

MC_ITEMS = [
    {"query": "Question: What is the colour of the sky?\nAnswer:", "choices": ["blue", "green", "red"], "gold": 0},
    {"query": "Question: Which animal barks?\nAnswer:", "choices": ["cat", "dog"], "gold": 1},
    {"query": "Question: What do bees make?\nAnswer:", "choices": ["milk", "silk", "honey", "wax"], "gold": 2},
    {"query": "Question: What is frozen water?\nAnswer:", "choices": ["ice", "steam"], "gold": 0},
]
SCHEMA_ITEMS = [
    {"context_options": ["The trophy did not fit in the case because the trophy",
                         "The trophy did not fit in the case because the case"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna thanked Maria because Anna", "Anna thanked Maria because Maria"],
     "continuation": "had helped her.", "gold": 1},
    {"context_options": ["The fish ate the worm because the fish", "The fish ate the worm because the worm"],
     "continuation": "was hungry.", "gold": 0},
]
LM_ITEMS = [
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "Two plus two equals", "continuation": "four"},
    {"context": "The opposite of hot is", "continuation": "cold"},
    {"context": "A baby cat is called a", "continuation": "kitten"},
    {"context": "Snow is", "continuation": "white"},
]


def mc_task(shots: int = 0, baseline: float = 0.25) -> CoreTask:
    return CoreTask("mc", "multiple_choice", MC_ITEMS, num_fewshot=shots, random_baseline=baseline)


# ---- arithmetic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("acc, base, want", [
    (0.5, 0.25, 1 / 3), (0.25, 0.25, 0.0), (1.0, 0.62, 1.0), (0.0, 0.5, -1.0), (0.31, 0.0, 0.31),
])
def test_centered_accuracy(acc: float, base: float, want: float):
    assert math.isclose(centered_accuracy(acc, base), want, abs_tol=1e-12)


def test_centered_accuracy_rejects_a_baseline_of_one():
    with pytest.raises(ConfigError):
        centered_accuracy(0.5, 1.0)


def test_core_is_the_mean_centered_accuracy_of_the_tasks_that_ran():
    def r(label, acc, base):
        return TaskResult(label, "multiple_choice", 0, 10, acc, base, centered_accuracy(acc, base), 0.0)

    result = CoreResult([r("a", 0.5, 0.25), r("b", 0.81, 0.62), r("c", 0.2, 0.0)])
    want = ((0.5 - 0.25) / 0.75 + (0.81 - 0.62) / 0.38 + 0.2) / 3
    assert math.isclose(result.core, want)
    assert "CORE" in format_table(result).splitlines()[-1]
    with pytest.raises(DataError):
        _ = CoreResult().core


# ---- prompts ------------------------------------------------------------------------------------
def test_fewshot_draws_are_deterministic_distinct_and_never_the_item_itself():
    for idx in range(20):
        shots = fewshot_indices(20, idx, 10)
        assert len(shots) == 10 and len(set(shots)) == 10 and idx not in shots
        assert shots == fewshot_indices(20, idx, 10)
    assert fewshot_indices(20, 3, 10) != fewshot_indices(20, 4, 10)


@pytest.mark.parametrize("n_items, want", [(1, 0), (2, 1), (3, 2), (11, 10)])
def test_fewshot_uses_what_exists_when_a_task_is_smaller_than_the_shots(n_items: int, want: int):
    assert len(fewshot_indices(n_items, 0, 10)) == want
    task = CoreTask("tiny", "multiple_choice", MC_ITEMS[:1] * n_items, num_fewshot=10)
    prompts = render_item(task, 0)
    assert prompts[0][0].count("Question:") == want + 1  # the examples plus the item itself


def test_tiny_task_with_more_shots_than_items_scores_without_crashing():
    task = CoreTask("tiny", "multiple_choice", MC_ITEMS[:2], num_fewshot=10, random_baseline=0.5)
    r = evaluate_task(AnswerKeyModel([" blue", " dog"]), TOK, task)
    assert r.items == 2 and r.accuracy == 1.0


def test_prompt_layout_for_each_task_type():
    mc = render_item(CoreTask("mc", "multiple_choice", MC_ITEMS, num_fewshot=1), 0)
    shot = MC_ITEMS[fewshot_indices(4, 0, 1)[0]]
    assert [c for _, c in mc] == [" blue", " green", " red"]
    assert all(ctx == f"{shot['query']} {shot['choices'][shot['gold']]}\n\n{MC_ITEMS[0]['query']}" for ctx, _ in mc)

    schema = render_item(CoreTask("s", "schema", SCHEMA_ITEMS), 1)
    assert schema == [("Anna thanked Maria because Anna", " had helped her."),
                      ("Anna thanked Maria because Maria", " had helped her.")]

    lm = render_item(CoreTask("lm", "language_modeling", LM_ITEMS), 4)
    assert lm == [("Snow is", " white")]


@pytest.mark.parametrize("delimiter, want", [
    (" ", ("Q: x\nA:", " yes")),
    ("\nAnswer: ", ("Q: x\nA:\nAnswer:", " yes")),
    ("\n", ("Q: x\nA:\n", "yes")),
    ("", ("Q: x\nA: ", " yes")),
])
def test_delimiter_spaces_belong_to_the_continuation(delimiter: str, want: tuple[str, str]):
    assert join_continuation("Q: x\nA: ", " yes", delimiter) == want


# ---- tokens and spans -------------------------------------------------------------------------
def test_encode_row_marks_the_continuation_span():
    row = encode_row(TOK, "ab", " cd", max_len=None)
    assert row.ids == [256, 97, 98, 32, 99, 100] and (row.start, row.end) == (3, 6)


def test_encode_row_truncates_from_the_left_and_keeps_the_continuation():
    row = encode_row(TOK, "x" * 100, " answer", max_len=32)
    assert len(row.ids) == 32 and row.end == 32
    assert bytes(row.ids[row.start:]).decode() == " answer"
    # A continuation longer than the window: keep one context token, score the rest.
    row = encode_row(TOK, "ctx", " " + "y" * 40, max_len=16)
    assert len(row.ids) == 16 and row.start == 1


def test_empty_continuation_is_a_data_error():
    with pytest.raises(DataError):
        encode_row(TOK, "ctx", "", max_len=None)


class FixedModel:
    """Predicts `row[t + 1]` with logit 10 everywhere except at the positions in `wrong`."""

    def __init__(self, wrong: set[int]):
        self.wrong = wrong

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.zeros(B, T, VOCAB)
        for t in range(T - 1):
            if t not in self.wrong:
                logits[torch.arange(B), t, ids[:, t + 1]] = 10.0
        return logits


def test_score_rows_uses_exactly_the_continuation_positions():
    row = Row(ids=[256, 10, 11, 12, 13, 14], start=3, end=6)  # continuation = tokens 3..5
    right = -torch.log_softmax(torch.tensor([10.0] + [0.0] * (VOCAB - 1)), 0)[0].item()
    uniform = math.log(VOCAB)
    # Wrong only on a context position (predicting token 2): the span is untouched.
    losses, exact = score_rows(FixedModel({1}), [row], 256, torch.device("cpu"))
    assert math.isclose(losses[0], right, rel_tol=1e-5) and exact == [True]
    # Wrong on the position predicting the first continuation token.
    losses, exact = score_rows(FixedModel({2}), [row], 256, torch.device("cpu"))
    assert math.isclose(losses[0], (uniform + 2 * right) / 3, rel_tol=1e-5) and exact == [False]
    # Wrong on the position predicting the last one.
    losses, exact = score_rows(FixedModel({4}), [row], 256, torch.device("cpu"))
    assert exact == [False]


def test_rows_of_different_lengths_share_one_padded_forward():
    model = AnswerKeyModel([" honey"])
    task = mc_task()
    evaluate_task(model, TOK, task, max_per_task=None)
    assert model.calls == len(MC_ITEMS)
    assert sorted(model.batch_sizes) == sorted(len(it["choices"]) for it in MC_ITEMS)


# ---- the three task types with known answers ----------------------------------------------------
def test_multiple_choice_accuracy_with_a_scripted_model():
    # Right on items 0, 1, 2; on item 3 the model prefers the wrong choice "steam".
    model = AnswerKeyModel([" blue", " dog", " honey", " steam"])
    r = evaluate_task(model, TOK, mc_task(baseline=0.25))
    assert r.items == 4 and r.accuracy == 0.75
    assert math.isclose(r.centered, (0.75 - 0.25) / 0.75)


def test_multiple_choice_with_few_shot_examples_still_scores_the_item():
    # Few-shot examples contain other items' gold answers, but only the item's own rows are compared.
    model = AnswerKeyModel([" blue", " dog", " honey", " ice"])
    assert evaluate_task(model, TOK, mc_task(shots=3)).accuracy == 1.0
    assert evaluate_task(AnswerKeyModel([]), TOK, mc_task(shots=3)).accuracy == 0.5  # ties go to choice 0


def test_schema_accuracy_with_a_scripted_model():
    # The model likes the gold context of items 0 and 1, and the wrong one of item 2.
    model = AnswerKeyModel(["because the trophy was too big.", "because Maria had helped her.",
                            "because the worm was hungry."])
    r = evaluate_task(model, TOK, CoreTask("schema", "schema", SCHEMA_ITEMS, random_baseline=0.5))
    assert math.isclose(r.accuracy, 2 / 3) and math.isclose(r.centered, (2 / 3 - 0.5) / 0.5)


def test_language_modeling_needs_every_continuation_token_greedy():
    model = AnswerKeyModel([" Paris", " four", " kitten", "hite"])  # "hite": misses the " w" of " white"
    task = CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=2)
    r = evaluate_task(model, TOK, task)
    assert math.isclose(r.accuracy, 3 / 5) and r.centered == r.accuracy


def test_max_per_task_takes_a_fixed_shuffled_subset_and_prompts_do_not_depend_on_it():
    assert selected_indices(10, 3) == selected_indices(10, None)[:3]
    assert sorted(selected_indices(10, -1)) == list(range(10))
    task = CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=2)
    model = AnswerKeyModel([" Paris", " four", " cold", " kitten", " white"])
    assert evaluate_task(model, TOK, task, max_per_task=2).items == 2
    assert evaluate_task(model, TOK, task, max_per_task=2).accuracy == 1.0


def test_evaluate_core_runs_every_task_and_truncates_to_the_context():
    tasks = [mc_task(shots=3), CoreTask("schema", "schema", SCHEMA_ITEMS, random_baseline=0.5),
             CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=4)]
    lines: list[str] = []
    model = AnswerKeyModel([" blue", " dog", " honey", " ice", " Paris"])
    result = evaluate_core(model, TOK, tasks, max_len=48, log=lines.append)
    assert [t.label for t in result.tasks] == ["mc", "schema", "lm"] and len(lines) == 3
    assert all(-1.0 <= t.centered <= 1.0 for t in result.tasks)


def test_unknown_task_type_is_a_data_error():
    with pytest.raises(DataError):
        evaluate_task(AnswerKeyModel([]), TOK, CoreTask("x", "cloze", LM_ITEMS))


def test_a_tiny_random_gpt_scores_every_task_type():
    gpt = pytest.importorskip("picochat.model.gpt")
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=64)
    model = gpt.build_model(config, "cpu").eval()
    tasks = [mc_task(shots=2), CoreTask("schema", "schema", SCHEMA_ITEMS, random_baseline=0.5),
             CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=10)]
    result = evaluate_core(model, TOK, tasks, max_len=config.sequence_len, log=lambda s: None)
    assert len(result.tasks) == 3 and all(0.0 <= t.accuracy <= 1.0 for t in result.tasks)
    assert math.isfinite(result.core)


def _striped_rank(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from picochat.runtime import shutdown_distributed

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = AnswerKeyModel([" Paris", " four", " cold"])
        task = CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=2)
        r = evaluate_task(model, TOK, task)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"items": r.items, "accuracy": r.accuracy, "calls": model.calls}, f)
    finally:
        shutdown_distributed()


def test_items_are_striped_over_ranks_and_counts_all_reduced(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_striped_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_task(AnswerKeyModel([" Paris", " four", " cold"]), TOK,
                           CoreTask("lm", "language_modeling", LM_ITEMS, num_fewshot=2))
    assert all(r["items"] == 5 and r["accuracy"] == single.accuracy == 0.6 for r in ranks)
    assert sorted(r["calls"] for r in ranks) == [2, 3]  # each rank scored only its stripe


def test_a_malformed_item_names_the_task_and_item():
    task = CoreTask("broken", "multiple_choice", [{"query": "q", "gold": 0}])  # no choices
    with pytest.raises(DataError, match="task broken, item 0"):
        evaluate_task(AnswerKeyModel([]), TOK, task)
