"""Which ratta wrote a file: its version and, run from a git checkout, the commit.

The commit is read from the checkout's ``.git`` files (``HEAD``, then the loose ref or
``packed-refs``; a worktree's ``.git`` file points to its own ``HEAD``), without spawning
git, so ``ratta --version`` stays instant. Installed from a wheel there is no checkout,
and the commit is None. Uncommitted changes are not detected: the commit names the last
commit of the checkout.

Torch-free, like :mod:`ratta.atomic`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ratta import __version__

_SHA = re.compile(r"[0-9a-f]{40}")


def _git_dir(root: Path) -> Path | None:
    """The git directory of a checkout rooted at ``root``: ``.git/``, or where a
    worktree's ``.git`` file points."""
    dot = root / ".git"
    if dot.is_dir():
        return dot
    try:
        line = dot.read_text().strip()
    except OSError:
        return None
    if not line.startswith("gitdir:"):
        return None
    target = Path(line.removeprefix("gitdir:").strip())
    return target if target.is_absolute() else root / target


def _common_dir(git_dir: Path) -> Path:
    """Where the refs live: a worktree's ``commondir``, else the git directory itself."""
    try:
        common = Path((git_dir / "commondir").read_text().strip())
    except OSError:
        return git_dir
    return common if common.is_absolute() else git_dir / common


def _resolve_ref(git_dir: Path, ref: str) -> str | None:
    for base in dict.fromkeys((git_dir, _common_dir(git_dir))):
        try:
            value = (base / ref).read_text().strip()
        except OSError:
            continue
        if _SHA.fullmatch(value):
            return value
    try:
        packed = (_common_dir(git_dir) / "packed-refs").read_text()
    except OSError:
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and _SHA.fullmatch(sha):
            return sha
    return None


def read_commit(root: str | Path) -> str | None:
    """The commit checked out at ``root`` (40 hex digits), or None if it is not a checkout."""
    git_dir = _git_dir(Path(root))
    if git_dir is None:
        return None
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    if head.startswith("ref:"):
        return _resolve_ref(git_dir, head.removeprefix("ref:").strip())
    return head if _SHA.fullmatch(head) else None


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout ratta runs from (``src/ratta`` inside it), or None."""
    package = Path(__file__).resolve().parent
    if package.parent.name != "src":
        return None
    return read_commit(package.parent.parent)


def version_line() -> str:
    """``ratta 0.1.0 (git abc1234)``, or ``ratta 0.1.0`` outside a checkout."""
    commit = git_commit()
    return f"ratta {__version__}" + (f" (git {commit[:7]})" if commit else "")


def stamp() -> dict[str, Any]:
    """The version fields of every JSON summary and manifest ratta writes."""
    return {"ratta_version": __version__, "ratta_commit": git_commit()}
