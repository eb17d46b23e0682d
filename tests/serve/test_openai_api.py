"""What real OpenAI clients use beyond plain chat: stop, logprobs, tools, roles, routes, unknown
fields, API keys and long chats; through the official `openai` client, and raw HTTP where the
client cannot express a case. The server computes in fp32, so it batches on this CPU."""

import threading

import httpx
import openai
import pytest
import torch

from picochat.infer import Engine
from picochat.infer.batching import BatchingEngine
from picochat.infer.loading import load_for_inference
from picochat.serve.app import create_app
from picochat.serve.commands import build_app
from picochat.serve.pool import WorkerPool
from tests.infer.test_engine import scripted_tool_model
from tests.infer.tiny import tiny_tokenizer
from tests.serve.conftest import ServerThread, serve_args

USER = [{"role": "user", "content": "Tell me about the fox"}]


@pytest.fixture(scope="module")
def fp32_server(checkpoint_home):
    app, _ = build_app(serve_args("--max-tokens", "24", "--device", "cpu", "--dtype", "fp32", "--max-batch", "8"))
    assert isinstance(app.state.pool.engines[0], BatchingEngine)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(fp32_server):
    return openai.OpenAI(base_url=f"{fp32_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint_home):
    """The served checkpoint, loaded on its own, for the model's own log-softmax."""
    model, tokenizer, _, _ = load_for_inference("sft", None, None, torch.device("cpu"))
    return model.float().eval(), tokenizer


def seeded(client, n=1, top_k=None, **kwargs):
    options = {"model": "picochat", "messages": USER, "max_tokens": 20, "temperature": 1.0, "seed": 11, "n": n, **kwargs}
    return client.chat.completions.create(**options, extra_body={"top_k": top_k} if top_k else None)


def ascii_stop(text: str) -> str:
    """A 2-character piece of `text` (plain ASCII, not at the very start) to stop on."""
    for i in range(2, len(text) - 2):
        piece = text[i:i + 2]
        if piece.isascii() and piece.isprintable() and "<" not in piece and ">" not in piece and "=" not in piece:
            return piece
    pytest.skip(f"no plain 2-character piece in {text!r}")


# ---- seed -------------------------------------------------------------------------------------

def test_a_seed_is_any_int64_as_openai_takes_it(client):
    for seed in (-1, -2**63, 2**63 - 1):
        first, again = (seeded(client, n=2, seed=seed) for _ in range(2))
        assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices], seed
    assert seeded(client, seed=-1).choices[0].message.content != seeded(client, seed=1).choices[0].message.content


# ---- stop -------------------------------------------------------------------------------------

def test_stop_cuts_the_reply_where_the_string_starts_in_every_mode(client):
    full = seeded(client).choices[0]
    assert full.finish_reason == "length"
    text = full.message.content
    stop = ascii_stop(text)
    expected = text[:text.index(stop)]
    cut = seeded(client, stop=[stop, "never appears \x01"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    as_string = seeded(client, stop=stop)
    assert as_string.choices[0].message.content == expected
    # Streaming sends nothing at or past the stop string, and ends with finish_reason "stop".
    chunks = list(seeded(client, stop=stop, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_each_choice_stops_on_its_own_in_the_batch(client, fp32_server):
    batcher = fp32_server.app.state.pool.engines[0]
    rows_per_step = []
    real_iterate = batcher._iterate

    def counting_iterate(admit, state):
        real_iterate(admit, state)
        rows_per_step.append(len(batcher._slots))

    batcher._iterate = counting_iterate
    try:
        reply = seeded(client, n=4, stop=["e", " ", "6"], logprobs=True)
    finally:
        batcher._iterate = real_iterate
    for choice in reply.choices:
        assert not any(s in choice.message.content for s in ("e", " ", "6"))
        written = len(choice.logprobs.content)
        assert written == 20 if choice.finish_reason == "length" else written < 20
    assert sum(c.finish_reason == "stop" for c in reply.choices) >= 2
    # A choice that matched left the batch then and there: fewer rows while the others went on,
    # and the tokens counted are exactly the ones each choice wrote up to its match.
    live = [r for r in rows_per_step if r > 0]
    assert live[0] == 4 and sorted(set(live), reverse=True) == list(dict.fromkeys(live)) and len(set(live)) > 1
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_a_stop_string_completed_by_held_back_text_at_max_tokens_is_a_stop(client):
    """When max_tokens ends a reply, the text still held back (a call's closing `>>`, a character cut
    in the middle) is flushed; a stop string that text completes ends the reply "stop", not "length",
    and streaming sends what the whole reply holds."""
    checked = 0
    for seed in range(1, 6):
        full = seeded(client, seed=seed, max_tokens=8)
        text = full.choices[0].message.content
        if full.choices[0].finish_reason != "length" or len(text) < 2:
            continue
        stop = text[-2:]
        cut = seeded(client, seed=seed, max_tokens=8, stop=stop)
        content = cut.choices[0].message.content
        assert cut.choices[0].finish_reason == "stop", (seed, text, stop)
        assert text.startswith(content) and stop not in content
        assert cut.usage.completion_tokens <= full.usage.completion_tokens
        chunks = list(seeded(client, seed=seed, max_tokens=8, stop=stop, stream=True,
                             stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens
        checked += 1
    assert checked >= 3


def test_stop_is_validated(fp32_server):
    for stop, why in [(["a", "b", "c", "d", "e"], "five"), ([""], "empty"), ([3], "number"), ({}, "object")]:
        response = httpx.post(f"{fp32_server.url}/v1/chat/completions", json={"messages": USER, "stop": stop})
        assert response.status_code == 400 and response.json()["error"]["param"] == "stop", why


# ---- logprobs ---------------------------------------------------------------------------------

def token_ids_of(tokenizer, content) -> list[int]:
    by_bytes = {tokenizer.decode_bytes([i]): i for i in range(tokenizer.vocab_size)}
    return [by_bytes[bytes(entry.bytes)] for entry in content]


def test_logprobs_are_the_models_own_log_softmax(client, reference):
    model, tokenizer = reference
    reply = seeded(client, logprobs=True, top_logprobs=5, temperature=1.5, top_k=7)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 20
    prompt = tokenizer.render_for_completion({"messages": USER})
    ids = token_ids_of(tokenizer, content)
    with torch.no_grad():
        reference_lp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0].float(), dim=-1)
    for t, entry in enumerate(content):
        row = reference_lp[len(prompt) - 1 + t]  # at temperature 1, whatever the request's temperature
        assert entry.logprob == pytest.approx(row[ids[t]].item(), abs=1e-4)
        assert entry.token == tokenizer.decode_bytes([ids[t]]).decode("utf-8", errors="replace")
        best = torch.topk(row, 5)
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [bytes(top.bytes) for top in entry.top_logprobs] == [tokenizer.decode_bytes([i]) for i in best.indices]
    # Streaming carries the same entries, spread over the chunks.
    chunks = seeded(client, logprobs=True, top_logprobs=5, temperature=1.5, top_k=7, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    assert seeded(client).choices[0].logprobs is None


def test_top_logprobs_needs_logprobs_and_a_range(fp32_server):
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": 1}, "logprobs")]:
        response = httpx.post(f"{fp32_server.url}/v1/chat/completions", json={"messages": USER, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


# ---- tools, roles, routes, fields --------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_client():
    tokenizer = tiny_tokenizer()
    model, _ = scripted_tool_model(tokenizer, "6*7")
    app = create_app(WorkerPool([Engine(model, tokenizer, compute_dtype=torch.float32)]), "scripted")
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_the_models_own_calculator_calls_are_reported(tool_client):
    reply = tool_client.chat.completions.create(model="scripted", messages=USER, max_tokens=30, temperature=0)
    message = reply.choices[0].message
    assert message.content == "<<6*7=42>>!" and message.tool_calls is None
    assert message.model_extra["picochat"] == {
        "parts": [{"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
                  {"type": "text", "text": "!"}],
        "calculator_calls": [{"expression": "6*7", "result": "42"}]}
    assert reply.choices[0].finish_reason == "stop"


def test_a_stop_string_on_the_held_back_end_of_a_call_is_a_stop_in_every_mode():
    """A call the calculator refuses shows as `<<x>>`; its `>>` is held back after <|python_end|> (an
    `=` result could follow). max_tokens ending right there flushes it: with stop ">>" every choice
    ends "stop" before it, streaming or not, and the tokens it wrote are counted."""
    tokenizer = tiny_tokenizer()
    model, _ = scripted_tool_model(tokenizer, "x")
    call = len(tokenizer.encode("x")) + 2  # <|python_start|> x <|python_end|>
    app = create_app(WorkerPool([Engine(model, tokenizer, compute_dtype=torch.float32)]), "scripted")
    with ServerThread(app) as srv:
        ask = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=30)

        def reply(**kwargs):
            return ask.chat.completions.create(model="scripted", messages=USER, max_tokens=call, temperature=0, n=2,
                                               **kwargs)

        whole = reply()
        assert [(c.message.content, c.finish_reason) for c in whole.choices] == [("<<x>>", "length")] * 2
        cut = reply(stop=">>")
        assert [(c.message.content, c.finish_reason) for c in cut.choices] == [("<<x", "stop")] * 2
        assert cut.usage.completion_tokens == whole.usage.completion_tokens == 2 * call
        chunks = list(reply(stop=[">>"], stream=True, stream_options={"include_usage": True}))
        for i in range(2):
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) \
                == "<<x"
        assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) \
            == ["stop", "stop"]
        assert chunks[-1].usage.completion_tokens == 2 * call


def test_client_tools_are_refused_but_tool_choice_none_is_fine(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="picochat", messages=USER, tools=tools)
    assert info.value.body["param"] == "tools" and "calculator" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="picochat", messages=USER, tool_choice="auto")
    assert info.value.body["param"] == "tool_choice"
    reply = client.chat.completions.create(model="picochat", messages=USER, tool_choice="none", max_tokens=3)
    assert reply.choices[0].message.role == "assistant"


def test_a_tool_message_renders_as_the_calculators_output(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
    as_tools = [{"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": "Let me see.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "assistant", "content": "It is 42."},
                {"role": "user", "content": "Thanks!"}]
    as_parts = [{"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me see."},
                                                  {"type": "python", "text": "6*7"},
                                                  {"type": "python_output", "text": "42"},
                                                  {"type": "text", "text": "It is 42."}]},
                {"role": "user", "content": "Thanks!"}]
    as_display = [{"role": "user", "content": "What is 6*7?"},
                  {"role": "assistant", "content": "Let me see.<<6*7>>"},
                  {"role": "tool", "content": "42"},
                  {"role": "assistant", "content": "It is 42."},
                  {"role": "user", "content": "Thanks!"}]
    replies = [client.chat.completions.create(model="picochat", messages=m, max_tokens=8, temperature=0)
               for m in (as_tools, as_parts, as_display)]
    assert len({r.usage.prompt_tokens for r in replies}) == 1
    assert len({r.choices[0].message.content for r in replies}) == 1
    with pytest.raises(openai.BadRequestError) as info:  # a tool result with no call before it
        client.chat.completions.create(model="picochat", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "tool", "content": "42"}, {"role": "user", "content": "ok"}])
    assert info.value.body["param"] == "messages.2.role"
    bad_call = {**call, "function": {"name": "search", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="picochat", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [bad_call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "x"}, {"role": "user", "content": "ok"}])
    assert info.value.body["param"] == "messages.1.tool_calls.0"


def test_developer_is_system(client):
    as_system = client.chat.completions.create(model="picochat", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, *USER])
    as_developer = client.chat.completions.create(model="picochat", max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, *USER])
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_a_reply_sent_back_in_the_history_is_taken_as_it_came(client):
    """A chat loop appends the reply it got (`messages.append(reply.choices[0].message)`): the client
    then sends the reply's `picochat` field back, and after model_dump() OpenAI's null fields too."""
    message = client.chat.completions.create(model="picochat", messages=USER, max_tokens=6, seed=1).choices[0].message
    follow_up = {"role": "user", "content": "And then?"}
    answers = [client.chat.completions.create(model="picochat", max_tokens=4, temperature=0,
                                              messages=[*USER, sent, follow_up])
               for sent in ({"role": "assistant", "content": message.content}, message, message.model_dump())]
    assert len({a.usage.prompt_tokens for a in answers}) == 1
    assert len({a.choices[0].message.content for a in answers}) == 1
    with pytest.raises(openai.BadRequestError) as info:  # a refusal picochat would have to show the model
        client.chat.completions.create(model="picochat", max_tokens=4, messages=[
            *USER, {"role": "assistant", "content": "no", "refusal": "I cannot."}, follow_up])
    assert info.value.body["param"] == "messages.1.refusal"


def test_leading_system_messages_are_read_as_one(client):
    """OpenAI takes several instructions up front (a system prompt, then a developer one or a summary
    of earlier turns); picochat's one system text holds them in order, a blank line apart."""
    def ask(instructions: list[dict]):
        return client.chat.completions.create(model="picochat", max_tokens=8, temperature=0,
                                              messages=[*instructions, *USER])

    several = ask([{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Say yes."}])
    one = ask([{"role": "system", "content": "Be brief.\n\nSay yes."}])
    assert several.usage.prompt_tokens == one.usage.prompt_tokens
    assert several.choices[0].message.content == one.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:  # later on, the format has no place for one
        client.chat.completions.create(model="picochat", max_tokens=2, messages=[
            *USER, {"role": "assistant", "content": "Yes."}, {"role": "system", "content": "Be brief."}, *USER])
    assert info.value.body["param"] == "messages.2"


def test_an_empty_reply_can_be_sent_back(client):
    """A stop string at the very start gives the reply "" (finish_reason "stop"); OpenAI takes an empty
    assistant message back, and picochat renders it as the empty turn the model wrote."""
    text = seeded(client).choices[0].message.content
    empty = seeded(client, stop=text[0]).choices[0]
    assert empty.message.content == "" and empty.finish_reason == "stop"
    follow_up = {"role": "user", "content": "And then?"}
    as_text, as_part = (client.chat.completions.create(model="picochat", max_tokens=4, temperature=0,
                                                       messages=[*USER, {"role": "assistant", "content": c}, follow_up])
                        for c in ("", [{"type": "text", "text": ""}]))
    assert as_text.usage.prompt_tokens == as_part.usage.prompt_tokens
    assert as_text.choices[0].message.content == as_part.choices[0].message.content


def test_a_model_can_be_retrieved_by_id(client):
    model_id = client.models.list().data[0].id
    assert client.models.retrieve(model_id).id == model_id
    assert client.models.retrieve("picochat").id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_unknown_and_unsupported_fields_are_named(client):
    for extra, param in [({"foo": 1}, "foo"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
                         ({"logit_bias": {"5": 10}}, "logit_bias"), ({"response_format": {"type": "json_object"}},
                                                                     "response_format"),
                         ({"parallel_tool_calls": True}, "parallel_tool_calls"), ({"store": True}, "store")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="picochat", messages=USER, max_tokens=2, extra_body=extra)
        assert info.value.body["param"] == param, extra
    ok = client.chat.completions.create(model="picochat", messages=USER, max_tokens=2, user="someone",
                                        frequency_penalty=0, presence_penalty=0.0, logit_bias={},
                                        response_format={"type": "text"}, store=False,
                                        stream_options={"include_usage": False, "include_obfuscation": False})
    assert ok.choices[0].message.role == "assistant"


# ---- keys -------------------------------------------------------------------------------------

def test_an_api_key_guards_the_api(checkpoint_home, monkeypatch):
    monkeypatch.setenv("PICOCHAT_API_KEY", "sk-local-test")
    app, _ = build_app(serve_args("--device", "cpu", "--dtype", "fp32", "--max-tokens", "4"))
    with ServerThread(app) as srv:
        for key in ("wrong", ""):
            bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key or "x", max_retries=0,
                                default_headers={} if key else {"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as info:
                bad.chat.completions.create(model="picochat", messages=USER)
            assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        assert httpx.post(f"{srv.url}/tokenize", json={"prompt": "x"}).status_code == 401
        health = httpx.get(f"{srv.url}/health").json()  # the page learns that it must ask for a key
        assert health["auth"] is True and httpx.get(f"{srv.url}/").status_code == 200
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-local-test", max_retries=0)
        assert good.chat.completions.create(model="picochat", messages=USER).choices[0].message.role == "assistant"
    app, _ = build_app(serve_args("--device", "cpu", "--dtype", "fp32", "--api-key", "flag-key"))
    with ServerThread(app) as srv:  # the flag wins over the environment
        assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer flag-key"}).status_code == 200


def test_binding_beyond_loopback_without_a_key_warns(checkpoint_home, monkeypatch, capsys):
    import uvicorn

    from picochat.serve import commands

    monkeypatch.delenv("PICOCHAT_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    commands.run(serve_args("--host", "0.0.0.0", "--device", "cpu", "--dtype", "fp32"))
    assert "no API key" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost"):
        commands.run(serve_args("--host", host, "--device", "cpu", "--dtype", "fp32"))
    commands.run(serve_args("--host", "0.0.0.0", "--api-key", "k", "--device", "cpu", "--dtype", "fp32"))
    assert "warning" not in capsys.readouterr().err


# ---- long chats -------------------------------------------------------------------------------

def long_chat(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are picochat."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}: where does the quick brown fox go?"},
                     {"role": "assistant", "content": f"answer {i}: over the lazy dog, as always."}]
    return messages + [{"role": "user", "content": "and now?"}]


def test_a_two_hundred_turn_chat_drops_its_oldest_turns_and_says_so(client, fp32_server):
    raw = client.chat.completions.with_raw_response.create(model="picochat", messages=long_chat(200), max_tokens=8)
    reply = raw.parse()
    dropped = int(raw.headers["x-picochat-dropped-messages"])
    assert dropped % 2 == 0 and 380 < dropped < 401 and reply.usage.model_extra["dropped_messages"] == dropped
    assert reply.usage.prompt_tokens + 8 <= 128  # the served context
    short = client.chat.completions.with_raw_response.create(model="picochat", messages=USER, max_tokens=2)
    assert short.headers["x-picochat-dropped-messages"] == "0"
    # Streaming says it too (header, and the usage frame).
    with httpx.stream("POST", f"{fp32_server.url}/v1/chat/completions", json={
            "messages": long_chat(200), "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
            timeout=60) as response:
        assert response.headers["x-picochat-dropped-messages"] == str(dropped)
        frames = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert f'"dropped_messages": {dropped}' in frames[-1]


def test_dropped_messages_count_the_requests_messages_when_tool_turns_merge(client):
    """A calculator exchange (assistant call, tool result, assistant text) is one turn of the prompt and
    three messages of the request: the count is of the request's messages (it used to be of turns)."""
    call = {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
    messages = [{"role": "system", "content": "You are picochat."}]
    for i in range(60):
        messages += [{"role": "user", "content": f"question {i}: what is six times seven?"},
                     {"role": "assistant", "content": "Let me see.", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c", "content": "42"},
                     {"role": "assistant", "content": f"answer {i}: it is 42."}]
    messages.append({"role": "user", "content": "and now?"})
    raw = client.chat.completions.with_raw_response.create(model="picochat", messages=messages, max_tokens=4)
    dropped = int(raw.headers["x-picochat-dropped-messages"])
    assert raw.parse().usage.model_extra["dropped_messages"] == dropped
    assert dropped % 4 == 0 and 200 <= dropped < 240  # whole exchanges of 4 messages; the newest few kept
    kept = messages[:1] + messages[1 + dropped:]
    assert kept[1]["role"] == "user"
    again = client.chat.completions.with_raw_response.create(model="picochat", messages=kept, max_tokens=4)
    assert again.headers["x-picochat-dropped-messages"] == "0"  # what was kept fits as it is


def test_a_message_that_cannot_fit_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="picochat", max_tokens=8, messages=[
            {"role": "user", "content": "the quick brown fox " * 100}])
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"


def test_long_chats_from_many_clients_at_once(client):
    results = []

    def ask(turns: int) -> None:
        results.append(client.chat.completions.create(model="picochat", messages=long_chat(turns), max_tokens=4))

    threads = [threading.Thread(target=ask, args=(t,)) for t in (50, 120, 200, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(r.choices[0].message.role == "assistant" for r in results)
