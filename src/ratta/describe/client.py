"""The chat-completions client: an OpenAI-compatible endpoint over ``httpx2``, with retries.

It knows nothing of classes or prompts: it asks for ``n`` answers to one prompt and returns
their texts. ``httpx2`` does the HTTP (pooled keep-alive connections, TLS, proxies, typed
errors, asyncio cancellation, so that Ctrl-C stops requests in flight at once); it is
installed with open_clip already, through huggingface_hub. What no HTTP client does is
here: a deadline over a whole request (per-read timeouts never trip on a server that
trickles a byte at a time), which failures are worth sending again, backoff, Retry-After,
and a reply without text counted as a failure. Failures that retrying cannot fix are one
``LLMEndpointError`` line.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import urlsplit

import httpx2

from ratta.describe.prompts import DEFAULT_LLM_URL as DEFAULT_LLM_URL
from ratta.describe.prompts import KEY_ENV
from ratta.errors import RattaInputError

# Servers sending a longer Retry-After have usually run out of quota for the day.
MAX_RETRY_AFTER_S = 300.0
MAX_BACKOFF_S = 60.0


class LLMEndpointError(RattaInputError):
    """The chat-completions endpoint cannot be used (unreachable, bad key, bad reply, gave up)."""


class _BadRequest(LLMEndpointError):
    """HTTP 400: the server refused the request body."""


class _Failed(Exception):
    """A request that may succeed when sent again; ``retry_after``: the server's wait."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


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
    """Chat-completions requests at ``base_url``/chat/completions, with retries.

    Use as ``async with ChatClient(...) as client``; its tasks share one connection pool.
    ``timeout`` bounds each request as a whole, from sending to the last byte of the reply.
    A failed request (HTTP 408, 429 or 5xx, a timeout, a lost connection, a reply whose
    content is null, empty or not a string) is sent again up to ``max_retries`` times,
    after the server's Retry-After or ``backoff * 2**k`` seconds (k = 0, 1, ...; at most
    :data:`MAX_BACKOFF_S`) times a random 0.5-1.5; ``on_retry`` gets one line per retry.
    """

    base_url: str
    model: str
    system: str
    temperature: float
    max_tokens: int
    key: str | None
    timeout: float
    max_retries: int
    backoff: float
    on_retry: Callable[[str], None]
    requests: int = 0
    retries: int = 0
    single_choice: bool = False
    host: str = field(init=False)
    url: str = field(init=False)
    _http: httpx2.AsyncClient | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.host = endpoint_host(self.base_url)
        self.url = self.base_url.rstrip("/") + "/chat/completions"

    async def __aenter__(self) -> Self:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        # No httpx2 timeouts and no pool limit: the deadline in _attempt bounds every phase
        # of a request, and the caller bounds the requests in flight.
        self._http = httpx2.AsyncClient(
            headers=headers, timeout=None, limits=httpx2.Limits(max_connections=None)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None
        await self._http.aclose()
        self._http = None

    async def sample(self, prompt: str, count: int, seed: int | None) -> list[str]:
        """``count`` answers to ``prompt``: one request asking ``n=count``, more if it gave less."""
        answers: list[str] = []
        follow_up = 0
        while len(answers) < count:
            n = 1 if self.single_choice else count - len(answers)
            # Follow-ups shift the seed: the same seed would return the same answers again.
            request_seed = None if seed is None else seed + follow_up
            try:
                got = await self.complete(prompt, n, request_seed)
            except _BadRequest:
                if n == 1:
                    raise
                # llama.cpp and some proxies refuse n > 1 with HTTP 400: ask one at a time.
                self.single_choice = True
                continue
            answers.extend(got[: count - len(answers)])
            follow_up += 1
        return answers

    async def complete(self, prompt: str, n: int, seed: int | None) -> list[str]:
        """The ``n`` answer texts of one request, sent again while it fails and may not."""
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
        attempts, attempt = self.max_retries + 1, 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                return await self._attempt(body)
            except _Failed as failure:
                if attempt == attempts:
                    raise LLMEndpointError(
                        f"{self.host}: gave up after {attempts} requests (last: "
                        f"{failure.reason}); try again later or with a lower --concurrency"
                    ) from None
                if failure.retry_after is not None:
                    wait, why = failure.retry_after, " (Retry-After)"
                else:
                    # the exponent capped: 2.0**1024 overflows, and 60 s is reached long before
                    backoff = min(MAX_BACKOFF_S, self.backoff * 2.0 ** min(attempt - 1, 32))
                    wait, why = backoff * random.uniform(0.5, 1.5), ""
                self.retries += 1
                self.on_retry(
                    f"{self.host}: {failure.reason}, attempt {attempt}/{attempts}; "
                    f"retrying in {wait:.1f} s{why}"
                )
                await asyncio.sleep(wait)

    async def _attempt(self, body: dict[str, Any]) -> list[str]:
        assert self._http is not None, "use ChatClient as an async context manager"
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._http.post(self.url, json=body)
        except TimeoutError:
            raise _Failed(f"no complete reply within {self.timeout:g} s") from None
        except httpx2.ConnectError as exc:
            raise self._unreachable(exc) from None
        except httpx2.TransportError as exc:
            raise _Failed(f"connection lost ({type(exc).__name__})") from None
        if not response.is_success:
            raise self._refused(response)
        try:
            payload = response.json()
        except ValueError:
            raise LLMEndpointError(f"{self.host}: the reply is not JSON; check --llm-url") from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            raise LLMEndpointError(
                f"{self.host}: the reply is not a chat completion (no 'choices'); "
                "check --llm-url (it should end in /v1 or similar)"
            )
        if not choices:
            raise _Failed("reply without choices")
        return [_choice_text(c) for c in choices]

    def _refused(self, response: httpx2.Response) -> Exception:
        """What an HTTP error status means: a :class:`_Failed` to retry, or the error line."""
        code, raw = response.status_code, response.text
        if code in (401, 403):
            names = " or ".join(KEY_ENV)
            state = "the key was rejected" if self.key else f"no key is set ({names})"
            return LLMEndpointError(
                f"{self.host}: HTTP {code}, {state}; set a valid API key in {names}"
            )
        # OpenAI's answer to an empty account: retrying cannot help.
        if code == 429 and "insufficient_quota" in raw:
            return LLMEndpointError(f"{self.host}: HTTP 429, the account is out of quota")
        message = _one_line_message(raw) or response.reason_phrase
        if code == 400:
            return _BadRequest(
                f"{self.host}: HTTP 400 ({message}); check --llm-model, --max-tokens and "
                "--temperature"
            )
        if code not in (408, 429) and code < 500:
            return LLMEndpointError(
                f"{self.host}: HTTP {code} from {self.url} ({message}); "
                "check --llm-url and --llm-model"
            )
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
            return LLMEndpointError(
                f"{self.host}: HTTP {code} asks to retry after {retry_after:.0f} s; "
                "the rate limit or quota is exhausted"
            )
        return _Failed(f"HTTP {code}", retry_after)

    def _unreachable(self, exc: httpx2.ConnectError) -> LLMEndpointError:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError):
                return LLMEndpointError(
                    f"cannot reach {self.host}: connection refused; is the server running? "
                    "(check --llm-url)"
                )
            if isinstance(cause, socket.gaierror):
                return LLMEndpointError(f"cannot reach {self.host}: unknown host (check --llm-url)")
            cause = cause.__cause__ or cause.__context__
        return LLMEndpointError(f"cannot reach {self.host}: {exc} (check --llm-url)")


def _choice_text(choice: Any) -> str:
    """The text of one choice; a null, empty or non-string content fails the request."""
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str) and content.strip():
        return content
    what = (
        "null"
        if content is None
        else "empty"
        if isinstance(content, str)
        else f"non-string ({type(content).__name__})"
    )
    # Reasoning models spend a small --max-tokens before writing any answer.
    cut = isinstance(choice, dict) and choice.get("finish_reason") == "length"
    raise _Failed(f"reply with {what} content" + (", cut at --max-tokens" if cut else ""))


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
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse without a zone; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
