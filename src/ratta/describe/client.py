"""The chat-completions client: an OpenAI-compatible endpoint over ``urllib``, with retries.

It knows nothing of classes or prompts: it asks for ``n`` answers to one prompt and returns
their texts. Failures that retrying cannot fix are one ``LLMEndpointError`` line.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ratta.errors import RattaInputError

DEFAULT_LLM_URL = "https://api.openai.com/v1"
KEY_ENV = ("RATTA_LLM_API_KEY", "OPENAI_API_KEY")

# Servers sending a longer Retry-After have usually run out of quota for the day.
MAX_RETRY_AFTER_S = 300.0
MAX_BACKOFF_S = 60.0


class LLMEndpointError(RattaInputError):
    """The chat-completions endpoint cannot be used (unreachable, bad key, bad reply, gave up)."""


class _BadRequest(LLMEndpointError):
    """HTTP 400: the server refused the request body."""


class Cancelled(Exception):
    """Another request failed for good; the remaining ones stop."""


def endpoint_host(url: str) -> str:
    """host[:port] of ``url``: what the manifest may show (no user info, path or query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RattaInputError(f"--llm-url {url!r} must be an http(s) URL such as {DEFAULT_LLM_URL}")
    return parts.hostname + (f":{parts.port}" if parts.port else "")


def api_key() -> str | None:
    """The API key, from the environment only, so it never lands in shell history or files."""
    for name in KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


@dataclass
class ChatClient:
    """Chat-completions requests with retries; shared by the worker threads.

    ``system`` is the system message sent before every prompt; ``stop`` cancels the
    requests in flight (set on the first failure that retrying cannot fix).
    """

    url: str
    host: str
    model: str
    system: str
    temperature: float
    max_tokens: int
    key: str | None
    timeout: float
    max_retries: int
    backoff: float
    stop: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    retries: int = 0
    single_choice: bool = False
    failure: LLMEndpointError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self, prompt: str, count: int, seed: int | None) -> list[str]:
        """``count`` answers to ``prompt``: one request asking ``n=count``, more if it gave less."""
        try:
            return self._sample(prompt, count, seed)
        except LLMEndpointError as exc:
            # Set here, not by the caller: this worker would otherwise start its next request.
            with self._lock:
                self.failure = self.failure or exc
            self.stop.set()
            raise

    def _sample(self, prompt: str, count: int, seed: int | None) -> list[str]:
        answers: list[str] = []
        follow_up = 0
        while len(answers) < count:
            n = 1 if self.single_choice else count - len(answers)
            # Follow-ups shift the seed: the same seed would return the same answers again.
            request_seed = None if seed is None else seed + follow_up
            try:
                got = self._complete(prompt, n, request_seed)
            except _BadRequest:
                if n == 1:
                    raise
                # llama.cpp and some proxies refuse n > 1 with HTTP 400: ask one at a time.
                self.single_choice = True
                continue
            answers.extend(got[: count - len(answers)])
            follow_up += 1
        return answers

    def _complete(self, prompt: str, n: int, seed: int | None) -> list[str]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system},
                {"role": "user", "content": prompt},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "n": n,
        }
        if seed is not None:
            body["seed"] = seed
        reply = self._post(json.dumps(body).encode())
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list):
            raise LLMEndpointError(
                f"{self.host}: the reply is not a chat completion (no 'choices'); "
                "check --llm-url (it should end in /v1 or similar)"
            )
        if not choices:
            raise LLMEndpointError(f"{self.host}: the reply has no choices for prompt {prompt!r}")
        return [_choice_text(c) for c in choices]

    def _post(self, data: bytes) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        attempt = 0
        while not self.stop.is_set():
            with self._lock:
                self.requests += 1
            wait: float | None = None
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                wait = self._retryable_status(exc)
                reason = f"HTTP {exc.code}"
            except urllib.error.URLError as exc:
                reason = self._retryable_network(exc.reason)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = self._retryable_network(exc)
            else:
                try:
                    return json.loads(payload)
                except ValueError:
                    raise LLMEndpointError(
                        f"{self.host}: the reply is not JSON; check --llm-url"
                    ) from None
            if attempt == self.max_retries:
                raise LLMEndpointError(
                    f"{self.host}: gave up after {attempt + 1} requests (last: {reason}); "
                    "try again later or with fewer --workers"
                )
            with self._lock:
                self.retries += 1
            if wait is None:
                wait = min(MAX_BACKOFF_S, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)
            self.stop.wait(wait)
            attempt += 1
        raise Cancelled

    def _retryable_status(self, exc: urllib.error.HTTPError) -> float | None:
        """Retry-After seconds (or None) of a retryable HTTP error; raise for the others."""
        raw = _error_body(exc)
        message = _one_line_message(raw) or str(exc.reason)
        retry_after = _retry_after(exc.headers.get("Retry-After"))
        if exc.code in (401, 403):
            names = " or ".join(KEY_ENV)
            state = "the key was rejected" if self.key else f"no key is set ({names})"
            raise LLMEndpointError(
                f"{self.host}: HTTP {exc.code}, {state}; set a valid API key in {names}"
            )
        # OpenAI's answer to an empty account: retrying cannot help.
        if exc.code == 429 and "insufficient_quota" in raw:
            raise LLMEndpointError(f"{self.host}: HTTP 429, the account is out of quota")
        if exc.code == 400:
            raise _BadRequest(
                f"{self.host}: HTTP 400 ({message}); check --llm-model, --max-tokens and "
                "--temperature"
            )
        if exc.code not in (408, 429) and exc.code < 500:
            raise LLMEndpointError(
                f"{self.host}: HTTP {exc.code} from {self.url} ({message}); "
                "check --llm-url and --llm-model"
            )
        if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
            raise LLMEndpointError(
                f"{self.host}: HTTP {exc.code} asks to retry after {retry_after:.0f} s; "
                "the rate limit or quota is exhausted"
            )
        return retry_after

    def _retryable_network(self, reason: object) -> str:
        """Name of a retryable network failure; raise for an unreachable endpoint."""
        if isinstance(reason, TimeoutError):
            return f"timed out after {self.timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            raise LLMEndpointError(
                f"cannot reach {self.host}: connection refused; is the server running? "
                "(check --llm-url)"
            )
        if isinstance(reason, socket.gaierror):
            raise LLMEndpointError(f"cannot reach {self.host}: unknown host (check --llm-url)")
        if isinstance(reason, ConnectionError | http.client.HTTPException):
            return f"connection lost ({type(reason).__name__})"
        raise LLMEndpointError(f"cannot reach {self.host}: {reason} (check --llm-url)")


def _choice_text(choice: Any) -> str:
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        exc.close()


def _one_line_message(raw: str) -> str:
    """The message of an error body (``{"error": {"message": ...}}`` or text), on one line."""
    try:
        error = json.loads(raw)
    except ValueError:
        error = raw
    if isinstance(error, dict):
        error = error.get("error", error)
    if isinstance(error, dict):
        error = error.get("message") or json.dumps(error)
    return " ".join(str(error).split())[:200]


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse without a zone; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
