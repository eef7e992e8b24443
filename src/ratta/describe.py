"""Class descriptions for any label set: ``ratta describe`` (class names -> CuPL JSON).

Each class is asked a few question prompts (chosen by the kind of label set) through an
OpenAI-compatible chat-completions endpoint, ``per_prompt`` sampled answers per prompt. The
answers are cleaned (:func:`clean_answers`) and written as a CuPL JSON, ``{class name: [sentence,
...]}`` in input order, with a manifest at ``<out>.manifest.json``. Finished classes are
appended to ``<out>.partial.jsonl`` so that an interrupted run resumes where it stopped.

Without an LLM (``templates``), every class gets hand templates filled with its name.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from ratta import __version__
from ratta.atomic import atomic_path, check_output_path, write_json
from ratta.errors import RattaInputError

DEFAULT_LLM_URL = "https://api.openai.com/v1"
KEY_ENV = ("RATTA_LLM_API_KEY", "OPENAI_API_KEY")
KINDS = ("objects", "textures", "scenes", "actions", "satellite", "fine-grained")

# Question prompts per kind of label set; ``{}`` is the class name.
QUESTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "objects": (
        "What does a {} look like?",
        "How would you recognise a {} in a photo?",
        "Which visual features set a {} apart from other things?",
        "Describe the shape, colours and parts of a {}.",
        "Describe what you see in a typical photo of a {}.",
    ),
    "textures": (
        "What does a {} texture look like?",
        "How would you recognise a {} surface pattern in a photo?",
        "Describe the lines, colours and repetitions of a {} pattern.",
        "Which visual features make a texture look {}?",
        "Describe a close-up photo of a surface with a {} texture.",
    ),
    "scenes": (
        "What does a {} look like?",
        "Which objects and surroundings would a photo of a {} show?",
        "How can you tell that a photo was taken in a {}?",
        "Describe the layout, lighting and colours of a typical {}.",
        "Describe what you see in a photo of a {}.",
    ),
    "actions": (
        "What does a person doing {} look like?",
        "How would you recognise someone doing {} in a video frame?",
        "Describe the body posture and movements of a person doing {}.",
        "Which objects and places are usually seen when someone is doing {}?",
        "Describe a photo of a person doing {}.",
    ),
    "satellite": (
        "What does {} look like in a satellite image?",
        "How would you identify {} in an aerial photo?",
        "Describe the shapes, colours and layout of {} seen from above.",
        "What usually surrounds {} in a satellite image?",
        "Describe an aerial photo of {}.",
    ),
    "fine-grained": (
        "What does a {} look like?",
        "How can you tell a {} apart from similar ones?",
        "Which distinctive visual features does a {} have?",
        "Describe the colours, markings and shape of a {}.",
        "Describe what you see in a close-up photo of a {}.",
    ),
}

# Hand templates of --templates-only when no dataset preset supplies its own.
GENERIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "objects": ("a photo of a {}.", "a close-up photo of a {}.", "a picture showing a {}."),
    "textures": (
        "a photo of a {} texture.",
        "a close-up photo of a {} pattern.",
        "a surface with a {} texture.",
    ),
    "scenes": ("a photo of a {}.", "a photo taken in a {}.", "a wide view of a {}."),
    "actions": (
        "a photo of a person doing {}.",
        "a video frame of someone doing {}.",
        "a person doing {}.",
    ),
    "satellite": ("a satellite photo of {}.", "an aerial view of {}.", "{} seen from above."),
    "fine-grained": (
        "a photo of a {}.",
        "a close-up photo of a {}.",
        "a detailed photo of a {}.",
    ),
}

# Chat models otherwise open with a preamble or a list; CLIP wants short visual sentences.
SYSTEM_PROMPT = (
    "You describe how things look. Answer in one or two short sentences about visual "
    "appearance, without a preamble and without a list."
)

TEMPLATES_ONLY_NOTE = (
    "descriptions are hand templates filled with the class names, not LLM answers; "
    "expect lower accuracy than with LLM descriptions"
)

# Servers sending a longer Retry-After have usually run out of quota for the day.
MAX_RETRY_AFTER_S = 300.0
MAX_BACKOFF_S = 60.0
MIN_WORDS = 3


class LLMEndpointError(RattaInputError):
    """The chat-completions endpoint cannot be used (unreachable, bad key, bad reply, gave up)."""


class _BadRequest(LLMEndpointError):
    """HTTP 400: the server refused the request body."""


class _Cancelled(Exception):
    """Another request failed for good; the remaining ones stop."""


# --------------------------------------------------------------------------- cleaning

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)_+|_+(?!\w)")
_QUOTES = " \t\"'“”‘’«»"


def clean_answer(text: str) -> str | None:
    """One LLM answer as one plain sentence ending in ``. ! ?``, or None if unusable.

    Removes markdown (headings, ``**``/``*``/``_`` emphasis, backticks), list markers and
    numbering, surrounding quotes; collapses whitespace; rejects answers of fewer than 3 words.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    body = [line for line in lines if not _HEADING.match(line)]
    # A heading is a title, not a description: keep its words only when nothing else is there.
    lines = body or [_HEADING.sub("", line) for line in lines]
    lines = [_LIST_MARKER.sub("", line) for line in lines]
    s = " ".join(lines).replace("`", "").replace("*", "")
    s = _UNDERSCORE_EMPHASIS.sub("", s)
    s = " ".join(s.split()).strip(_QUOTES)
    if len(s.split()) < MIN_WORDS:
        return None
    if s[-1] not in ".!?":
        s = s.rstrip(",;:-–— ") + "."
    return s


def clean_answers(answers: Iterable[str]) -> list[str]:
    """Cleaned answers without unusable ones and case-insensitive duplicates, in order."""
    seen: set[str] = set()
    out = []
    for answer in answers:
        s = clean_answer(answer)
        if s is not None and s.casefold() not in seen:
            seen.add(s.casefold())
            out.append(s)
    return out


# --------------------------------------------------------------------------- inputs


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names of a text file, one per line; blank lines and outer whitespace ignored."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RattaInputError(f"{p}: class names file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RattaInputError(f"{p}: cannot read class names ({exc})") from None
    first: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in first:
            raise RattaInputError(
                f"{p}: line {number} repeats class '{name}' (first on line {first[name]}); "
                "class names must be unique"
            )
        first[name] = number
    if not first:
        raise RattaInputError(f"{p}: no class names (expected one name per line)")
    return list(first)


def _check_template(template: str, what: str) -> None:
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "\0" not in filled:
        raise RattaInputError(f"{what} {template!r} must contain '{{}}' for the class name")


def _check_names(names: Sequence[str]) -> list[str]:
    out = list(names)
    if not out:
        raise RattaInputError("no class names to describe")
    seen: set[str] = set()
    for name in out:
        if not isinstance(name, str) or not name.strip():
            raise RattaInputError(f"class name {name!r} must be a non-empty string")
        if name in seen:
            raise RattaInputError(f"class '{name}' is listed twice; class names must be unique")
        seen.add(name)
    return out


def _endpoint_host(url: str) -> str:
    """host[:port] of ``url``: what the manifest may show (no user info, path or query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RattaInputError(f"--llm-url {url!r} must be an http(s) URL such as {DEFAULT_LLM_URL}")
    return parts.hostname + (f":{parts.port}" if parts.port else "")


def _api_key() -> str | None:
    """The API key, from the environment only, so it never lands in shell history or files."""
    for name in KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


# --------------------------------------------------------------------------- HTTP client


@dataclass
class _ChatClient:
    """Chat-completions requests with retries; shared by the worker threads."""

    url: str
    host: str
    model: str
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
                {"role": "system", "content": SYSTEM_PROMPT},
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
        raise _Cancelled

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


# --------------------------------------------------------------------------- resume state


class _PartialFile:
    """``<out>.partial.jsonl``: a settings header line, then one line per finished class."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = json.loads(json.dumps(settings))

    def load(self) -> dict[str, list[str]]:
        """Answers of the classes finished by an earlier run; rewrites the file cleanly."""
        done: dict[str, list[str]] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            header = _json_object(lines[0]) if lines else None
            # The header is written atomically, so without one the file holds nothing to reuse.
            if header is not None:
                self._check_settings(header.get("settings"))
                for line in lines[1:]:
                    record = _json_object(line)
                    # A kill during a write leaves a cut last line: that class is asked again.
                    if record is not None and _is_class_record(record):
                        done[record["class"]] = record["answers"]
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"settings": self.settings}) + "\n")
            for name, answers in done.items():
                fh.write(json.dumps({"class": name, "answers": answers}) + "\n")
        return done

    def _check_settings(self, old: Any) -> None:
        if old == self.settings:
            return
        old = old if isinstance(old, dict) else {}
        keys = sorted(
            k for k in self.settings.keys() | old.keys() if old.get(k) != self.settings.get(k)
        )
        raise RattaInputError(
            f"{self.path}: an earlier run used other settings ({', '.join(keys)}); "
            "rerun with the same settings to resume, or delete the file to start over"
        )

    def append(self, name: str, answers: list[str]) -> None:
        # One line per class, on disk before the class counts as done.
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"class": name, "answers": answers}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_class_record(record: dict[str, Any]) -> bool:
    answers = record.get("answers")
    return (
        isinstance(record.get("class"), str)
        and isinstance(answers, list)
        and all(isinstance(a, str) for a in answers)
    )


# --------------------------------------------------------------------------- the stage


def describe(
    class_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    kind: str = "objects",
    llm_url: str = DEFAULT_LLM_URL,
    llm_model: str | None = None,
    per_prompt: int = 20,
    temperature: float = 0.99,
    max_tokens: int = 55,
    seed: int | None = None,
    workers: int = 8,
    templates: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    timeout: float = 60.0,
    max_retries: int = 8,
    backoff: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the CuPL JSON ``out`` of ``class_names`` and its manifest; return the manifest.

    With ``templates`` no LLM is asked: each class gets the templates filled with its name.
    Otherwise each class is asked ``prompts`` (default: :data:`QUESTION_PROMPTS` of ``kind``)
    at ``llm_url``/chat/completions, ``per_prompt`` answers each, with ``workers`` requests
    in flight. Failed requests (HTTP 429/408/5xx, timeouts, lost connections) are retried up
    to ``max_retries`` times after ``backoff * 2**attempt`` seconds (times a random 0.5-1.5)
    or the server's Retry-After. The API key is read from ``RATTA_LLM_API_KEY`` or
    ``OPENAI_API_KEY``.
    """
    names = _check_names(class_names)
    out_path = check_output_path(out)
    if kind not in KINDS:
        raise RattaInputError(f"--kind '{kind}' is unknown (known: {', '.join(KINDS)})")
    if templates is not None:
        return _describe_templates(names, out_path, kind, list(templates))
    if not llm_model:
        raise RattaInputError("--llm-model is required (or use --templates-only)")
    for name, value, low in (
        ("--per-prompt", per_prompt, 1),
        ("--max-tokens", max_tokens, 1),
        ("--workers", workers, 1),
    ):
        if value < low:
            raise RattaInputError(f"{name} must be at least {low}, got {value}")
    if temperature < 0:
        raise RattaInputError(f"--temperature must be >= 0, got {temperature}")
    if timeout <= 0:
        raise RattaInputError(f"--timeout must be positive, got {timeout}")
    questions = list(prompts if prompts is not None else QUESTION_PROMPTS[kind])
    if not questions:
        raise RattaInputError("no question prompts given")
    for q in questions:
        _check_template(q, "prompt")
    host = _endpoint_host(llm_url)
    client = _ChatClient(
        url=llm_url.rstrip("/") + "/chat/completions",
        host=host,
        model=llm_model,
        temperature=temperature,
        max_tokens=max_tokens,
        key=_api_key(),
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
    )
    sampling = {
        "per_prompt": per_prompt,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    settings = {
        "model": llm_model,
        "endpoint_host": host,
        "system_prompt": SYSTEM_PROMPT,
        "prompts": questions,
        **sampling,
    }
    state = _PartialFile(Path(f"{out_path}.partial.jsonl"), settings)
    done = state.load()
    resumed = sum(name in done for name in names)
    todo = [name for name in names if name not in done]
    try:
        with tqdm(
            total=len(names), initial=resumed, unit="class", desc="describe", disable=not progress
        ) as bar:
            _ask(client, todo, questions, per_prompt, seed, workers, done, state, bar)
    except BaseException:
        if not done:  # nothing to resume from: leave no state file behind
            state.path.unlink(missing_ok=True)
        raise
    empty = [name for name in names if not done[name]]
    if empty:
        warnings.warn(
            f"{len(empty)} classes got no usable answer (e.g. '{empty[0]}'); "
            "the text stage needs at least one; rerun with a larger --max-tokens",
            stacklevel=2,
        )
    manifest = {
        "mode": "llm",
        "model": llm_model,
        "endpoint_host": host,
        "kind": kind,
        "system_prompt": SYSTEM_PROMPT,
        "prompts": questions,
        "sampling": sampling,
        "requests": client.requests,
        "retries": client.retries,
        "resumed_classes": resumed,
    }
    result = _write_outputs(out_path, {name: done[name] for name in names}, manifest)
    state.path.unlink(missing_ok=True)
    return result


def _ask(
    client: _ChatClient,
    todo: list[str],
    questions: list[str],
    per_prompt: int,
    seed: int | None,
    workers: int,
    done: dict[str, list[str]],
    state: _PartialFile,
    bar: tqdm,
) -> None:
    """Ask every (class, prompt) of ``todo``; record each class once all its prompts are in."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {
            pool.submit(client.sample, q.format(name), per_prompt, seed): (name, j)
            for name in todo
            for j, q in enumerate(questions)
        }
        raw: dict[str, list[list[str]]] = {name: [[] for _ in questions] for name in todo}
        left = dict.fromkeys(todo, len(questions))
        for future in as_completed(futures):
            name, j = futures[future]
            try:
                raw[name][j] = future.result()
            except _Cancelled:
                # It stopped because another request failed first (recorded before the stop).
                assert client.failure is not None
                raise client.failure from None
            left[name] -= 1
            if not left[name]:
                done[name] = clean_answers(a for answers in raw.pop(name) for a in answers)
                state.append(name, done[name])
                bar.update()
    except BaseException:
        client.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _describe_templates(
    names: list[str], out: Path, kind: str, templates: list[str]
) -> dict[str, Any]:
    if not templates:
        raise RattaInputError("no templates given for --templates-only")
    for t in templates:
        _check_template(t, "template")
    cupl = {name: [t.format(name) for t in templates] for name in names}
    manifest = {
        "mode": "templates-only",
        "kind": kind,
        "templates": templates,
        "note": TEMPLATES_ONLY_NOTE,
    }
    return _write_outputs(out, cupl, manifest)


def _write_outputs(
    out: Path, cupl: dict[str, list[str]], manifest: dict[str, Any]
) -> dict[str, Any]:
    """The CuPL JSON, then its manifest (which carries the JSON's sha256)."""
    write_json(out, cupl)
    manifest = {
        "produced_by": f"ratta describe {__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **manifest,
        "classes": len(cupl),
        "descriptions": sum(len(v) for v in cupl.values()),
        "counts": {name: len(v) for name, v in cupl.items()},
        "output": {"file": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()},
    }
    write_json(f"{out}.manifest.json", manifest)
    return manifest
