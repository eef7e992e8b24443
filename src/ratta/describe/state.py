"""The resumable state of ``ratta describe``: ``<out>.partial.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ratta.atomic import atomic_path
from ratta.errors import RattaInputError


class PartialFile:
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
