"""Cleaning of LLM answers: one plain sentence each, usable as a CLIP description."""

from __future__ import annotations

import re
from collections.abc import Iterable

MIN_WORDS = 3

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
