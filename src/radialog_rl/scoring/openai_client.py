"""A small client for OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` servers
(llama.cpp's ``llama-server``, ``llama-cpp-python``'s ``python -m llama_cpp.server``, vLLM).

Written on the standard library (``urllib`` + a thread pool) so the scorer adds no dependency;
``httpx`` or the ``openai`` package offer the same with connection pooling, which a judge that
takes seconds per answer does not need. Per request: a socket ``timeout``, up to ``retries``
retries with exponential backoff on connection errors, timeouts, HTTP 429 and 5xx (other HTTP
errors are not retried). Per batch: at most ``max_concurrency`` requests in flight; results come
back in order, a failed request as a :class:`CompletionError` value instead of a string.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radialog_rl.errors import ConfigError
from radialog_rl.scoring.base import ScoreStats, ScorerUnavailableError

__all__ = ["CompletionError", "OpenAICompatibleClient", "ServerUnreachableError"]

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF = 30.0
_CHECK_TIMEOUT = 10.0  # seconds the reachability check waits for an answer


class CompletionError(Exception):
    """One request failed for good (returned as a value by :meth:`complete_many`)."""


class ServerUnreachableError(CompletionError):
    """The connection itself failed (refused, reset, no route): nobody answered."""


class _Retryable(Exception):
    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _base_url(server_url: str) -> str:
    url = server_url.strip().rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"server_url must be an http(s) URL such as http://127.0.0.1:8080, got {server_url!r}")
    return url if parsed.path.endswith("/v1") else url + "/v1"


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class OpenAICompatibleClient:
    """Completions from an OpenAI-compatible server (greedy: ``temperature`` 0 by default).

    Args:
        server_url: base URL; ``/v1`` is appended when missing.
        model: the ``model`` field of each request.
        api_key_env: environment variable holding a bearer token (None = none sent).
        timeout: seconds a request may wait on the socket (connect, and each read).
        retries: retries after the first attempt (0 = try once).
        backoff: first retry delay in seconds; doubles per retry (at most 30 s).
        max_concurrency: requests in flight at once.
        max_tokens, temperature: generation options.
        request_params: extra JSON fields merged into every request body.
    """

    def __init__(
        self,
        server_url: str,
        *,
        model: str = "default",
        api_key_env: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        request_params: Mapping[str, Any] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0 or max_concurrency < 1:
            raise ConfigError("retries must be >= 0 and max_concurrency >= 1")
        self.base_url = _base_url(server_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.request_params = dict(request_params or {})
        # Loopback servers bypass any proxy from the environment; others use it as urllib does.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self._in_flight = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"environment variable {self.api_key_env} (scorer api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def check_reachable(self) -> None:
        """One ``GET /v1/models``; raises :class:`ScorerUnavailableError` naming the URL when no
        server answers or it rejects the API key. Any other answer counts as reachable."""
        url = f"{self.base_url}/models"
        request = urllib.request.Request(url, headers=self._headers(), method="GET")
        try:
            with self._opener.open(request, timeout=_CHECK_TIMEOUT) as response:
                response.read()
        except (TimeoutError, socket.timeout):
            return  # it accepted the connection: someone listens, only busy (llama-cpp-python's
            # /v1/models waits for the model lock while another client's request runs)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ScorerUnavailableError(
                    f"the server at {self.base_url} rejected the API key (HTTP {exc.code}); "
                    f"check scorer.api_key_env ({self.api_key_env or 'not set'})"
                ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                return  # as above: connected, but busy
            raise ScorerUnavailableError(
                f"no OpenAI-compatible server answers at {self.base_url} ({reason}); start it or fix "
                "scorer.server_url"
            ) from None

    def _body(self, prompt: str | Sequence[Mapping[str, str]], chat: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "stream": False}
        body["messages" if chat else "prompt"] = list(prompt) if chat else prompt
        body.update(self.request_params)
        return body

    def _post_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One HTTP attempt: the parsed JSON, or :class:`_Retryable` / :class:`CompletionError`."""
        url = f"{self.base_url}/{path}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self._headers(),
                                         method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace") if exc.fp else ""
            message = f"HTTP {exc.code} from {url}: {detail}".strip()
            if exc.code in _RETRY_STATUS:
                raise _Retryable(message) from None
            raise CompletionError(message) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"request to {url} timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"request to {url} timed out after {self.timeout:g} s") from None
            raise _Retryable(f"cannot connect to {url}: {exc.reason}", unreachable=True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            # Reset / closed mid-answer (e.g. the server was killed while working on it).
            raise _Retryable(f"connection to {url} failed: {type(exc).__name__}: {exc}",
                             unreachable=isinstance(exc, ConnectionRefusedError)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CompletionError(f"{url} answered with invalid JSON: {raw[:120]!r}") from None

    def complete(self, prompt: str | Sequence[Mapping[str, str]], *, chat: bool = False,
                 stats: ScoreStats | None = None) -> str:
        """The generated text for one prompt (a string, or chat messages when ``chat``).

        Raises :class:`CompletionError` (:class:`ServerUnreachableError` when the last attempt
        could not connect) once the retries are spent.
        """
        path = "chat/completions" if chat else "completions"
        body = self._body(prompt, chat)
        for attempt in range(self.retries + 1):
            with self._lock:
                self._in_flight += 1
                if stats is not None:
                    stats.requests += 1
                    stats.retries += attempt > 0
                    stats.max_in_flight = max(stats.max_in_flight, self._in_flight)
            try:
                data = self._post_once(path, body)
            except _Retryable as exc:
                if attempt == self.retries:
                    kind = ServerUnreachableError if exc.unreachable else CompletionError
                    raise kind(f"{exc} (after {attempt + 1} attempts)") from None
                delay = min(self.backoff * 2**attempt, _MAX_BACKOFF)
                logger.debug("%s; retrying in %.2f s", exc, delay)
            else:
                return self._text(data, chat)
            finally:
                with self._lock:
                    self._in_flight -= 1
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _text(self, data: Any, chat: bool) -> str:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise CompletionError(f"{self.base_url} answered without choices[0] text: {str(data)[:120]}") from None
        if not isinstance(text, str):
            raise CompletionError(f"{self.base_url} answered with a non-text completion: {text!r}")
        return text

    def complete_many(self, prompts: Sequence[str | Sequence[Mapping[str, str]]], *, chat: bool = False,
                      stats: ScoreStats | None = None) -> list[str | CompletionError]:
        """:meth:`complete` for every prompt, ``max_concurrency`` at a time, results in order."""

        def one(prompt):
            try:
                return self.complete(prompt, chat=chat, stats=stats)
            except CompletionError as exc:
                return exc

        if len(prompts) <= 1 or self.max_concurrency == 1:
            return [one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)),
                                thread_name_prefix="scorer-http") as pool:
            return list(pool.map(one, prompts))
