"""The server's repetition penalty: the chat default unless a request's `repetition_penalty` says otherwise
(1 turns it off), refused outside (0, 10], and not applied by default to raw completions."""

import httpx
import pytest
import torch

from picochat.errors import ConfigError
from picochat.infer import Engine
from picochat.infer.chat_defaults import CHAT_SAMPLING
from picochat.serve.app import create_app
from picochat.serve.commands import check_arguments
from picochat.serve.pool import WorkerPool
from picochat.serve.requests import Defaults
from tests.infer.tiny import tiny_model, tiny_tokenizer
from tests.serve.conftest import ServerThread, serve_args


@pytest.fixture(scope="module")
def recorded():
    """A server whose engine records the penalty of every generation it is asked for."""
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(tokenizer.vocab_size), tokenizer, compute_dtype=torch.float32)
    calls, real = [], engine.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("repetition_penalty"))
        yield from real(*args, **kwargs)

    engine.generate = generate
    app = create_app(WorkerPool([engine]), "tiny", defaults=Defaults(0.7, 50, 16, CHAT_SAMPLING.repetition_penalty))
    with ServerThread(app) as server:
        yield server.url, calls


def chat(url: str, **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_a_chat_request_gets_the_default_penalty_unless_it_gives_one(recorded):
    url, calls = recorded
    for fields, expected in (({}, CHAT_SAMPLING.repetition_penalty), ({"repetition_penalty": 1}, 1),
                             ({"repetition_penalty": 1.5}, 1.5), ({"repetition_penalty": None}, 1.2)):
        calls.clear()
        assert chat(url, **fields).status_code == 200
        assert calls == [expected], fields
    calls.clear()
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    assert response.status_code == 200 and calls == [None]  # raw completions: no penalty unless asked


@pytest.mark.parametrize("value", [0, -1, 11, "1.2", True])
def test_a_bad_penalty_is_refused_naming_the_field(recorded, value):
    response = chat(recorded[0], repetition_penalty=value)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "repetition_penalty"


def test_the_serve_flag_defaults_to_the_chat_setting_and_is_checked():
    assert serve_args().repetition_penalty == CHAT_SAMPLING.repetition_penalty == 1.2
    with pytest.raises(ConfigError, match="--repetition-penalty 0.0: must be in"):
        check_arguments(serve_args("--repetition-penalty", "0"))
