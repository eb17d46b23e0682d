"""The shard downloader against a real HTTP server on 127.0.0.1 that fails on purpose."""

from __future__ import annotations

import hashlib
import io
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.cli import main
from picochat.data import download
from picochat.data.shards import list_shards
from picochat.errors import DataError

VAL = "shard_01822.parquet"  # FineWeb-Edu's last shard: always fetched, for validation


def make_shard(seed: int, docs: int = 300) -> bytes:
    """A parquet shard of random-word documents (~40 KB, barely compressible)."""
    rng = random.Random(seed)
    texts = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(40))
             for _ in range(docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


class ShardServer:
    """Serves `files` by name; `plan[name]` queues failures: '500', 'truncate' (half the body, then hang up),
    'slow' (answer after half a second), 'no-range' (ignore a Range header: 200 and the whole file)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.plan, self.requests = files, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                action = server.plan[name].pop(0) if server.plan.get(name) else "ok"
                if action == "500":
                    self.send_error(500, "try again")
                    return
                if action == "slow":
                    time.sleep(0.5)
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                if self.headers.get("Range") and action != "no-range":
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(data):  # past the end: nothing to send, as real servers answer
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def names_requested(self, name: str) -> list[str | None]:
        """The Range header of every request for `name`, in order (None: no Range)."""
        return [rng for n, rng in self.requests if n == f"data/{name}"]


@pytest.fixture
def server():
    files = {f"data/shard_{i:05d}.parquet": make_shard(i) for i in range(3)}
    files[f"data/{VAL}"] = make_shard(1822)
    s = ShardServer(files)
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def fetch(server: ShardServer, out: Path, n: int = 2, **kwargs) -> list[Path]:
    kwargs.setdefault("backoff_s", 0.001)
    return download.download_shards("fineweb-edu", n, out, base_url=server.url, log=lambda s: None, **kwargs)


def served(server: ShardServer, name: str) -> bytes:
    return server.files[f"data/{name}"]


def test_shard_indices_always_end_with_the_val_shard():
    layout = download.LAYOUTS["fineweb-edu"]
    assert download.shard_indices(layout, 3) == [0, 1, 2, 1822]
    assert download.shard_indices(layout, 5000) == list(range(1823))  # never the val shard twice
    with pytest.raises(DataError, match="at least 1"):
        download.shard_indices(layout, 0)


def test_downloads_train_and_val_shards_and_second_run_is_a_noop(server, tmp_path):
    paths = fetch(server, tmp_path, n=2)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", VAL]
    for p in paths:
        assert p.read_bytes() == served(server, p.name)
    train, val = list_shards(tmp_path)
    assert val.name == VAL and [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert not list(tmp_path.glob("*.tmp"))

    n_requests, logs = len(server.requests), []
    download.download_shards("fineweb-edu", 2, tmp_path, base_url=server.url, log=logs.append)
    assert len(server.requests) == n_requests
    assert "nothing to do" in logs[-1]


def test_retries_server_errors_until_it_succeeds(server, tmp_path):
    server.plan["data/shard_00000.parquet"] = ["500", "500"]
    fetch(server, tmp_path, n=1)
    assert len(server.names_requested("shard_00000.parquet")) == 3
    assert (tmp_path / "shard_00000.parquet").read_bytes() == served(server, "shard_00000.parquet")


def test_gives_up_after_the_last_retry_and_keeps_the_partial_file(server, tmp_path):
    server.plan["data/shard_00000.parquet"] = ["truncate"] + ["500"] * 10
    with pytest.raises(DataError, match="failed after 3 attempts"):
        fetch(server, tmp_path, n=1, retries=2)
    assert not (tmp_path / "shard_00000.parquet").exists()
    partial = tmp_path / "shard_00000.parquet.tmp"
    assert 0 < partial.stat().st_size < len(served(server, "shard_00000.parquet"))


def test_truncated_body_is_resumed_with_a_range_request(server, tmp_path):
    server.plan["data/shard_00001.parquet"] = ["truncate"]
    fetch(server, tmp_path, n=2)
    ranges = server.names_requested("shard_00001.parquet")
    size = len(served(server, "shard_00001.parquet"))
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < size
    assert (tmp_path / "shard_00001.parquet").read_bytes() == served(server, "shard_00001.parquet")


def test_existing_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    data = served(server, VAL)
    (tmp_path / f"{VAL}.tmp").write_bytes(data[:1000])
    fetch(server, tmp_path, n=1)
    assert server.names_requested(VAL) == ["bytes=1000-"]
    assert (tmp_path / VAL).read_bytes() == data
    assert not (tmp_path / f"{VAL}.tmp").exists()


def test_checksum_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    sums = {n: hashlib.sha256(served(server, n)).hexdigest() for n in ("shard_00000.parquet", VAL)}
    sums["shard_00000.parquet"] = "0" * 64
    manifest = tmp_path / "sums.txt"
    manifest.write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"shard_00000\.parquet: sha256 [0-9a-f]{64} does not match"):
        fetch(server, out, n=1, sha256_manifest=str(manifest))
    assert not (out / "shard_00000.parquet").exists() and not (out / "shard_00000.parquet.tmp").exists()
    assert (out / VAL).read_bytes() == served(server, VAL)  # the good one was kept


def test_sha256sums_in_the_directory_is_used_and_checked(server, tmp_path):
    (tmp_path / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(served(server, n)).hexdigest()}  {n}\n" for n in ("shard_00000.parquet", VAL)))
    fetch(server, tmp_path, n=1)
    assert (tmp_path / "shard_00000.parquet").exists()
    with pytest.raises(DataError, match="no sum for shard_00001.parquet"):
        fetch(server, tmp_path, n=2)


def test_a_file_that_is_not_parquet_is_rejected_and_deleted(server, tmp_path):
    server.files["data/shard_00000.parquet"] = b"<html>rate limited</html>" * 100
    with pytest.raises(DataError, match="not a usable shard"):
        fetch(server, tmp_path, n=1)
    assert not (tmp_path / "shard_00000.parquet").exists() and not (tmp_path / "shard_00000.parquet.tmp").exists()


def test_a_parquet_without_text_column_is_rejected(server, tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"content": ["a doc"]}), buf)
    server.files["data/shard_00000.parquet"] = buf.getvalue()
    with pytest.raises(DataError, match="no 'text' column"):
        fetch(server, tmp_path, n=1)
    assert not list(tmp_path.glob("shard_00000*"))


def test_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download.download_file(f"{server.url}/nope.parquet", tmp_path / "nope.parquet", backoff_s=0.001)
    assert len(server.names_requested("nope.parquet")) == 1


def test_cli_download(server, picochat_home, capsys):
    assert main(["data", "download", "-n", "3", "-w", "2", "--base-url", server.url]) == 0
    out = picochat_home / "data" / "fineweb-edu"
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", VAL]
    assert "[4/4]" in capsys.readouterr().out
    assert main(["data", "download", "-n", "1", "--base-url", server.url + "/missing",
                 "--data-dir", str(picochat_home / "x"), "--retries", "0"]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_a_complete_partial_file_is_kept_when_the_server_answers_416(server, tmp_path):
    data = served(server, VAL)
    (tmp_path / f"{VAL}.tmp").write_bytes(data)  # the earlier run got every byte but stopped before the rename
    fetch(server, tmp_path, n=1)
    assert server.names_requested(VAL) == [f"bytes={len(data)}-"]
    assert (tmp_path / VAL).read_bytes() == data


def test_a_partial_file_longer_than_the_remote_one_is_downloaded_again(server, tmp_path):
    data = served(server, VAL)
    (tmp_path / f"{VAL}.tmp").write_bytes(data + b"bytes of an older, longer version")
    fetch(server, tmp_path, n=1)
    assert server.names_requested(VAL) == [f"bytes={len(data) + 33}-", None]  # 416, then from the start
    assert (tmp_path / VAL).read_bytes() == data
    assert not (tmp_path / f"{VAL}.tmp").exists()


@pytest.mark.parametrize("base_url", ["127.0.0.1:1/data", "ftp://127.0.0.1/data", "http://127.0.0.1:port/data"])
def test_a_malformed_base_url_fails_at_once_naming_the_flag(tmp_path, monkeypatch, base_url):
    sleeps = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    with pytest.raises(DataError, match="--base-url") as info:
        download.download_shards("fineweb-edu", 1, tmp_path, base_url=base_url, log=lambda s: None)
    assert sleeps == [] and "attempts" not in str(info.value)  # never retried: it can never work
    assert not list(tmp_path.glob("shard_*"))


def test_negative_retries_is_a_clear_error(server, tmp_path):
    with pytest.raises(DataError, match="--retries -1"):
        fetch(server, tmp_path, n=1, retries=-1)
    assert server.requests == []


def test_a_data_dir_that_is_a_file_is_a_clear_error(server, tmp_path):
    target = tmp_path / "shards"
    target.write_text("not a directory")
    with pytest.raises(DataError, match=f"--data-dir {target}"):
        fetch(server, target, n=1)


def test_a_malformed_manifest_url_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--sha256-manifest http://127.0.0.1:port/SHA256SUMS: could not fetch"):
        download.read_sha256_manifest("http://127.0.0.1:port/SHA256SUMS")


def test_an_interrupt_starts_no_more_downloads(server, tmp_path):
    """Ctrl-C (or any unexpected error) stops the queue: the shards not yet started are not fetched."""
    def log(line):
        if "[1/" in line:
            raise KeyboardInterrupt

    server.plan["data/shard_00001.parquet"] = ["slow"]  # still under way when the interrupt comes
    with pytest.raises(KeyboardInterrupt):
        download.download_shards("fineweb-edu", 3, tmp_path, base_url=server.url, workers=1, backoff_s=0.001, log=log)
    fetched = {name for name, _ in server.requests}
    assert len(fetched) <= 2  # the finished one and at most the one already under way, not all 4


def test_a_directory_that_cannot_be_written_is_a_clear_error(server, tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):  # what the lock meets in a directory without write permission
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(download, "FileLock", read_only)
    with pytest.raises(DataError, match=r"shard_00000\.parquet.*Permission denied.*--data-dir"):
        fetch(server, tmp_path, n=1)


def test_a_server_that_ignores_range_replaces_the_partial_file(server, tmp_path):
    data = served(server, VAL)
    (tmp_path / f"{VAL}.tmp").write_bytes(data[:1000])
    server.plan[f"data/{VAL}"] = ["no-range"]  # 200 with the whole file: it must not be appended
    fetch(server, tmp_path, n=1)
    assert server.names_requested(VAL) == ["bytes=1000-"]
    assert (tmp_path / VAL).read_bytes() == data
