"""Atomic output files: written to a temporary name beside the target, renamed on success.

Torch-free, so that the command line starts without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ratta.errors import RattaInputError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), so that
    threads never see a temporarily different one."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_free_space(path: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse, before writing, a file of ``nbytes`` that the filesystem of ``path`` cannot
    hold (a full disk would otherwise stop the write near its end, after the work)."""
    free = shutil.disk_usage(Path(path).parent).free
    if nbytes > free:
        raise RattaInputError(
            f"{path}: the file needs {nbytes / 1024**3:.2f} GiB, its filesystem has "
            f"{free / 1024**3:.2f} GiB free"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after the writer: mkstemp, and writers that recreate the file (safetensors), leave
        # it 0600, which would make every output private
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def publish(path: Path) -> None:
    """Give ``path`` (a folder, recursively, or a file) the modes the umask allows.

    Temporary folders and files are created private (0700/0600); a database is meant to
    be shared like any other output.
    """
    umask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
