"""Class descriptions for any label set: ``ratta describe`` (class names -> CuPL JSON).

Each class is asked a few question prompts (chosen by the kind of label set) through an
OpenAI-compatible chat-completions endpoint, ``per_prompt`` sampled answers per prompt. The
answers are cleaned (:func:`clean_answers`) and written as a CuPL JSON, ``{class name: [sentence,
...]}`` in input order, with a manifest at ``<out>.manifest.json``. Finished classes are
appended to ``<out>.partial.jsonl`` so that an interrupted run resumes where it stopped.

Without an LLM (``templates``), every class gets hand templates filled with its name.

Modules, each usable alone:

- ``prompts``: the question prompts, hand templates and system message (data);
- ``cleaning``: an answer -> one plain sentence;
- ``client``: the chat-completions endpoint (httpx2, a deadline per request, retries,
  one-line errors);
- ``state``: the resumable ``<out>.partial.jsonl``;
- ``loop``: :func:`describe`, which asks, cleans, records and writes.
"""

from typing import TYPE_CHECKING, Any

# Loaded on first use: the command line builds its parser without the HTTP client (httpx2
# and asyncio cost ~70 ms of every ratta start-up).
_WHERE = {
    "MIN_WORDS": "ratta.describe.cleaning",
    "clean_answer": "ratta.describe.cleaning",
    "clean_answers": "ratta.describe.cleaning",
    "DEFAULT_LLM_URL": "ratta.describe.prompts",
    "KEY_ENV": "ratta.describe.prompts",
    "MAX_BACKOFF_S": "ratta.describe.client",
    "MAX_RETRY_AFTER_S": "ratta.describe.client",
    "LLMEndpointError": "ratta.describe.client",
    "Described": "ratta.describe.loop",
    "describe": "ratta.describe.loop",
    "read_class_names": "ratta.describe.loop",
    "GENERIC_TEMPLATES": "ratta.describe.prompts",
    "KINDS": "ratta.describe.prompts",
    "QUESTION_PROMPTS": "ratta.describe.prompts",
    "SYSTEM_PROMPT": "ratta.describe.prompts",
    "TEMPLATES_ONLY_NOTE": "ratta.describe.prompts",
}

if TYPE_CHECKING:
    from ratta.describe.cleaning import MIN_WORDS, clean_answer, clean_answers
    from ratta.describe.client import MAX_BACKOFF_S, MAX_RETRY_AFTER_S, LLMEndpointError
    from ratta.describe.loop import Described, describe, read_class_names
    from ratta.describe.prompts import (
        DEFAULT_LLM_URL,
        GENERIC_TEMPLATES,
        KEY_ENV,
        KINDS,
        QUESTION_PROMPTS,
        SYSTEM_PROMPT,
        TEMPLATES_ONLY_NOTE,
    )


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ratta.describe' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LLM_URL",
    "GENERIC_TEMPLATES",
    "KEY_ENV",
    "KINDS",
    "MAX_BACKOFF_S",
    "MAX_RETRY_AFTER_S",
    "MIN_WORDS",
    "QUESTION_PROMPTS",
    "SYSTEM_PROMPT",
    "TEMPLATES_ONLY_NOTE",
    "Described",
    "LLMEndpointError",
    "clean_answer",
    "clean_answers",
    "describe",
    "read_class_names",
]
