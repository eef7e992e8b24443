"""`ratta describe` against a local chat-completions server: answers, retries, resume, errors,
and hostile use: a trickling or stalled server, Ctrl-C, kill -9, a second process, outputs
over inputs, settings out of range."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import make_coop_dtd

from ratta.cli import main
from ratta.describe import (
    GENERIC_TEMPLATES,
    KINDS,
    QUESTION_PROMPTS,
    LLMEndpointError,
    clean_answer,
    clean_answers,
    describe,
    read_class_names,
)
from ratta.describe.client import ChatClient
from ratta.describe.state import PartialFile
from ratta.errors import RattaInputError
from ratta.guard import lock_path
from ratta.presets import PRESETS, get_preset

KEY = "sk-test-0123456789"
CLASSES = [f"class-{i:02d}" for i in range(30)]
TWO_PROMPTS = ("What does a {} look like?", "How would you spot a {}?")
RATTA = str(Path(sys.executable).with_name("ratta"))


@dataclass
class Logged:
    """One request as the server saw it."""

    t: float
    cls: str
    prompt: str
    n: int
    seed: int | None
    auth: str | None
    outcome: str


@dataclass
class FakeLLM:
    """Chat-completions server whose answers name the class the prompt asked about.

    Given a seed, the answers are a function of (prompt, seed, choice): a rerun gets the
    same text, as from a real server. ``faults`` queues, per class, what the next requests
    get instead of an answer: an HTTP status, a ``sleep``, a reply whose ``content`` is
    given, or a ``trickle`` of the headers or the body, one byte every 0.2 s.
    """

    classes: list[str]
    key: str | None = KEY
    models: tuple[str, ...] = ("fake-model", "m")
    max_n: int | None = None  # fewer choices than asked for, like llama.cpp or Ollama
    reject_n: bool = False  # HTTP 400 when n > 1
    faults: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    hook: Callable[[int], None] | None = None  # called with the number of each request
    log: list[Logged] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def reply(self, path: str, auth: str | None, body: dict[str, Any]) -> tuple[int, dict, Any]:
        prompt = body["messages"][-1]["content"]
        cls = next(c for c in self.classes if c in prompt)
        n, seed = body["n"], body.get("seed")
        with self._lock:
            queue = self.faults.get(cls)
            fault, arg = queue.pop(0) if queue else ("", None)
            number = next(self._ids)
        outcome, message = "ok", ""
        if path != "/v1/chat/completions":
            outcome, message = "404", "no such route"
        elif body["model"] not in self.models:
            outcome, message = "404", f"The model `{body['model']}` does not exist."
        elif (self.key and auth != f"Bearer {self.key}") or fault == "401":
            outcome = "401"
        elif fault:
            outcome = fault
        elif self.reject_n and n > 1:
            outcome = "400"
        with self._lock:
            self.log.append(Logged(time.monotonic(), cls, prompt, n, seed, auth, outcome))
        if self.hook is not None:
            self.hook(number)
        if outcome == "429":
            return 429, {"Retry-After": arg} if arg else {}, {"error": {"message": "slow down"}}
        if outcome.isdigit():
            return int(outcome), {}, {"error": {"message": message or f"refused ({outcome})"}}
        if outcome == "trickle":
            return 200, {"trickle": arg}, {}
        if outcome == "sleep":  # longer than the client's timeout
            self.release.wait(float(arg or 0))
        if cls in self.delay:
            self.release.wait(self.delay[cls])
        # Without a seed, sampled: each request differs, like a real server's.
        tag = hashlib.sha256(f"{prompt}|{number if seed is None else seed}".encode())
        tag = tag.hexdigest()[:8]
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": f"{i + 1}. **{cls}** answer {tag}-{i}:\n a `distinctive` shape",
                },
                "finish_reason": "stop",
            }
            for i in range(min(n, self.max_n or n))
        ]
        if outcome == "content":  # the content (and finish reason) of every choice
            for choice in choices:
                choice["message"]["content"], choice["finish_reason"] = arg
        return 200, {}, {"id": f"c{number}", "object": "chat.completion", "choices": choices}

    def reset(self) -> None:
        """Forget the requests seen: the next is number 1."""
        with self._lock:
            self.log.clear()
            self._ids = itertools.count(1)

    def asked(self, outcome: str | None = None, since: float = 0.0) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.t >= since and outcome in (None, r.outcome)]

    def wait_for(self, outcome: str | None = None, count: int = 1) -> None:
        deadline = time.monotonic() + 30
        while len(self.asked(outcome)) < count:
            assert time.monotonic() < deadline, f"the server saw no {outcome or 'request'}"
            time.sleep(0.01)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the client reuses connections
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK
    server: Any

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, headers, payload = self.server.llm.reply(
            self.path, self.headers.get("Authorization"), body
        )
        trickle = headers.pop("trickle", None)
        data = json.dumps(payload).encode()
        try:
            if trickle is None:
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.close_connection = True
            # Valid bytes without end, each well within any per-read timeout: a header line
            # that never ends, or a body far shorter than its Content-Length.
            if trickle == "headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
            while not self.server.llm.release.wait(0.2):
                self.wfile.write(b"a" if trickle == "headers" else b" ")
        except OSError:  # the client timed out and hung up
            pass

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections of 8 workers: a 1 s SYN retry, a timeout.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed or interrupted mid-request resets its connection: expected here."""


@pytest.fixture()
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(list(CLASSES))
    server = _Server(("127.0.0.1", 0), _Handler)
    server.llm = fake  # type: ignore[attr-defined]
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture()
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("RATTA_LLM_API_KEY", KEY)
    return KEY


def write_classes(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


def fast(llm: FakeLLM, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of a quick describe() against the fake server."""
    return {
        "llm_url": llm.url,
        "llm_model": "fake-model",
        "per_prompt": 3,
        "backoff": 0.001,
        "timeout": 5.0,
        "progress": False,
        **kwargs,
    }


def cli_args(llm: FakeLLM, classes: Path, out: Path, *extra: str) -> list[str]:
    """``ratta describe`` arguments against the fake server."""
    return [
        "describe",
        "--classes",
        str(classes),
        "--out",
        str(out),
        "--llm-url",
        llm.url,
        "--llm-model",
        "m",
        "--per-prompt",
        "2",
        "--quiet",
        *extra,
    ]


@contextlib.contextmanager
def running(*cmd: str) -> Iterator[subprocess.Popen[str]]:
    """``cmd`` as a separate process (with this process's environment: the key), killed
    on the way out if still there."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(cmd, env=os.environ.copy(), text=True, **pipes)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def interrupt(proc: subprocess.Popen[str]) -> tuple[float, str]:
    """Ctrl-C to ``proc``: the seconds it took to exit, and its stderr."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    return time.monotonic() - sent, err


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "1. **Bald eagle**: a large bird of prey with a white head and a hooked yellow beak",
            "Bald eagle: a large bird of prey with a white head and a hooked yellow beak.",
        ),
        (
            '"A tabby cat has a striped coat and an M-shaped marking on its forehead."',
            "A tabby cat has a striped coat and an M-shaped marking on its forehead.",
        ),
        (
            "- A golden retriever has a *dense*, water-repellent `golden` coat",
            "A golden retriever has a dense, water-repellent golden coat.",
        ),
        (
            "### Appearance\nA fire truck is a large red vehicle\n  with ladders and hoses.",
            "A fire truck is a large red vehicle with ladders and hoses.",
        ),
        ("• Sunflowers have bright yellow petals,", "Sunflowers have bright yellow petals."),
        (
            "2) The pier is a _long_ wooden walkway over water!",
            "The pier is a long wooden walkway over water!",
        ),
        ("“Is the bark of a birch white?”", "Is the bark of a birch white?"),
        (
            "* A marimba has wooden bars\n* and resonator tubes",
            "A marimba has wooden bars and resonator tubes.",
        ),
        ("The tower is 1.5 km tall", "The tower is 1.5 km tall."),
        ("## A photo of a red fox", "A photo of a red fox."),
    ],
)
def test_clean_answer_strips_markdown_lists_and_quotes(raw: str, clean: str) -> None:
    assert clean_answer(raw) == clean


@pytest.mark.parametrize("raw", ["", "   \n  ", "Yes.", "**Red fox**", '"Sure!"', "1. -", "`x y`"])
def test_clean_answer_rejects_empty_and_short_answers(raw: str) -> None:
    assert clean_answer(raw) is None


def test_clean_answers_drops_duplicates_ignoring_case_and_keeps_order() -> None:
    raw = [
        "A zebra has black and white stripes.",
        "OK.",
        "- a zebra has black and white stripes",
        "Zebras have a short, upright mane.",
        "**A ZEBRA HAS BLACK AND WHITE STRIPES.**",
    ]
    assert clean_answers(raw) == [
        "A zebra has black and white stripes.",
        "Zebras have a short, upright mane.",
    ]


def test_every_kind_has_question_prompts_and_templates_naming_the_class() -> None:
    assert {p.kind for p in PRESETS.values()} <= set(KINDS)
    for kind in KINDS:
        for text in (*QUESTION_PROMPTS[kind], *GENERIC_TEMPLATES[kind]):
            assert "wombat" in text.format("wombat"), (kind, text)
        assert len(QUESTION_PROMPTS[kind]) >= 3
        assert len(set(QUESTION_PROMPTS[kind])) == len(QUESTION_PROMPTS[kind])


# --------------------------------------------------------------------------- inputs


def test_class_file_ignores_blank_lines_and_rejects_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "classes.txt"
    f.write_text("  red fox \n\ngolden retriever\n\t\n")
    assert read_class_names(f) == ["red fox", "golden retriever"]
    f.write_text("red fox\ncat\n red fox\n")
    with pytest.raises(
        RattaInputError, match=r"line 3 repeats class 'red fox' \(first on line 1\)"
    ):
        read_class_names(f)


def test_dataset_without_classes_or_data_root_asks_for_one(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.json"
    argv = ["describe", "--dataset", "dtd", "--out", str(out)]
    assert main([*argv, "--llm-model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratta: error: ") and "--classes" in err and "--data-root" in err
    assert err.count("\n") == 1 and not out.exists()


def test_dataset_class_names_come_from_the_data_root(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.json"
    argv = ["describe", "--dataset", "dtd", "--data-root", str(tmp_path), "--out", str(out)]
    assert main([*argv, "--templates-only"]) == 2  # no dtd folder there: one line naming it
    err = capsys.readouterr().err
    assert "split_zhou_DescribableTextures.json" in err and err.count("\n") == 1


def test_llm_model_is_required_without_templates_only(tmp_path: Path, capsys) -> None:
    classes = write_classes(tmp_path / "c.txt", ["red fox"])
    assert main(["describe", "--classes", str(classes), "--out", str(tmp_path / "d.json")]) == 2
    assert "--llm-model is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- LLM mode


def test_the_client_alone_returns_the_answers_of_one_request(llm: FakeLLM) -> None:
    lines: list[str] = []
    client = ChatClient(
        base_url=llm.url,
        model="fake-model",
        system="Describe.",
        temperature=0.5,
        max_tokens=20,
        key=KEY,
        timeout=5.0,
        max_retries=0,
        backoff=0.001,
        on_retry=lines.append,
    )

    async def ask() -> list[str]:
        async with client:
            return await client.sample("What does a class-03 look like?", 3, seed=7)

    answers = asyncio.run(ask())
    assert len(answers) == 3 and all(
        a.startswith(f"{i + 1}. **class-03**") for i, a in enumerate(answers)
    )
    assert [(r.n, r.seed, r.outcome) for r in llm.asked()] == [(3, 7, "ok")]
    assert (client.requests, client.retries, lines) == (1, 0, [])


def test_the_state_file_alone_keeps_whole_lines_of_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "d.json.partial.jsonl"
    assert PartialFile(path, {"temperature": 0.9}).load() == {}
    PartialFile(path, {"temperature": 0.9}).append("class-00", ["A round shape."])
    with path.open("a") as fh:  # a kill in the middle of a write
        fh.write('{"class": "class-01", "answ')
    assert PartialFile(path, {"temperature": 0.9}).load() == {"class-00": ["A round shape."]}
    assert path.read_text().count("\n") == 2  # the cut line is gone
    with pytest.raises(RattaInputError, match=r"other settings \(temperature\)"):
        PartialFile(path, {"temperature": 0.5}).load()


def test_thirty_classes_survive_429s_and_timeouts(llm: FakeLLM, api_key, tmp_path) -> None:
    llm.faults = {
        "class-03": [("429", None), ("429", None)],
        "class-07": [("429", "0")],
        "class-11": [("sleep", "6")],
        "class-29": [("429", None), ("sleep", "6")],
    }
    out = tmp_path / "cupl.json"
    run = describe(CLASSES, out, **fast(llm, timeout=2.0, seed=5))

    cupl = json.loads(out.read_text())
    assert list(cupl) == CLASSES
    prompts = QUESTION_PROMPTS["objects"]
    for name, answers in cupl.items():
        assert len(answers) == 3 * len(prompts)
        assert all(a.startswith(f"{name} answer ") and a.endswith("shape.") for a in answers)
        assert not any("*" in a or "`" in a or "\n" in a for a in answers)
    assert len(llm.asked("429")) == 4 and len(llm.asked("sleep")) == 2
    # Every (class, prompt) was answered exactly once: nothing lost, nothing asked twice.
    ok = sorted((r.cls, r.prompt) for r in llm.asked("ok"))
    assert ok == sorted((c, p.format(c)) for c in CLASSES for p in prompts)
    assert run.retries == 6 and run.requests == len(llm.asked()) and run.resumed_classes == 0

    on_disk = json.loads(Path(f"{out}.manifest.json").read_text())
    assert on_disk == run.manifest
    assert on_disk["mode"] == "llm" and on_disk["model"] == "fake-model"
    assert on_disk["endpoint_host"] == llm.url.split("/")[2]
    assert on_disk["prompts"] == list(prompts)
    assert on_disk["sampling"] == {
        "per_prompt": 3,
        "temperature": 0.99,
        "max_tokens": 55,
        "seed": 5,
    }
    assert on_disk["counts"] == dict.fromkeys(CLASSES, 15)
    assert on_disk["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # nothing of this run in the files: a resumed run writes the same bytes
    assert not {"date", "requests", "retries", "resumed_classes"} & on_disk.keys()
    assert not Path(f"{out}.partial.jsonl").exists()


def test_each_retry_is_one_line_and_retry_after_is_honoured(
    llm: FakeLLM, api_key, tmp_path, capsys
) -> None:
    llm.faults = {"class-00": [("429", "0.4")], "class-01": [("503", None), ("500", None)]}
    describe(CLASSES[:2], tmp_path / "d.json", **fast(llm, prompts=TWO_PROMPTS[:1]))
    first, second = [r for r in llm.asked() if r.cls == "class-00"]
    assert (first.outcome, second.outcome) == ("429", "ok")
    assert second.t - first.t >= 0.4
    host = llm.url.split("/")[2]
    assert sorted(capsys.readouterr().err.splitlines()) == [
        f"ratta: {host}: HTTP 429, attempt 1/9; retrying in 0.4 s (Retry-After)",
        f"ratta: {host}: HTTP 500, attempt 2/9; retrying in 0.0 s",
        f"ratta: {host}: HTTP 503, attempt 1/9; retrying in 0.0 s",
    ]


def test_retries_stop_after_max_retries(llm: FakeLLM, api_key, tmp_path) -> None:
    llm.faults = {"class-00": [("429", None)] * 10}
    with pytest.raises(LLMEndpointError, match=r"gave up after 4 requests \(last: HTTP 429\)"):
        describe(
            ["class-00"],
            tmp_path / "d.json",
            **fast(llm, prompts=TWO_PROMPTS[:1], max_retries=3),
        )
    assert len(llm.asked()) == 4
    assert not (tmp_path / "d.json").exists()


def test_fewer_choices_than_asked_are_topped_up(llm: FakeLLM, api_key, tmp_path) -> None:
    llm.max_n = 2
    out = tmp_path / "d.json"
    describe(CLASSES[:2], out, **fast(llm, per_prompt=5, seed=7, prompts=TWO_PROMPTS))
    assert all(len(v) == 10 for v in json.loads(out.read_text()).values())
    for c, p in itertools.product(CLASSES[:2], TWO_PROMPTS):
        asked = [(r.n, r.seed) for r in llm.asked() if r.prompt == p.format(c)]
        assert asked == [(5, 7), (3, 8), (1, 9)]


def test_server_refusing_n_is_asked_one_answer_at_a_time(llm: FakeLLM, api_key, tmp_path) -> None:
    llm.reject_n = True
    out = tmp_path / "d.json"
    describe(CLASSES[:3], out, **fast(llm, prompts=TWO_PROMPTS, concurrency=1))
    assert all(len(v) == 6 for v in json.loads(out.read_text()).values())
    assert [r.n for r in llm.asked("400")] == [3]
    assert {r.n for r in llm.asked("ok")} == {1}


def test_key_comes_from_the_environment_and_stays_out_of_files(
    llm: FakeLLM, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("RATTA_LLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "d.json"
    describe(["class-00"], out, **fast(llm, prompts=TWO_PROMPTS))
    assert {r.auth for r in llm.asked()} == {f"Bearer {KEY}"}
    manifest = Path(f"{out}.manifest.json").read_text()
    assert KEY not in manifest and KEY not in out.read_text()
    assert "/v1" not in json.loads(manifest)["endpoint_host"]

    monkeypatch.setenv("RATTA_LLM_API_KEY", "sk-preferred")
    llm.key = "sk-preferred"
    describe(["class-01"], out, **fast(llm, prompts=TWO_PROMPTS))
    assert {r.auth for r in llm.asked() if r.cls == "class-01"} == {"Bearer sk-preferred"}


def test_bad_key_is_one_line_error_without_retries(
    llm: FakeLLM, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("RATTA_LLM_API_KEY", "sk-wrong")
    classes = write_classes(tmp_path / "c.txt", CLASSES[:4])
    out = tmp_path / "d.json"
    assert main(cli_args(llm, classes, out, "--concurrency", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratta: error: ") and err.count("\n") == 1
    assert "HTTP 401" in err and "RATTA_LLM_API_KEY" in err and "sk-wrong" not in err
    assert len(llm.asked()) == 1
    assert files_in(tmp_path) == ["c.txt"]


def test_unreachable_endpoint_is_one_line_error(tmp_path, api_key, capsys) -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    classes = write_classes(tmp_path / "c.txt", CLASSES[:3])
    argv = ["describe", "--classes", str(classes), "--out", str(tmp_path / "d.json")]
    start = time.monotonic()
    rc = main([*argv, "--llm-url", f"http://127.0.0.1:{port}/v1", "--llm-model", "m", "--quiet"])
    assert rc == 2 and time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err == f"ratta: error: cannot reach 127.0.0.1:{port}: connection refused; " + (
        "is the server running? (check --llm-url)\n"
    )


@pytest.mark.parametrize(
    ("url_tail", "model", "message"),
    [("", "fake-model", "no such route"), ("/v1", "gpt-nine", "The model `gpt-nine` does not")],
)
def test_wrong_url_path_or_model_is_one_line_error(
    llm: FakeLLM, api_key, tmp_path, url_tail, model, message
) -> None:
    url = llm.url.removesuffix("/v1") + url_tail
    with pytest.raises(LLMEndpointError, match=r"HTTP 404 from \S+/chat/completions") as info:
        describe(["class-00"], tmp_path / "d.json", **fast(llm, llm_url=url, llm_model=model))
    assert message in str(info.value) and "check --llm-url and --llm-model" in str(info.value)
    prompts = [r.prompt for r in llm.asked("404")]  # those already in flight, none retried
    assert prompts and len(prompts) == len(set(prompts)) == len(llm.asked())


# --------------------------------------------------------------------------- a bad endpoint


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_server_is_cut_at_the_timeout(
    llm: FakeLLM, api_key, tmp_path, capsys, part
) -> None:
    # A byte every 0.2 s: no read ever waits 0.5 s, yet the reply never completes.
    llm.faults = {"class-00": [("trickle", part)] * 2}
    start = time.monotonic()
    with pytest.raises(
        LLMEndpointError,
        match=r"gave up after 2 requests \(last: no complete reply within 0\.5 s\)",
    ):
        kwargs = fast(llm, prompts=TWO_PROMPTS[:1], timeout=0.5, max_retries=1)
        describe(["class-00"], tmp_path / "d.json", **kwargs)
    assert time.monotonic() - start < 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("no complete reply within 0.5 s, attempt 1/2; retrying in 0.0 s")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "finish", "what"),
    [
        (None, "stop", "null content"),
        ("", "stop", "empty content"),
        (" \n ", "stop", "empty content"),
        ("", "length", "empty content, cut at --max-tokens"),
        (42, "stop", "non-string (int) content"),
        ([{"type": "text", "text": "A fox."}], "stop", "non-string (list) content"),
    ],
)
def test_replies_without_text_are_failed_requests(
    llm: FakeLLM, api_key, tmp_path, capsys, content, finish, what
) -> None:
    bad = ("content", (content, finish))
    llm.faults = {"class-00": [bad], "class-01": [bad, bad]}
    out = tmp_path / "d.json"
    run = describe(["class-00"], out, **fast(llm, prompts=TWO_PROMPTS[:1], max_retries=1))
    assert run.retries == 1 and len(json.loads(out.read_text())["class-00"]) == 3
    assert f"reply with {what}, attempt 1/2; retrying in" in capsys.readouterr().err

    before = out.read_bytes()
    last = rf"gave up after 2 requests \(last: reply with {re.escape(what)}\)"
    with pytest.raises(LLMEndpointError, match=last):
        describe(["class-01"], out, **fast(llm, prompts=TWO_PROMPTS[:1], max_retries=1))
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--timeout", "nan", "--timeout must be a finite number > 0, got nan"),
        ("--timeout", "inf", "--timeout must be a finite number > 0, got inf"),
        ("--timeout", "0", "--timeout must be a finite number > 0, got 0.0"),
        ("--timeout", "-1", "--timeout must be a finite number > 0, got -1.0"),
        ("--max-retries", "-1", "--max-retries must be an integer >= 0, got -1"),
        ("--concurrency", "0", "--concurrency must be an integer >= 1, got 0"),
        ("--workers", "-3", "--concurrency must be an integer >= 1, got -3"),
        ("--per-prompt", "0", "--per-prompt must be an integer >= 1, got 0"),
        ("--max-tokens", "0", "--max-tokens must be an integer >= 1, got 0"),
        ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan"),
        ("--temperature", "-0.5", "--temperature must be a finite number >= 0, got -0.5"),
        ("--llm-url", "localhost:8000", "must be an http(s) URL"),
    ],
)
def test_bad_settings_are_one_line_before_any_request(
    llm: FakeLLM, api_key, tmp_path, capsys, flag, value, needle
) -> None:
    classes = write_classes(tmp_path / "c.txt", CLASSES[:2])
    assert main([*cli_args(llm, classes, tmp_path / "o" / "d.json"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratta: error: ") and err.count("\n") == 1
    assert needle in err
    assert llm.asked() == [] and files_in(tmp_path) == ["c.txt"]


@pytest.mark.parametrize(
    ("setting", "value"),
    [("per_prompt", 2.5), ("seed", 1.5), ("max_retries", True), ("backoff", -1.0)],
)
def test_bad_settings_of_the_python_api_are_one_line(
    llm: FakeLLM, api_key, tmp_path, setting, value
) -> None:
    with pytest.raises(RattaInputError, match=rf"must be .*, got {value!r}$"):
        describe(["class-00"], tmp_path / "d.json", **fast(llm, **{setting: value}))
    assert llm.asked() == [] and files_in(tmp_path) == []


def test_describe_runs_inside_a_running_event_loop(llm: FakeLLM, api_key, tmp_path) -> None:
    async def notebook_cell(model: str) -> Any:  # Jupyter runs cells inside an event loop
        kwargs = fast(llm, prompts=TWO_PROMPTS, llm_model=model)
        return describe(["class-00"], tmp_path / "d.json", **kwargs)

    assert asyncio.run(notebook_cell("m")).manifest["counts"] == {"class-00": 6}
    with pytest.raises(LLMEndpointError, match="HTTP 404"):  # its errors come through
        asyncio.run(notebook_cell("gpt-nine"))


def test_ctrl_c_inside_a_running_event_loop_stops_within_2_s(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    llm.delay = {"class-00": 60.0}
    out = tmp_path / "d.json"
    code = (
        "import asyncio\n"
        "from ratta.describe import describe\n"
        "async def cell():\n"
        f"    describe(['class-00'], {str(out)!r}, llm_url={llm.url!r}, llm_model='m',\n"
        "             progress=False)\n"
        "asyncio.new_event_loop().run_until_complete(cell())\n"  # a loop without asyncio.run's
    )  # SIGINT handler, as in a notebook kernel
    with running(sys.executable, "-c", code) as proc:
        llm.wait_for()
        took, err = interrupt(proc)
    assert took < 2 and "KeyboardInterrupt" in err.splitlines()[-1]
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("state", ["reply", "retry", "trickle", "writing"])
def test_ctrl_c_stops_describe_within_2_s(llm: FakeLLM, api_key, tmp_path, state) -> None:
    """SIGINT while waiting for a reply, sleeping before a retry, reading a trickle, or
    writing the outputs (as soon as the CuPL JSON is there: the manifest is next)."""
    faults = {"retry": [("429", "120")], "trickle": [("trickle", "body")]}
    llm.faults = {"class-00": faults.get(state, [])}
    if state != "writing":
        llm.delay = {"class-00": 60.0}  # an answer takes a minute
    names = CLASSES[:12] if state == "writing" else ["class-00"]
    classes = write_classes(tmp_path / "c.txt", names)
    out = tmp_path / "d.json"
    argv = cli_args(llm, classes, out, "--concurrency", "1", "--timeout", "100")
    with running(RATTA, *argv) as proc:
        if state == "writing":
            while proc.poll() is None and not out.exists():
                time.sleep(0.001)
        else:
            llm.wait_for()
            time.sleep(0.3)  # the reply or the 429 reaches the client
        took, err = interrupt(proc)
    assert took < 2, f"{took:.1f} s"
    assert "Traceback" not in err
    assert ("retrying in 120.0 s (Retry-After)" in err) == (state == "retry")
    if state != "writing":
        assert proc.returncode == 130 and err.splitlines()[-1].startswith("ratta: interrupted;")
        assert files_in(tmp_path) == ["c.txt"]
        return
    assert proc.returncode in (0, 130)  # it may have finished first
    resumable = Path(f"{out}.partial.jsonl").exists()
    llm.reset()
    assert main(cli_args(llm, classes, out)) == 0
    assert files_in(tmp_path) == ["c.txt", "d.json", "d.json.manifest.json"]
    if resumable:  # every class was recorded: none is asked again
        assert llm.asked() == []


# --------------------------------------------------------------------------- outputs and inputs


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "manifest", "progress file"])
def test_describe_never_writes_over_the_class_list(
    llm: FakeLLM, api_key, tmp_path, capsys, how
) -> None:
    classes = write_classes(tmp_path / "classes.txt", CLASSES[:2])
    out = {"same": classes, "symlink": tmp_path / "link.txt", "hardlink": tmp_path / "hard.txt"}
    if how == "symlink":
        out["symlink"].symlink_to(classes)
    elif how == "hardlink":
        os.link(classes, out["hardlink"])
    elif how == "manifest":  # OUT.manifest.json would land on the class list
        classes = classes.rename(tmp_path / "d.json.manifest.json")
        out[how] = tmp_path / "d.json"
    else:  # so would OUT.partial.jsonl
        classes = classes.rename(tmp_path / "d.json.partial.jsonl")
        out[how] = tmp_path / "d.json"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(cli_args(llm, classes, out[how])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is the input --classes {classes}" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert llm.asked() == []


@pytest.mark.parametrize("kind", ["fifo", "/dev/null"])
def test_describe_never_replaces_a_device_or_fifo(
    llm: FakeLLM, api_key, tmp_path, capsys, kind
) -> None:
    classes = write_classes(tmp_path / "classes.txt", CLASSES[:2])
    out = Path(kind) if kind.startswith("/") else tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(out)
    assert main(cli_args(llm, classes, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a regular file" in err
    assert not out.is_file() and llm.asked() == []
    assert files_in(tmp_path) == sorted(["classes.txt", *(["fifo"] if kind == "fifo" else [])])


@pytest.mark.parametrize("where", ["inside", "split file"])
def test_describe_never_writes_into_the_data_root(
    llm: FakeLLM, api_key, tmp_path, capsys, where
) -> None:
    root = tmp_path / "data"
    make_coop_dtd(root)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    out = root / "cupl.json" if where == "inside" else split
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    argv = ["describe", "--dataset", "dtd", "--data-root", str(root), "--out", str(out)]
    assert main([*argv, "--llm-url", llm.url, "--llm-model", "m", "--quiet"]) == 2
    err = capsys.readouterr().err
    needle = f"lies inside the input --data-root {root}" if where == "inside" else "is the input"
    assert err.count("\n") == 1 and needle in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert llm.asked() == []


def test_a_second_process_on_the_same_out_stops_with_one_line(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    llm.delay = {"class-00": 60.0}
    classes = write_classes(tmp_path / "c.txt", ["class-00", "class-01"])
    out = tmp_path / "d.json"
    argv = cli_args(llm, classes, out, "--concurrency", "1")
    with running(RATTA, *argv) as first:
        llm.wait_for()  # the first process holds the lock and waits for its reply
        second = subprocess.run([RATTA, *argv], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"another ratta process (pid {first.pid}) is writing it" in second.stderr
        assert len(llm.asked()) == 1  # the second one asked nothing
        llm.release.set()
        assert first.wait(timeout=30) == 0
    assert list(json.loads(out.read_text())) == ["class-00", "class-01"]
    assert files_in(tmp_path) == ["c.txt", "d.json", "d.json.manifest.json"]


# --------------------------------------------------------------------------- resume


def test_rerun_reuses_finished_classes_and_refuses_other_settings(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    llm.faults = {"class-02": [("401", None)]}
    out = tmp_path / "d.json"
    partial = Path(f"{out}.partial.jsonl")
    kwargs = fast(llm, prompts=TWO_PROMPTS, concurrency=1)
    with pytest.raises(LLMEndpointError, match="HTTP 401"):
        describe(CLASSES[:5], out, **kwargs)
    lines = partial.read_text().splitlines()
    assert [json.loads(line)["class"] for line in lines[1:]] == CLASSES[:2]
    with partial.open("a") as fh:  # a kill in the middle of a write
        fh.write('{"class": "class-02", "answ')

    with pytest.raises(RattaInputError, match=r"other settings \(temperature\)"):
        describe(CLASSES[:5], out, **{**kwargs, "temperature": 0.5})

    since = time.monotonic()
    run = describe(CLASSES[:5], out, **kwargs)
    assert {r.cls for r in llm.asked(since=since)} == set(CLASSES[2:5])
    assert run.resumed_classes == 2
    assert json.loads(out.read_text())["class-00"][0].startswith("class-00 answer ")
    assert list(json.loads(out.read_text())) == CLASSES[:5]
    assert not partial.exists()


def reference_run(llm: FakeLLM, argv: list[str], out: Path) -> dict[str, bytes]:
    """The bytes an uninterrupted run of ``argv`` writes, run into a folder of its own."""
    ref = out.parent.with_name("reference") / out.name
    assert main([str(ref) if a == str(out) else a for a in argv]) == 0
    llm.reset()
    return {"cupl": ref.read_bytes(), "manifest": Path(f"{ref}.manifest.json").read_bytes()}


def written(out: Path) -> dict[str, bytes]:
    return {"cupl": out.read_bytes(), "manifest": Path(f"{out}.manifest.json").read_bytes()}


def test_resume_after_kill_does_not_ask_finished_classes_again(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    classes = write_classes(tmp_path / "classes.txt", CLASSES)
    out = tmp_path / "run" / "cupl.json"
    partial = Path(f"{out}.partial.jsonl")
    argv = cli_args(llm, classes, out, "--concurrency", "4", "--seed", "1")
    expected = reference_run(llm, argv, out)

    finished = CLASSES[:6]
    llm.delay = dict.fromkeys(CLASSES[6:], 60.0)
    with running(RATTA, *argv) as proc:
        deadline = time.monotonic() + 20
        while not (partial.exists() and partial.read_text().count('"class"') == len(finished)):
            assert time.monotonic() < deadline and proc.poll() is None, "no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    assert not out.exists()

    llm.delay = {}
    since = time.monotonic()
    assert main(argv) == 0
    asked_again = {r.cls for r in llm.asked(since=since)}
    assert asked_again == set(CLASSES[6:])
    cupl = json.loads(out.read_text())
    assert all(len(v) == 2 * len(QUESTION_PROMPTS["objects"]) for v in cupl.values())
    assert written(out) == expected
    assert files_in(out.parent) == ["cupl.json", "cupl.json.manifest.json"]


def test_kill_9_at_any_point_then_a_rerun_writes_the_same_bytes(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    """Killed at its first request, mid-run, at its last request, and as it writes the
    outputs; the rerun writes what an uninterrupted run writes, and cleans what was left."""
    names, prompts = CLASSES[:12], len(QUESTION_PROMPTS["objects"])
    classes = write_classes(tmp_path / "classes.txt", names)
    out = tmp_path / "run" / "cupl.json"
    partial = Path(f"{out}.partial.jsonl")
    argv = cli_args(llm, classes, out, "--concurrency", "3", "--seed", "4")
    expected = reference_run(llm, argv, out)

    def finished() -> int:
        return partial.read_text().count('"class"') if partial.exists() else 0

    victim: dict[str, int] = {}

    def kill_at(number: int) -> None:  # on the server, as the request arrives
        if number == victim.get("at"):
            os.kill(victim["pid"], signal.SIGKILL)

    llm.hook = kill_at
    for point in ("first", "middle", "last", "outputs"):
        left = (len(names) - finished()) * prompts  # requests this run will send
        at = {"first": 1, "middle": left // 2, "last": left, "outputs": 0}[point]
        llm.reset()
        victim["at"] = at
        with running(RATTA, *argv) as proc:
            victim["pid"] = proc.pid
            if point == "outputs":  # the CuPL JSON is there: the manifest or cleanup is next
                while proc.poll() is None and not out.exists():
                    time.sleep(0.001)
                proc.kill()
            proc.wait(timeout=60)
        assert proc.returncode in ((-9, 0) if point == "outputs" else (-9,)), point
    llm.hook = None

    assert main(argv) == 0
    assert written(out) == expected
    assert files_in(out.parent) == ["cupl.json", "cupl.json.manifest.json"]
    assert not lock_path(out).exists()


# --------------------------------------------------------------------------- templates only


def test_templates_only_uses_the_dataset_templates(tmp_path: Path, capsys) -> None:
    classes = write_classes(tmp_path / "c.txt", ["banded", "woven"])
    out = tmp_path / "dtd.json"
    argv = ["describe", "--dataset", "dtd", "--classes", str(classes), "--out", str(out)]
    assert main([*argv, "--templates-only"]) == 0
    templates = get_preset("dtd").templates
    assert json.loads(out.read_text()) == {
        "banded": [t.format("banded") for t in templates],
        "woven": [t.format("woven") for t in templates],
    }
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["mode"] == "templates-only" and manifest["kind"] == "textures"
    assert "lower accuracy" in manifest["note"] and "model" not in manifest
    assert manifest["counts"] == {"banded": 2, "woven": 2}
    assert "wrote" in capsys.readouterr().out


def test_a_crash_before_the_manifest_leaves_no_manifest_of_other_bytes(
    tmp_path: Path, monkeypatch
) -> None:
    """A run killed between the JSON and its manifest: no manifest of the earlier run lies
    beside the new JSON; the rerun writes the manifest of the new bytes."""
    import ratta.describe.loop as loop

    classes = write_classes(tmp_path / "c.txt", ["banded", "woven"])
    out = tmp_path / "dtd.json"
    manifest = Path(f"{out}.manifest.json")
    argv = ["describe", "--classes", str(classes), "--out", str(out), "--templates-only"]
    assert main([*argv, "--kind", "textures"]) == 0
    real = loop.write_json

    def crash_on_manifest(path, value) -> None:
        if Path(path) == manifest:
            raise KeyboardInterrupt
        real(path, value)

    monkeypatch.setattr(loop, "write_json", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        loop.describe(["banded", "woven"], out, kind="satellite", templates=["{}."])
    assert json.loads(out.read_text()) == {"banded": ["banded."], "woven": ["woven."]}
    assert not manifest.exists()
    monkeypatch.setattr(loop, "write_json", real)
    assert main([*argv, "--kind", "textures"]) == 0
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert json.loads(manifest.read_text())["output"]["sha256"] == sha


def test_templates_only_without_dataset_uses_generic_templates_of_the_kind(
    tmp_path: Path,
) -> None:
    classes = write_classes(tmp_path / "c.txt", ["airport", "forest"])
    out = tmp_path / "sat.json"
    argv = ["describe", "--classes", str(classes), "--out", str(out), "--kind", "satellite"]
    assert main([*argv, "--templates-only"]) == 0
    cupl = json.loads(out.read_text())
    assert cupl["forest"] == [t.format("forest") for t in GENERIC_TEMPLATES["satellite"]]
    assert list(cupl) == ["airport", "forest"]


def test_llm_descriptions_feed_ratta_text(llm: FakeLLM, api_key, tmp_path, tiny_clip) -> None:
    from conftest import write_images

    from ratta.cli import main
    from ratta.files import load_text

    names = CLASSES[:3]
    for i, name in enumerate(names):  # a folder dataset whose class names are these
        write_images(tmp_path / "data" / name, 1, seed=i)
    out = tmp_path / "cupl.json"
    describe(names, out, **fast(llm))
    text = tmp_path / "text.safetensors"
    argv = [
        "text",
        "--dataset",
        "folder",
        "--data-root",
        str(tmp_path / "data"),
        "--descriptions",
        str(out),
        "--out",
        str(text),
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
    ]
    assert main(argv) == 0
    loaded = load_text(text)
    assert loaded.class_names == names
    per_class = len(json.loads(out.read_text())[names[0]])
    assert loaded.desc_class.tolist() == [c for c in range(3) for _ in range(per_class + 1)]
