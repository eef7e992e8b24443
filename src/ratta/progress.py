"""Progress bars, named after the command that shows them.

Every stage takes ``progress``: False (no bar), True (a bar named after the stage:
``extract``, ``text``, ``index``) or a string, the name of the command the user ran, so
that a stage working inside another command says so: ``db build`` encodes its images
under the ``db build`` bar and trains its index under ``db build: index``; ``ratta run``
shows ``run: extract``, ``run: text``, ``run: adapt``.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

Progress = bool | str


def label(progress: Progress, stage: str) -> str:
    """The name of the bar of ``stage``: the command's name if given, else the stage's."""
    return progress if isinstance(progress, str) else stage


def within(progress: Progress, stage: str) -> Progress:
    """The ``progress`` of ``stage`` run inside the command named by ``progress``."""
    if not progress:
        return False
    return f"{progress}: {stage}" if isinstance(progress, str) else stage


def progress_bar(progress: Progress, stage: str, **kwargs: Any) -> tqdm:
    """A tqdm bar labelled :func:`label`, hidden when ``progress`` is False."""
    return tqdm(desc=label(progress, stage), disable=not progress, dynamic_ncols=True, **kwargs)
