"""The describe loop: every (class, prompt) asked in parallel, each class recorded once
all its answers are in, then the CuPL JSON and its manifest."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ratta import __version__
from ratta.atomic import check_output_path, write_json
from ratta.describe.cleaning import clean_answers
from ratta.describe.client import DEFAULT_LLM_URL, Cancelled, ChatClient, api_key, endpoint_host
from ratta.describe.prompts import (
    KINDS,
    QUESTION_PROMPTS,
    SYSTEM_PROMPT,
    TEMPLATES_ONLY_NOTE,
    check_template,
)
from ratta.describe.state import PartialFile
from ratta.errors import RattaInputError


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
        check_template(q, "prompt")
    host = endpoint_host(llm_url)
    client = ChatClient(
        url=llm_url.rstrip("/") + "/chat/completions",
        host=host,
        model=llm_model,
        system=SYSTEM_PROMPT,
        temperature=temperature,
        max_tokens=max_tokens,
        key=api_key(),
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
    state = PartialFile(Path(f"{out_path}.partial.jsonl"), settings)
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
    client: ChatClient,
    todo: list[str],
    questions: list[str],
    per_prompt: int,
    seed: int | None,
    workers: int,
    done: dict[str, list[str]],
    state: PartialFile,
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
            except Cancelled:
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
        check_template(t, "template")
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
