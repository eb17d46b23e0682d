"""The OpenAI-compatible API, driven by the official `openai` client and by raw HTTP."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from picochat.serve.app import create_app
from picochat.serve.pool import PoolFull, WorkerPool
from tests.serve.conftest import ServerThread, serve_args


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def test_models_and_health(server, client, model_id):
    assert model_id == "picochat-sft-tiny-step1"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == model_id and health["workers"] == 2
    assert health["concurrent"] == 16  # each CPU worker batches up to --max-batch (8) requests


def test_non_streaming_completion(client, model_id):
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=10, temperature=0.7, seed=1)
    assert response.object == "chat.completion"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= response.usage.completion_tokens <= 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_completion_with_usage(client, model_id):
    chunks = list(client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, seed=7))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    # The same seed without streaming gives the same text.
    whole = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Tell me a story"}],
                                           max_tokens=12, seed=7)
    assert whole.choices[0].message.content == streamed


def test_several_choices_stream_interleaved(client, model_id):
    request = {"model": "picochat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 3,
               "temperature": 1.0, "seed": 3}
    texts, reasons, order = {}, {}, []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.delta.content:
                order.append(choice.index)
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2] and sorted(reasons) == [0, 1, 2]
    # Each index carries its own choice's text: the texts the same seeded request gets without streaming.
    whole = client.chat.completions.create(**request)
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert len(set(texts.values())) == 3  # three different samples
    # The choices decode together: a later choice's first piece comes before an earlier choice's last piece.
    last = {i: len(order) - 1 - order[::-1].index(i) for i in set(order)}
    assert any(order.index(j) < last[i] for i in last for j in last if j > i), order


def test_multi_turn_with_tool_markup_in_history(client, model_id):
    """`<<expr=result>>` in an assistant turn is read back as the calculator call and its output
    (special tokens), not as text: the prompt is exactly that rendering."""
    from picochat.tokenizer import render_for_completion
    from tests.infer.tiny import tiny_tokenizer

    messages = [{"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": "It is <<6*7=42>>42."},
                {"role": "user", "content": "And doubled?"}]
    response = client.chat.completions.create(model=model_id, max_tokens=5, messages=messages)
    assert response.choices[0].message.content is not None
    tok = tiny_tokenizer()
    as_tools = [messages[0], {"role": "assistant", "content": [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"}, {"type": "text", "text": "42."}]}, messages[2]]
    prompt = render_for_completion(tok, {"messages": as_tools})
    assert response.usage.prompt_tokens == len(prompt)
    assert len(render_for_completion(tok, {"messages": messages})) != len(prompt)  # text would differ


def test_client_sees_bad_request_errors(client, model_id):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_thirty_two_concurrent_streams_complete(server):
    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, bool]:
        body = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True, "max_tokens": 16, "seed": i}
        async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            return response.status_code, lines[-1] == "data: [DONE]"

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)))

    results = asyncio.run(main())
    assert results == [(200, True)] * 32
    assert httpx.get(f"{server.url}/health").json()["busy"] == 0


def test_batched_requests_answer_as_they_would_alone(server, client, model_id):
    """Eight seeded requests at once share decode steps; each gets the text it gets alone."""
    def ask(i: int) -> str:
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": f"say {i}"}],
                                               max_tokens=20, temperature=1.0, seed=100 + i)
        return reply.choices[0].message.content

    alone = [ask(i) for i in range(8)]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(8)] == alone


def test_n_is_capped_by_the_batch(checkpoint_home):
    from picochat.errors import ConfigError
    from picochat.serve.commands import build_app

    app, _ = build_app(serve_args("--max-batch", "2", "--device", "cpu"))
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 4}
        response = httpx.post(f"{srv.url}/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        body["n"] = 2
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json=body).json()
        assert len(reply["choices"]) == 2
    with pytest.raises(ConfigError, match="--max-batch 0"):
        build_app(serve_args("--max-batch", "0", "--device", "cpu"))


def test_the_page_is_served_from_package_data(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not read from the working directory
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "/v1/chat/completions" in response.text


def gated_app(checkpoint_home, max_queue: int):
    """An app with one worker whose generation waits on a gate and then crawls (to hold the worker)."""
    from picochat.serve.commands import build_app

    app, _ = build_app(serve_args("--workers", "1", "--max-batch", "1", "--max-queue", str(max_queue), "--device", "cpu"))
    engine = app.state.pool.engines[0]
    gate, produced = threading.Event(), []
    real_generate = engine.generate

    def slow_generate(*args, **kwargs):
        gate.wait(10)
        for step in real_generate(*args, **kwargs):
            produced.append(step)
            time.sleep(0.01)
            yield step

    engine.generate = slow_generate
    return app, gate, produced


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_full_queue_answers_503_with_retry_after(checkpoint_home):
    app, gate, _ = gated_app(checkpoint_home, max_queue=0)
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        first = threading.Thread(target=lambda: httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30))
        first.start()
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["busy"] == 1)
        busy = httpx.post(f"{srv.url}/v1/chat/completions", json=body)
        assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
        assert busy.json()["error"]["code"] == "server_busy"
        gate.set()
        first.join(30)
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=body).status_code == 200


def test_client_disconnect_stops_generation(checkpoint_home):
    app, gate, produced = gated_app(checkpoint_home, max_queue=4)
    gate.set()
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        # Closing the connection mid-stream must free the worker long before 100 tokens.
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["busy"] == 0)
        assert app.state.cancelled == 1
        assert len(produced) < 60


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_non_streaming_clients_disconnect_stops_generation_too(checkpoint_home, path):
    """Without a stream no write fails when the client goes away: the server watches for the disconnect
    (it used to generate all 100 tokens for nobody, holding the worker)."""
    app, gate, produced = gated_app(checkpoint_home, max_queue=4)
    gate.set()
    with ServerThread(app) as srv:
        prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "Hello"}
        body = {**prompt, "max_tokens": 100, "temperature": 1.0, "seed": 1}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{srv.url}{path}", json=body, timeout=httpx.Timeout(30, read=0.3))
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["busy"] == 0)
        assert app.state.cancelled == 1
        assert len(produced) < 60
        answer = httpx.post(f"{srv.url}{path}", json={**body, "max_tokens": 3}, timeout=30)  # still serving
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_frees_its_batch_rows(checkpoint_home):
    from picochat.infer.batching import BatchingEngine
    from picochat.serve.commands import build_app

    app, _ = build_app(serve_args("--max-batch", "4", "--device", "cpu"))
    batcher = app.state.pool.engines[0]
    assert isinstance(batcher, BatchingEngine)
    steps = []
    real_iterate = batcher._iterate

    def slow_iterate(admit, state):  # ~10 ms per step, so 100 tokens would take a second
        steps.append(len(batcher._slots))
        time.sleep(0.01)
        real_iterate(admit, state)

    batcher._iterate = slow_iterate
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True, "temperature": 1.0,
                "n": 2, "seed": 3}  # seeded: neither choice ends on its own within the test
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["busy"] == 0)
        wait_for(lambda: not batcher._slots)  # both rows freed
        assert app.state.cancelled == 1 and len(steps) < 60


def test_stopping_the_server_stops_the_batch_thread(checkpoint_home):
    from fastapi.testclient import TestClient

    from picochat.serve.commands import build_app

    app, _ = build_app(serve_args("--device", "cpu"))
    batcher = app.state.pool.engines[0]
    with TestClient(app) as http:  # runs the app's lifespan, as uvicorn does
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert batcher._thread.is_alive()
    assert not batcher._thread.is_alive()  # no decode step left running while the process exits


def test_pool_refuses_beyond_its_queue():
    async def main():
        pool = WorkerPool([object()], max_queue=1)
        first = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        with pytest.raises(PoolFull):
            await pool.acquire()
        pool.release(first)
        assert await waiter is first
        pool.shutdown()

    asyncio.run(main())


def test_create_app_needs_no_checkpoint_for_health():
    pool = WorkerPool([object()], max_queue=0)
    app = create_app(pool, "m")
    with ServerThread(app) as srv:
        assert httpx.get(f"{srv.url}/health").json()["workers"] == 1
        assert json.loads(httpx.get(f"{srv.url}/v1/models").text)["data"][0]["id"] == "m"
