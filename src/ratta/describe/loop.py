"""The describe loop: every (class, prompt) asked concurrently on one event loop, each class
recorded once all its answers are in, then the CuPL JSON and its manifest."""

from __future__ import annotations

import asyncio
import hashlib
import math
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ratta import __version__
from ratta.atomic import write_json
from ratta.describe.cleaning import clean_answers
from ratta.describe.client import DEFAULT_LLM_URL, ChatClient, api_key, endpoint_host
from ratta.describe.prompts import (
    KINDS,
    QUESTION_PROMPTS,
    SYSTEM_PROMPT,
    TEMPLATES_ONLY_NOTE,
    check_template,
)
from ratta.describe.state import PartialFile
from ratta.errors import RattaInputError
from ratta.guard import Read, Write, guarded
from ratta.provenance import stamp

T = TypeVar("T")


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


def manifest_path(out: str | os.PathLike[str]) -> Path:
    return Path(f"{out}.manifest.json")


def partial_path(out: str | os.PathLike[str]) -> Path:
    return Path(f"{out}.partial.jsonl")


@dataclass(frozen=True)
class Described:
    """What :func:`describe` wrote, and what this run of it took.

    ``manifest`` is the content of ``<out>.manifest.json``. The run's figures stay out of
    the files, so that a run resumed after a kill writes the same bytes as one that was not
    interrupted: ``requests`` (HTTP requests sent), ``retries`` (of them, those sent again
    after a failure) and ``resumed_classes`` (taken from ``<out>.partial.jsonl``).
    """

    manifest: dict[str, Any]
    requests: int = 0
    retries: int = 0
    resumed_classes: int = 0


def _plan(
    out: str | os.PathLike[str], reads: Sequence[Read], **_: Any
) -> tuple[list[Write], list[Read]]:
    writes = [
        Write.of(out, "--out"),
        Write.of(manifest_path(out), "--out manifest"),
        Write.of(partial_path(out), "--out progress file"),
    ]
    return writes, list(reads)


@guarded(_plan)
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
    concurrency: int = 8,
    templates: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    timeout: float = 60.0,
    max_retries: int = 8,
    backoff: float = 1.0,
    progress: bool = True,
    reads: Sequence[Read] = (),
) -> Described:
    """Write the CuPL JSON ``out`` of ``class_names`` and its manifest.

    With ``templates`` no LLM is asked: each class gets the templates filled with its name.
    Otherwise each class is asked ``prompts`` (default: :data:`QUESTION_PROMPTS` of ``kind``)
    at ``llm_url``/chat/completions, ``per_prompt`` answers each, with ``concurrency``
    requests in flight, each bounded as a whole by ``timeout`` seconds. Failed requests
    (HTTP 429/408/5xx, timeouts, lost connections, replies without text) are sent again up
    to ``max_retries`` times, after ``backoff * 2**k`` seconds (times a random 0.5-1.5) or
    the server's Retry-After, each retry printed as one line on stderr. The API key is read
    from ``RATTA_LLM_API_KEY`` or ``OPENAI_API_KEY``.

    ``reads``: the files the class names came from (a class list, a dataset's data root),
    which no output may replace. Every setting is checked before the first request.
    """
    names = _check_names(class_names)
    out_path = Path(out)
    if kind not in KINDS:
        raise RattaInputError(f"--kind '{kind}' is unknown (known: {', '.join(KINDS)})")
    _check_numbers(
        per_prompt=per_prompt,
        max_tokens=max_tokens,
        concurrency=concurrency,
        max_retries=max_retries,
        seed=seed,
        temperature=temperature,
        timeout=timeout,
        backoff=backoff,
    )
    if templates is not None:
        return _describe_templates(names, out_path, kind, list(templates))
    if not llm_model:
        raise RattaInputError("--llm-model is required (or use --templates-only)")
    questions = list(prompts if prompts is not None else QUESTION_PROMPTS[kind])
    if not questions:
        raise RattaInputError("no question prompts given")
    for q in questions:
        check_template(q, "prompt")
    host = endpoint_host(llm_url)
    client = ChatClient(
        base_url=llm_url,
        model=llm_model,
        system=SYSTEM_PROMPT,
        temperature=temperature,
        max_tokens=max_tokens,
        key=api_key(),
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
        on_retry=_print_retry,
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
    state = PartialFile(partial_path(out_path), settings)
    done = state.load()
    resumed = sum(name in done for name in names)
    todo = [name for name in names if name not in done]
    try:
        with tqdm(
            total=len(names), initial=resumed, unit="class", desc="describe", disable=not progress
        ) as bar:
            _run(_ask(client, todo, questions, per_prompt, seed, concurrency, done, state, bar))
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
    }
    manifest = _write_outputs(out_path, {name: done[name] for name in names}, manifest)
    state.path.unlink(missing_ok=True)
    return Described(manifest, client.requests, client.retries, resumed)


def _check_numbers(
    *,
    per_prompt: int,
    max_tokens: int,
    concurrency: int,
    max_retries: int,
    seed: int | None,
    temperature: float,
    timeout: float,
    backoff: float,
) -> None:
    """One line for the first setting out of range (NaN and infinity included)."""
    for flag, value, low in (
        ("--per-prompt", per_prompt, 1),
        ("--max-tokens", max_tokens, 1),
        ("--concurrency", concurrency, 1),
        ("--max-retries", max_retries, 0),
    ):
        if not _is_integer(value) or value < low:
            raise RattaInputError(f"{flag} must be an integer >= {low}, got {value!r}")
    if seed is not None and not _is_integer(seed):
        raise RattaInputError(f"--seed must be an integer, got {seed!r}")
    for what, number, positive in (
        ("--timeout", timeout, True),
        ("--temperature", temperature, False),
        ("backoff", backoff, False),
    ):
        real = isinstance(number, numbers.Real) and not isinstance(number, bool)
        if not (real and math.isfinite(number) and (number > 0 if positive else number >= 0)):
            bound = "> 0" if positive else ">= 0"
            raise RattaInputError(f"{what} must be a finite number {bound}, got {number!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _print_retry(line: str) -> None:
    tqdm.write(f"ratta: {line}", file=sys.stderr)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on an event loop of its own, so that Ctrl-C cancels every request
    at once: in this thread, or, if a loop runs here already (a notebook), in a helper
    thread, carrying an interrupt of this thread over to it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    loop = asyncio.new_event_loop()
    task = loop.create_task(coroutine)
    finished = threading.Event()  # not Thread.join: in 3.11 an interrupted join is broken

    def work() -> None:
        try:  # asyncio.wait: the task's error is raised below by task.result(), not here
            loop.run_until_complete(asyncio.wait([task]))
        finally:
            finished.set()

    threading.Thread(target=work, daemon=True).start()
    try:
        finished.wait()
    except BaseException:
        loop.call_soon_threadsafe(task.cancel)
        finished.wait()
        raise
    finally:
        if finished.is_set():  # else a second interrupt: the loop still winds down
            loop.close()
    return task.result()


async def _ask(
    client: ChatClient,
    todo: list[str],
    questions: list[str],
    per_prompt: int,
    seed: int | None,
    concurrency: int,
    done: dict[str, list[str]],
    state: PartialFile,
    bar: tqdm,
) -> None:
    """Ask every (class, prompt) of ``todo``, ``concurrency`` at a time; record each class
    once all its prompts are in. The first failure cancels the requests in flight."""
    jobs = [(name, j) for name in todo for j in range(len(questions))]
    queue = iter(jobs)
    raw: dict[str, list[list[str]]] = {name: [[] for _ in questions] for name in todo}
    left = dict.fromkeys(todo, len(questions))

    async def worker() -> None:
        for name, j in queue:  # one iterator shared by the workers: each job taken once
            raw[name][j] = await client.sample(questions[j].format(name), per_prompt, seed)
            left[name] -= 1
            if not left[name]:
                done[name] = clean_answers(a for answers in raw.pop(name) for a in answers)
                state.append(name, done[name])
                bar.update()

    async with client:
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _describe_templates(names: list[str], out: Path, kind: str, templates: list[str]) -> Described:
    if not templates:
        raise RattaInputError("no templates given for --templates-only")
    for t in templates:
        check_template(t, "template")
    cupl = {name: [t.format(name) for t in templates] for name in names}
    manifest = {
        "mode": "templates-only",
        "kind": kind,
        "templates": templates,
        "note": TEMPLATES_ONLY_NOTE,
    }
    return Described(_write_outputs(out, cupl, manifest))


def _write_outputs(
    out: Path, cupl: dict[str, list[str]], manifest: dict[str, Any]
) -> dict[str, Any]:
    """The CuPL JSON, then its manifest (which carries the JSON's sha256). Neither holds a
    date or a figure of the run: a resumed run writes the same bytes.

    A manifest of an earlier run goes first: a kill between the two writes leaves the JSON
    without a manifest (the rerun writes it), never beside one describing other bytes."""
    manifest_path(out).unlink(missing_ok=True)
    write_json(out, cupl)
    manifest = {
        "produced_by": f"ratta describe {__version__}",
        **stamp(),
        **manifest,
        "classes": len(cupl),
        "descriptions": sum(len(v) for v in cupl.values()),
        "counts": {name: len(v) for name, v in cupl.items()},
        "output": {"file": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()},
    }
    write_json(manifest_path(out), manifest)
    return manifest
