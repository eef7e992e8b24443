"""`ratta describe` against a local chat-completions server: answers, retries, resume, errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

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
from ratta.presets import PRESETS, get_preset

KEY = "sk-test-0123456789"
CLASSES = [f"class-{i:02d}" for i in range(30)]
TWO_PROMPTS = ("What does a {} look like?", "How would you spot a {}?")


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
    """Chat-completions server whose answers name the class the prompt asked about."""

    classes: list[str]
    key: str | None = KEY
    max_n: int | None = None  # fewer choices than asked for, like llama.cpp or Ollama
    reject_n: bool = False  # HTTP 400 when n > 1
    faults: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def reply(self, path: str, auth: str | None, body: dict[str, Any]) -> tuple[int, dict, Any]:
        prompt = body["messages"][-1]["content"]
        cls = next(c for c in self.classes if c in prompt)
        n, seed = body["n"], body.get("seed")
        with self._lock:
            queue = self.faults.get(cls)
            fault, arg = queue.pop(0) if queue else ("", None)
            rid = next(self._ids)
        outcome = "ok"
        if path != "/v1/chat/completions":
            outcome = "404"
        elif (self.key and auth != f"Bearer {self.key}") or fault == "401":
            outcome = "401"
        elif fault:
            outcome = fault
        elif self.reject_n and n > 1:
            outcome = "400"
        with self._lock:
            self.log.append(Logged(time.monotonic(), cls, prompt, n, seed, auth, outcome))
        if outcome in ("404", "401", "400"):
            return int(outcome), {}, {"error": {"message": f"refused ({outcome})"}}
        if outcome == "429":
            return 429, {"Retry-After": arg} if arg else {}, {"error": {"message": "slow down"}}
        if outcome == "sleep":  # longer than the client's timeout
            self.release.wait(float(arg or 0))
        if cls in self.delay:
            self.release.wait(self.delay[cls])
        k = min(n, self.max_n or n)
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": f"{i + 1}. **{cls}** answer {rid}-{i}:\n a `distinctive` shape",
                },
                "finish_reason": "stop",
            }
            for i in range(k)
        ]
        return 200, {}, {"id": f"c{rid}", "object": "chat.completion", "choices": choices}

    def asked(self, outcome: str | None = None, since: float = 0.0) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.t >= since and outcome in (None, r.outcome)]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, headers, payload = self.server.llm.reply(
            self.path, self.headers.get("Authorization"), body
        )
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and hung up
            pass

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections of 8 workers: a 1 s SYN retry, a timeout.
    request_queue_size = 128


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
    client = ChatClient(
        url=f"{llm.url}/chat/completions",
        host="127.0.0.1",
        model="fake-model",
        system="Describe.",
        temperature=0.5,
        max_tokens=20,
        key=KEY,
        timeout=5.0,
        max_retries=0,
        backoff=0.001,
    )
    answers = client.sample("What does a class-03 look like?", 3, seed=7)
    assert len(answers) == 3 and all(
        a.startswith(f"{i + 1}. **class-03**") for i, a in enumerate(answers)
    )
    assert [(r.n, r.seed, r.outcome) for r in llm.asked()] == [(3, 7, "ok")]
    assert (client.requests, client.retries) == (1, 0)


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
    manifest = describe(CLASSES, out, **fast(llm, timeout=2.0, seed=5))

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
    assert manifest["retries"] == 6 and manifest["requests"] == len(llm.asked())

    on_disk = json.loads(Path(f"{out}.manifest.json").read_text())
    assert on_disk == manifest
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
    assert on_disk["date"].endswith("Z") and on_disk["resumed_classes"] == 0
    assert not Path(f"{out}.partial.jsonl").exists()


def test_retry_after_is_honoured(llm: FakeLLM, api_key, tmp_path) -> None:
    llm.faults = {"class-00": [("429", "0.4")]}
    describe(["class-00"], tmp_path / "d.json", **fast(llm, prompts=TWO_PROMPTS[:1]))
    first, second = llm.asked()
    assert (first.outcome, second.outcome) == ("429", "ok")
    assert second.t - first.t >= 0.4


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
    describe(CLASSES[:3], out, **fast(llm, prompts=TWO_PROMPTS, workers=1))
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
    argv = ["describe", "--classes", str(classes), "--out", str(out), "--llm-url", llm.url]
    assert main([*argv, "--llm-model", "m", "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratta: error: ") and err.count("\n") == 1
    assert "HTTP 401" in err and "RATTA_LLM_API_KEY" in err and "sk-wrong" not in err
    assert len(llm.asked()) == 1
    assert not out.exists() and not Path(f"{out}.partial.jsonl").exists()


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


def test_wrong_url_path_is_one_line_error(llm: FakeLLM, api_key, tmp_path) -> None:
    url = llm.url.removesuffix("/v1")
    with pytest.raises(
        LLMEndpointError,
        match=r"HTTP 404 from \S+/chat/completions \(refused \(404\)\); check --llm-url",
    ):
        describe(["class-00"], tmp_path / "d.json", **{**fast(llm), "llm_url": url})
    prompts = [r.prompt for r in llm.asked("404")]  # those already in flight, none retried
    assert prompts and len(prompts) == len(set(prompts)) == len(llm.asked())


# --------------------------------------------------------------------------- resume


def test_rerun_reuses_finished_classes_and_refuses_other_settings(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    llm.faults = {"class-02": [("401", None)]}
    out = tmp_path / "d.json"
    partial = Path(f"{out}.partial.jsonl")
    kwargs = fast(llm, prompts=TWO_PROMPTS, workers=1)
    with pytest.raises(LLMEndpointError, match="HTTP 401"):
        describe(CLASSES[:5], out, **kwargs)
    lines = partial.read_text().splitlines()
    assert [json.loads(line)["class"] for line in lines[1:]] == CLASSES[:2]
    with partial.open("a") as fh:  # a kill in the middle of a write
        fh.write('{"class": "class-02", "answ')

    with pytest.raises(RattaInputError, match=r"other settings \(temperature\)"):
        describe(CLASSES[:5], out, **{**kwargs, "temperature": 0.5})

    since = time.monotonic()
    manifest = describe(CLASSES[:5], out, **kwargs)
    assert {r.cls for r in llm.asked(since=since)} == set(CLASSES[2:5])
    assert manifest["resumed_classes"] == 2
    assert json.loads(out.read_text())["class-00"][0].startswith("class-00 answer ")
    assert list(json.loads(out.read_text())) == CLASSES[:5]
    assert not partial.exists()


def test_resume_after_kill_does_not_ask_finished_classes_again(
    llm: FakeLLM, api_key, tmp_path
) -> None:
    finished = CLASSES[:6]
    llm.delay = dict.fromkeys(CLASSES[6:], 60.0)
    classes = write_classes(tmp_path / "classes.txt", CLASSES)
    out = tmp_path / "cupl.json"
    partial = Path(f"{out}.partial.jsonl")
    argv = ["describe", "--classes", str(classes), "--out", str(out), "--llm-url", llm.url]
    argv += ["--llm-model", "m", "--per-prompt", "2", "--workers", "4", "--quiet"]
    ratta = Path(sys.executable).with_name("ratta")
    proc = subprocess.Popen([str(ratta), *argv], env=os.environ.copy(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (partial.exists() and partial.read_text().count('"class"') == len(finished)):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"no progress before the kill: {proc.communicate()[1].decode()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not out.exists()

    llm.delay = {}
    since = time.monotonic()
    assert main(argv) == 0
    asked_again = {r.cls for r in llm.asked(since=since)}
    assert asked_again == set(CLASSES[6:])
    cupl = json.loads(out.read_text())
    assert list(cupl) == CLASSES
    assert all(len(v) == 2 * len(QUESTION_PROMPTS["objects"]) for v in cupl.values())
    assert all(a.startswith(f"{c} answer ") for c, v in cupl.items() for a in v)
    assert json.loads(Path(f"{out}.manifest.json").read_text())["resumed_classes"] == 6
    assert not partial.exists()


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
