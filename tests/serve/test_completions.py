"""POST /v1/completions on a base checkpoint (`picochat serve --stage base`): prompt shapes, echo and
log-probs against picochat's own scoring, stop, streaming; and lm-evaluation-harness's
`local-completions` model scoring a multiple-choice task exactly as picochat's categorical eval does."""

import json
import os
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
import torch

from picochat.eval.categorical import evaluate_categorical
from picochat.infer.loading import load_for_inference
from picochat.serve.commands import build_app
from picochat.tasks.base import Task
from picochat.tasks.multiple_choice import multiple_choice_conversation, response_letter
from tests.infer.tiny import save_tiny_checkpoint
from tests.serve.conftest import ServerThread, serve_args

CONTEXT = 256


@pytest.fixture(scope="module")
def base_server(checkpoint_home):
    save_tiny_checkpoint("base", "tiny", sequence_len=CONTEXT)
    app, model_id = build_app(serve_args("--stage", "base", "--device", "cpu", "--dtype", "fp32", "--max-batch", "4"))
    assert model_id.startswith("picochat-base-")
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(base_server):
    return openai.OpenAI(base_url=f"{base_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base_model(base_server):
    model, tokenizer, _, _ = load_for_inference("base", None, None, torch.device("cpu"))
    return model.float().eval(), tokenizer


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, vocab): predicts t+1


def test_every_prompt_shape_gives_n_choices_each(client, base_model):
    _, tokenizer = base_model
    ids = tokenizer.encode("The quick brown fox")
    shapes = ["The quick brown fox", ["The quick brown fox", "Hello there"], [tokenizer.bos_id, *ids],
              [[tokenizer.bos_id, *ids], tokenizer.encode("Hello", prepend="bos")]]
    for prompt in shapes:
        reply = client.completions.create(model="picochat", prompt=prompt, max_tokens=5, n=2, temperature=1.0, seed=3)
        prompts = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
        assert [c.index for c in reply.choices] == list(range(2 * prompts))
        assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    # A string gets <|bos|> in front, as every training document had: the same as those ids.
    as_text = client.completions.create(model="picochat", prompt="The quick brown fox", max_tokens=6, temperature=0)
    as_ids = client.completions.create(model="picochat", prompt=[tokenizer.bos_id, *ids], max_tokens=6, temperature=0)
    assert as_text.choices[0].text == as_ids.choices[0].text
    assert as_text.usage.prompt_tokens == len(ids) + 1
    again = client.completions.create(model="picochat", prompt="The quick", max_tokens=6, temperature=1.0, top_p=0.9,
                                      seed=5)
    assert again.choices[0].text == client.completions.create(
        model="picochat", prompt="The quick", max_tokens=6, temperature=1.0, top_p=0.9, seed=5).choices[0].text


def test_echo_and_logprobs_equal_picochats_own_scoring(client, base_model):
    model, tokenizer = base_model
    ids = tokenizer.encode("Numbers like 12 add up", prepend="bos")
    reply = client.completions.create(model="picochat", prompt=ids, max_tokens=4, echo=True, logprobs=3,
                                      temperature=0)
    choice = reply.choices[0]
    lp = choice.logprobs
    generated = len(lp.tokens) - len(ids)
    assert generated == reply.usage.completion_tokens == 4 and lp.token_logprobs[0] is None
    all_ids = list(ids)
    for _ in range(generated):  # temperature 0: the model's own greedy tokens
        all_ids.append(int(forward_logprobs(model, all_ids)[-1].argmax()))
    assert lp.tokens == [tokenizer.id_to_text(i) for i in all_ids]
    reference = forward_logprobs(model, all_ids)
    for t in range(1, len(all_ids)):
        assert lp.token_logprobs[t] == pytest.approx(reference[t - 1, all_ids[t]].item(), abs=1e-4)
        best = torch.topk(reference[t - 1], 3)
        expected = {}
        for i, v in zip(best.indices.tolist(), best.values.tolist()):
            expected.setdefault(tokenizer.id_to_text(i), v)  # ids that print alike share one key, as in OpenAI's shape
        assert lp.top_logprobs[t] == pytest.approx(expected, abs=1e-4)
    # temperature 0 picks the most likely token each step; text_offset indexes the echoed text
    assert all(lp.token_logprobs[t] == max(lp.top_logprobs[t].values()) for t in range(len(ids), len(all_ids)))
    assert choice.text.startswith(tokenizer.decode(ids))
    for token, offset in zip(lp.tokens, lp.text_offset):
        if token.isascii():
            assert choice.text[offset:offset + len(token)] == token


def test_a_completion_that_ends_lists_its_last_token_in_the_logprobs(client, base_model):
    """A harness reads the last log-prob entry as the generated token, also when that token ends the
    text (this tiny model's greedy next token here is an end token)."""
    _, tokenizer = base_model
    ids = tokenizer.encode("The quick brown fox", prepend="bos")
    reply = client.completions.create(model="picochat", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.text == tokenizer.decode(ids)
    assert len(choice.logprobs.tokens) == len(ids) + reply.usage.completion_tokens
    assert choice.logprobs.tokens[-1] in ("<|bos|>", "<|assistant_end|>")
    assert choice.logprobs.token_logprobs[-1] == max(choice.logprobs.top_logprobs[-1].values())


def test_max_tokens_zero_scores_the_prompt_only(client, base_server, base_model):
    model, tokenizer = base_model
    reply = client.completions.create(model="picochat", prompt="Hello there! How are you", max_tokens=0, echo=True,
                                      logprobs=0)
    ids = tokenizer.encode("Hello there! How are you")
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == "Hello there! How are you" and reply.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.top_logprobs[0] == {}
    reference = forward_logprobs(model, [tokenizer.bos_id, *ids])  # the added <|bos|> conditions, is not echoed
    assert lp.token_logprobs == pytest.approx([reference[t, ids[t]].item() for t in range(len(ids))], abs=1e-4)
    refused = httpx.post(f"{base_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_a_stop_string_completed_by_a_cut_character_at_max_tokens_is_a_stop(client):
    """A character cut by max_tokens is flushed as U+FFFD when the text ends; a stop string it
    completes ends the choice "stop" (streaming too), not "length"."""
    checked = 0
    for seed in range(1, 6):
        options = {"model": "picochat", "prompt": "Hello", "max_tokens": 4, "temperature": 1.0, "seed": seed}
        full = client.completions.create(**options).choices[0]
        if full.finish_reason != "length" or len(full.text) < 2:
            continue
        stop = full.text[-2:]
        cut = client.completions.create(**options, stop=stop).choices[0]
        assert cut.finish_reason == "stop", (seed, full.text)
        assert full.text.startswith(cut.text) and stop not in cut.text
        chunks = list(client.completions.create(**options, stop=[stop], stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        checked += 1
    assert checked >= 3


def test_stop_and_streaming(client):
    full = client.completions.create(model="picochat", prompt="Hello", max_tokens=16, temperature=1.0, seed=9)
    text = full.choices[0].text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    expected = text[:text.index(stop)]
    cut = client.completions.create(model="picochat", prompt="Hello", max_tokens=16, temperature=1.0, seed=9, stop=stop)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="picochat", prompt="Hello", max_tokens=16, temperature=1.0, seed=9,
                                            stop=[stop], stream=True, echo=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello" + expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_completion_errors_name_the_field(base_server, base_model):
    _, tokenizer = base_model
    url = f"{base_server.url}/v1/completions"
    cases = [({"prompt": []}, "prompt"), ({"prompt": ["ok", 5]}, "prompt.1"), ({"prompt": [10**6]}, "prompt"),
             ({"prompt": "x" * 300, "max_tokens": 1}, "prompt"), ({"prompt": "hi", "suffix": "!"}, "suffix"),
             ({"prompt": "hi", "logprobs": 21}, "logprobs"), ({"prompt": "hi", "messages": []}, "messages"),
             ({"prompt": "hi", "best_of": 3}, "best_of"), ({"prompt": "hi", "best_of": 1, "n": 2}, "best_of"),
             ({"prompt": "hi", "best_of": True}, "best_of")]
    for body, param in cases:
        response = httpx.post(url, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, body
    too_long = httpx.post(url, json={"prompt": [tokenizer.bos_id] * CONTEXT, "max_tokens": 1}).json()["error"]
    assert too_long["code"] == "context_length_exceeded"


def test_best_of_n_is_n_choices(client):
    """best_of == n generates n candidates and returns all n: what n alone does."""
    reply = client.completions.create(model="picochat", prompt="Hello", max_tokens=3, n=2, best_of=2, seed=5)
    assert [c.index for c in reply.choices] == [0, 1]


def test_an_empty_prompt_starts_a_new_document(client):
    """OpenAI's "" prompt: the model writes from the start of a document (after picochat's <|bos|>)."""
    reply = client.completions.create(model="picochat", prompt="", max_tokens=3, echo=True, logprobs=1, seed=5)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == 1 and reply.usage.completion_tokens == 3
    assert len(choice.logprobs.tokens) == 3 and choice.logprobs.text_offset[0] == 0  # nothing echoed
    scored = client.completions.create(model="picochat", prompt=["", "Hi"], max_tokens=0, echo=True, logprobs=0)
    assert [c.text for c in scored.choices] == ["", "Hi"]


def test_tokenizer_routes_use_the_servers_ids(base_server, base_model):
    _, tokenizer = base_model
    info = httpx.get(f"{base_server.url}/tokenizer_info").json()
    assert info["bos_token"] == "<|bos|>" and info["max_model_len"] == CONTEXT
    text = "<|bos|><|user_start|>Hi there<|user_end|>"
    ids = httpx.post(f"{base_server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert ids == [tokenizer.bos_id, tokenizer.encode_special("user_start"), *tokenizer.encode("Hi there"),
                   tokenizer.encode_special("user_end")]
    assert httpx.post(f"{base_server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == text
    with_bos = httpx.post(f"{base_server.url}/tokenize", json={"prompt": "Hi"}).json()["tokens"]
    assert with_bos[0] == tokenizer.bos_id


# ---- lm-evaluation-harness ----------------------------------------------------------------------

QUESTIONS = [
    ("What does the quick brown fox jump over?", ["the dog", "the moon", "a fence", "a cat"], 0),
    ("What is 12 + 345?", ["357", "12", "345", "400"], 0),
    ("How are you today?", ["sad", "fine", "lost"], 1),
    ("Which animal is lazy here?", ["fox", "dog"], 1),
    ("What is the fox's color?", ["blue", "green", "brown", "red"], 2),
    ("Hello there! Who says thank you?", ["I do", "nobody", "the fox"], 0),
    ("Numbers like 12 are?", ["words", "numbers", "dogs", "foxes"], 1),
    ("Is the fox quick?", ["yes", "no"], 0),
    ("What adds up to 357?", ["1 + 1", "12 + 345", "3 + 4"], 1),
    ("The dog is?", ["quick", "lazy", "brown", "tall"], 1),
    ("Where does the fox jump?", ["over", "under", "in"], 0),
    ("How many numbers add up here: 12 + 345?", ["two", "three", "one", "four"], 0),
]


class LocalItems(Task):
    """The same items, as picochat's own categorical evaluation sees them."""

    eval_type = "categorical"

    def __init__(self, conversations: list[dict]):
        super().__init__()
        self.conversations = conversations
        self.predicted: list[str] = []  # the letter picked for each item, in order

    def num_rows(self) -> int:
        return len(self.conversations)

    def get_row(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, response: str) -> bool:
        self.predicted.append(response)
        return response_letter(response, conversation["letters"]) == conversation["answer"]


TASK_YAML = """task: picochat_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: letters
doc_to_target: answer_index
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_local_completions_equals_picochats_categorical_eval(base_server, base_model, tmp_path):
    if shutil.which("lm_eval", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("lm-evaluation-harness is not installed (pip install 'lm_eval[api]'; it is in the dev extras)")
    model, tokenizer = base_model
    conversations = [multiple_choice_conversation(q, choices, answer) for q, choices, answer in QUESTIONS]
    with (tmp_path / "items.jsonl").open("w") as f:
        for conv in conversations:
            prompt = tokenizer.render_for_completion(conv)
            assert len(prompt) < CONTEXT - 1
            f.write(json.dumps({"context": tokenizer.decode(prompt), "letters": conv["letters"],
                                "answer_index": conv["letters"].index(conv["answer"])}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "picochat_local_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "items.jsonl"))
    model_args = (f"base_url={base_server.url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
                  f"max_length={CONTEXT - 1},num_concurrent=1,max_retries=1")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OPENAI_API_KEY": "unused"}
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "local-completions",
                          "--model_args", model_args, "--tasks", "picochat_local_mc",
                          "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"),
                          "--log_samples", "--batch_size", "1"], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_picochat_local_mc_*.jsonl")
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    assert [row["doc_id"] for row in rows] == list(range(len(QUESTIONS)))
    # The letter the harness picks: the choice with the highest log-likelihood.
    harness_letters = [row["doc"]["letters"][max(range(len(row["filtered_resps"])),
                                                 key=lambda k: float(row["filtered_resps"][k][0]))] for row in rows]
    # picochat's own categorical eval: the same model, the same prompts, the same items.
    items = LocalItems(conversations)
    ours = evaluate_categorical(model, tokenizer, items)
    assert harness_letters == items.predicted  # the same pick, item by item
    assert [bool(row["acc"]) for row in rows] == [p == c["answer"] for p, c in zip(items.predicted, conversations)]
    assert sum(row["acc"] for row in rows) == ours["correct"]
