"""The server in each compute dtype: weights cast once at load, continuous batching, same answers."""

import httpx
import pytest
import torch

from picochat.infer.batching import BatchingEngine
from picochat.serve.commands import build_app
from tests.serve.conftest import ServerThread, serve_args


@pytest.mark.parametrize("dtype,name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_the_pool_batches_with_weights_in_the_compute_dtype(checkpoint_home, dtype, name):
    app, _ = build_app(serve_args("--workers", "2", "--max-batch", "4", "--device", "cpu", "--dtype", name))
    pool = app.state.pool
    replicas = pool.replicas()
    assert len(replicas) == 2 and all(isinstance(r, BatchingEngine) for r in replicas)
    assert pool.stats()["concurrent"] == 8
    model = replicas[0].engine.model
    assert {p.dtype for p in model.parameters()} == {dtype}  # cast once at load, shared by the workers
    assert replicas[1].engine.model is model
    assert model.rotary_cos.dtype == torch.float32
    body = {"model": "picochat", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
            "temperature": 0.0, "n": 3}
    with ServerThread(app) as server:
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert "choices" in answer, answer
    texts = [c["message"]["content"] for c in answer["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: every row the same


def test_the_dtype_switch_is_honoured_where_auto_is_resolved(monkeypatch):
    from picochat.errors import ConfigError
    from picochat.runtime import pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.setenv("PICOCHAT_DTYPE", "bf16")
    assert pick_dtype(cpu) == pick_dtype(cpu, "auto") == torch.bfloat16
    assert pick_dtype(cpu, "fp32") == torch.float32  # an explicit --dtype wins
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp32")
    assert pick_dtype(cpu) == torch.float32
    monkeypatch.setenv("PICOCHAT_DTYPE", "half-ish")
    with pytest.raises(ConfigError, match="PICOCHAT_DTYPE"):
        pick_dtype(cpu)
