"""Fixtures for the scorer tests: a scripted OpenAI-compatible stub on 127.0.0.1, and a real
llama.cpp server (``python -m llama_cpp.server``) serving the tiny release's LLaMA as GGUF."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

GREEN_ANSWER = (
    "[Explanation]:\nok\n\n[Clinically Significant Errors]:\n"
    "(a) False report of a finding in the candidate: 1. x\n"
    "(b) Missing a finding present in the reference: 0.\n\n"
    "[Clinically Insignificant Errors]:\nNone.\n\n[Matched Findings]:\n3. a; b; c"
)  # score 3 / (3 + 1)


class StubServer:
    """Answers /v1/models and /v1/(chat/)completions; ``script`` is a list of (status, body)
    responses used in order for POSTs (then ``default``); ``requests`` records the POST bodies."""

    def __init__(self) -> None:
        self.script: list[tuple[int, object]] = []
        self.default: tuple[int, object] = (200, {"choices": [{"text": GREEN_ANSWER}]})
        self.requests: list[dict] = []
        self.models_status = 200
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(stub.models_status, {"data": [{"id": "stub"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                    status, answer = stub.script.pop(0) if stub.script else stub.default
                self._send(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_server():
    server = StubServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on a free 127.0.0.1 port; :meth:`stop` ends it."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "1", "--n_threads_batch", "1",
             "--n_batch", "512",
             "--seed", "0"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited early:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"{self.url}/v1/models", timeout=2) as response:
                    response.read()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not start within 120 s:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        if os.environ.get("RADIALOG_REQUIRE_LLAMA_CPP"):  # CI: these tests must run
            pytest.fail(f"llama-cpp-python[server] is required here but not importable: {exc}")
        pytest.skip(f"llama-cpp-python[server] is not installed ({exc}); .ci/run installs it")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_release, tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package writes the tiny model; pip install gguf")
    from radialog_rl.testing.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_release, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def llama_server(tiny_gguf, tmp_path_factory):
    """One real llama.cpp server for the session (tests must not stop it)."""
    _require_llama_cpp()
    server = LlamaServer(tiny_gguf, tmp_path_factory.mktemp("llama-log") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def own_llama_server(tiny_gguf, tmp_path):
    """A real llama.cpp server this test may kill."""
    _require_llama_cpp()
    server = LlamaServer(tiny_gguf, tmp_path / "server.log")
    yield server
    server.stop()
