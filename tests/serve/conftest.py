"""A real server for the serving tests: a tiny checkpoint, `build_app`, uvicorn in a thread on a free port."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

import pytest
import uvicorn
from typing_extensions import Self

from picochat.serve.commands import add_arguments, build_app
from picochat.serve.http import server_options
from tests.infer.tiny import save_tiny_checkpoint


class ServerThread:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **server_options()))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.pool.shutdown()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Every test here runs on one torch thread (tests/conftest.py)."""


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="session")
def checkpoint_home(tmp_path_factory):
    """$PICOCHAT_HOME holding a tiny sft checkpoint (set for the whole session of serving tests)."""
    home = tmp_path_factory.mktemp("serve_home")
    old = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    save_tiny_checkpoint("sft", "tiny", sequence_len=128)
    yield home
    if old is None:
        os.environ.pop("PICOCHAT_HOME", None)
    else:
        os.environ["PICOCHAT_HOME"] = old


@pytest.fixture(scope="session")
def server(checkpoint_home):
    app, _ = build_app(serve_args("--workers", "2", "--max-queue", "64", "--max-tokens", "24", "--device", "cpu"))
    with ServerThread(app) as running:
        yield running
