"""The Hugging Face source of every dataset, against a parquet-export server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.errors import DataError
from picochat.tasks import load_task, sources

from .conftest import HUMANEVAL_ROWS


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


# (repo, config, split) -> list of files, each a list of rows: the layout of the hub's parquet export.
HUB = {
    ("HuggingFaceTB/smol-smoltalk", "default", "train"): [
        [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}], "source": "x"}],
        [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "source": "y"},
         {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "source": "bad"}],
    ],
    ("cais/mmlu", "all", "auxiliary_train"): [
        [{"train": {"question": "Q1?", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 2}}]],
    ("cais/mmlu", "all", "test"): [
        [{"question": "Q2?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 0}]],
    ("allenai/ai2_arc", "ARC-Challenge", "train"): [
        [{"id": "a", "question": "Pick two.", "choices": {"text": ["one", "two"], "label": ["A", "B"]},
          "answerKey": "B"}]],
    ("allenai/openbookqa", "main", "test"): [
        [{"id": "o", "question_stem": "Sun is a", "choices": {"text": ["star", "rock"], "label": ["A", "B"]},
          "answerKey": "A", "fact1": "f"}]],
    ("tau/commonsense_qa", "default", "train"): [
        [{"id": "c", "question": "Cold?", "question_concept": "c",
          "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["ice", "fire", "sun", "lava", "oven"]},
          "answerKey": "A"}]],
    ("openai/gsm8k", "main", "train"): [
        [{"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                      "How much did she earn?",
          "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                    "$<<0.2*50=10>>10.\n#### 10"}]],
    ("openai/openai_humaneval", "openai_humaneval", "test"): [HUMANEVAL_ROWS],
}


class HubServer:
    """Serves /api/datasets/<repo>/parquet/<config>/<split> listings and the parquet files."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.failures: Counter = Counter()  # path -> how many 503s to send before succeeding
        self.requests: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] += 1
                if server.failures[self.path] > 0:
                    server.failures[self.path] -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        for (repo, config, split), files in HUB.items():
            urls = []
            for k, rows in enumerate(files):
                path = f"/files/{repo}/{config}/{split}/{k}.parquet"
                self.files[path] = parquet_bytes(rows)
                urls.append(self.url + path)
            self.files[f"/api/datasets/{repo}/parquet/{config}/{split}"] = json.dumps(urls).encode()
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def hub(picochat_home, monkeypatch):
    server = HubServer()
    monkeypatch.setenv("PICOCHAT_HF_ENDPOINT", server.url)
    monkeypatch.setattr(sources, "RETRY_BACKOFF_S", 0.01)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_smoltalk_hf_keeps_system_and_drops_broken_rows(hub):
    task = load_task("smoltalk", "train", source="hf")
    assert len(task) == 2  # two parquet files; the non-alternating row is dropped
    assert task[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert task[1]["messages"][1]["content"] == "4"


def test_mmlu_hf_auxiliary_train_unwraps_rows(hub):
    task = load_task("mmlu", "auxiliary_train", source="hf")
    assert task[0]["messages"][1]["content"] == "C"
    assert task[0]["subject"] == "miscellaneous"
    assert load_task("mmlu", "test", source="hf")[0]["subject"] == "anatomy"


def test_multiple_choice_hf_layouts(hub):
    assert load_task("arc_challenge", "train", source="hf")[0]["messages"][1]["content"] == "B"
    obqa = load_task("openbookqa", "test", source="hf")[0]
    assert obqa["messages"][0]["content"].startswith("Multiple Choice question: Sun is a\n- star=A")
    assert load_task("commonsenseqa", "train", source="hf")[0]["letters"] == list("ABCDE")


def test_gsm8k_hf_train(hub):
    conv = load_task("gsm8k", "train", source="hf")[0]
    assert conv["answer"] == "10"
    assert [p["type"] for p in conv["messages"][1]["content"]] == [
        "text", "python", "python_output", "text", "python", "python_output", "text"]


def test_humaneval_hf(hub):
    task = load_task("humaneval", "test", source="hf")
    assert len(task) == 2 and task[1]["entry_point"] == "double"


def test_downloads_retry_on_server_errors_and_cache(hub):
    listing = "/api/datasets/openai/gsm8k/parquet/main/train"
    hub.failures[listing] = 2
    hub.failures["/files/openai/gsm8k/main/train/0.parquet"] = 1
    load_task("gsm8k", "train", source="hf")
    assert hub.requests[listing] == 3
    assert hub.requests["/files/openai/gsm8k/main/train/0.parquet"] == 2
    files = sources.hf_parquet_files("openai/gsm8k", "main", "train")  # from the manifest: no request
    assert hub.requests[listing] == 3 and files[0].exists()


def test_missing_dataset_fails_fast_with_a_clear_error(hub):
    with pytest.raises(DataError, match=r"HTTP 404"):
        sources.hf_parquet_files("nobody/nothing", "default", "train")
    assert hub.requests["/api/datasets/nobody/nothing/parquet/default/train"] == 1  # 4xx: no retries


def test_persistent_server_errors_give_up(hub):
    hub.failures["/api/datasets/cais/mmlu/parquet/all/test"] = 99
    with pytest.raises(DataError, match="HTTP 503"):
        load_task("mmlu", "test", source="hf")
    assert hub.requests["/api/datasets/cais/mmlu/parquet/all/test"] == sources.RETRIES


def test_a_garbled_parquet_file_is_refused(hub):
    hub.files["/files/openai/gsm8k/main/train/0.parquet"] = b"<html>rate limited</html>"
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_task("gsm8k", "train", source="hf")
    assert not list((sources.datasets_dir() / "hf" / "openai/gsm8k/main/train").glob("*.parquet"))


def test_a_file_changed_after_download_is_fetched_again(hub):
    files = sources.hf_parquet_files("openai/gsm8k", "main", "train")
    files[0].write_bytes(b"truncated")
    again = sources.hf_parquet_files("openai/gsm8k", "main", "train")
    assert hub.requests["/files/openai/gsm8k/main/train/0.parquet"] == 2
    assert pq.read_table(again[0]).num_rows == 1
    manifest = json.loads((again[0].parent / "manifest.json").read_text())
    assert manifest["files"][0]["bytes"] == again[0].stat().st_size and len(manifest["files"][0]["sha256"]) == 64


def test_auto_source_uses_the_hub_when_it_answers_and_offline_when_not(hub, monkeypatch):
    said = []
    assert sources.resolve_source("auto", log=said.append) == "hf"
    assert sources.resolve_source("offline") == "offline" and sources.resolve_source("hf") == "hf"
    hub.httpd.shutdown()
    hub.httpd.server_close()
    assert sources.resolve_source("auto", timeout=2, log=said.append) == "offline"
    assert "using the full online mixtures" in said[0] and "using the offline mixtures" in said[1]
    with pytest.raises(DataError, match="--source 'web'"):
        sources.resolve_source("web")
