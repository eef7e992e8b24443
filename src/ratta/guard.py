"""What a command may write: outputs never land on inputs, one writer per output, no debris.

Every command declares, before any work, the paths it will write (:class:`Write`) and the
files and folders it reads (:class:`Read`), and enters :func:`claim`:

1. :func:`check_writes` refuses (one line, nothing written) a write that
   - resolves to an input: the same file through a symlink or a hard link (same device and
     inode), or the same resolved path;
   - lies inside a folder the command reads as a whole (a data root, a database folder);
   - exists and is not a regular file (a device such as ``/dev/null``, a FIFO, a socket), or
     is a folder where a file is expected (and the reverse);
   - cannot be created: the nearest existing ancestor is not a writable folder;
   - is named twice (``--report`` and ``--write-clean`` on the same path).
2. Missing parent folders are created, for every command alike, with the umask's modes.
3. The first write (the command's main output) is locked by a lock file beside it,
   ``.<name>.lock`` (``flock``, released by the kernel when the process dies, even by
   ``kill -9``): a second process given the same output stops with one line (or, with
   ``wait=True``, as for cache entries, waits its turn).
4. Holding the lock, the temporary files and folders a killed writer left beside each write
   (``.<name>.XXXXXXXX.tmp``, the names :func:`ratta.atomic.atomic_path` and the database
   writer use) are removed: nobody else can be writing them.

Torch-free, like :mod:`ratta.atomic`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import re
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ratta.atomic import current_umask
from ratta.errors import RattaInputError

F = TypeVar("F", bound=Callable[..., Any])
WriteKind = Literal["file", "dir", "folder", "scratch"]
_KIND_NAMES = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class OutputBusyError(RattaInputError):
    """Another process holds the lock of an output."""


@dataclass(frozen=True)
class Write:
    """A path a command will write.

    ``kind``: ``file``, a regular file replaced atomically; ``dir``, a new folder renamed
    into place (it must not exist yet); ``folder``, a folder written into (created if
    missing, reused if there); ``scratch``, a working folder deleted at the end (no input
    may lie inside it).
    """

    path: Path
    flag: str
    kind: WriteKind = "file"

    @classmethod
    def of(cls, path: str | os.PathLike[str], flag: str, kind: WriteKind = "file") -> Write:
        return cls(Path(path), flag, kind)


@dataclass(frozen=True)
class Read:
    """An input: a file, or a folder read as a whole (``tree``: nothing may be written in it)."""

    path: Path
    flag: str
    tree: bool = False

    @classmethod
    def of(
        cls, path: str | os.PathLike[str] | None, flag: str, tree: bool | None = None
    ) -> list[Read]:
        """``[Read]``, or ``[]`` for ``None`` (an optional input not given). ``tree``
        defaults to whether the path is a folder: a folder input is read as a whole."""
        if path is None:
            return []
        p = Path(path)
        return [cls(p, flag, p.is_dir() if tree is None else tree)]


def output_files(out: str | os.PathLike[str], flag: str = "--out") -> list[Write]:
    """A file output with the sidecars every stage writes beside it: the JSON summary
    ``OUT.json`` and the resumable chunk folder ``OUT.parts/``."""
    return [
        Write.of(out, flag),
        Write.of(f"{out}.json", f"{flag} summary"),
        Write.of(f"{out}.parts", f"{flag} chunks", "scratch"),
    ]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a symlink loop, a permission problem: not a writable path
        raise RattaInputError(f"{path}: cannot use this path ({exc.strerror})") from None


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(os.sep)


def check_writes(writes: Sequence[Write], reads: Iterable[Read]) -> None:
    """Refuse, with one line, any write that could destroy an input or cannot be made."""
    inputs: dict[tuple[int, int], Read] = {}
    resolved: dict[str, Read] = {}
    trees: list[tuple[str, Read]] = []
    for r in reads:
        real = os.path.realpath(r.path)
        resolved[real] = r
        st = _stat(r.path)
        if st is not None:
            inputs[(st.st_dev, st.st_ino)] = r
        if r.tree:
            trees.append((real, r))
    seen: dict[str, Write] = {}
    for w in writes:
        real = os.path.realpath(w.path)
        if real in seen:
            raise RattaInputError(f"{w.flag} {w.path}: the same path as {seen[real].flag}")
        seen[real] = w
        st = _stat(w.path)
        hit = inputs.get((st.st_dev, st.st_ino)) if st is not None else None
        hit = hit or resolved.get(real)
        if hit is not None:
            raise RattaInputError(
                f"{w.flag} {w.path}: is the input {hit.flag} {hit.path}; "
                "an output must not replace an input"
            )
        for tree, r in trees:
            if _inside(real, tree):
                raise RattaInputError(
                    f"{w.flag} {w.path}: lies inside the input {r.flag} {r.path}; "
                    "write outputs outside the folders a command reads"
                )
        if w.kind == "scratch":
            for path, r in resolved.items():
                if _inside(path, real):
                    raise RattaInputError(
                        f"{w.flag} {w.path}: holds the input {r.flag} {r.path}, and this "
                        "working folder is deleted at the end; move the input out of it"
                    )
        if st is not None:
            _check_existing(w, st)
        else:
            _check_creatable(w)


def _check_existing(w: Write, st: os.stat_result) -> None:
    fmt = stat.S_IFMT(st.st_mode)
    if fmt in _KIND_NAMES:
        raise RattaInputError(
            f"{w.flag} {w.path}: is {_KIND_NAMES[fmt]}, not a regular file; "
            "ratta writes regular files only"
        )
    if w.kind == "dir":
        raise RattaInputError(f"{w.flag} {w.path}: already exists; choose a new path or delete it")
    if w.kind == "file" and stat.S_ISDIR(st.st_mode):
        raise RattaInputError(f"{w.flag} {w.path}: is a directory; give a file name")
    if w.kind in ("folder", "scratch") and not stat.S_ISDIR(st.st_mode):
        raise RattaInputError(f"{w.flag} {w.path}: exists and is not a folder")
    where = w.path if w.kind in ("folder", "scratch") else w.path.absolute().parent
    if not os.access(where, os.W_OK):
        raise RattaInputError(f"{w.flag} {w.path}: folder {where} is not writable")


def _check_creatable(w: Write) -> None:
    base = _nearest_existing(w.path)
    if not base.is_dir():
        raise RattaInputError(f"{w.flag} {w.path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RattaInputError(f"{w.flag} {w.path}: folder {base} is not writable")


def make_parents(writes: Iterable[Write]) -> list[Path]:
    """Create the missing parent folders of ``writes`` (and ``folder`` writes themselves);
    returns the folders created, outermost first."""
    created: list[Path] = []
    for w in writes:
        target = w.path.absolute() if w.kind == "folder" else w.path.absolute().parent
        missing = [p for p in (target, *target.parents) if not p.exists()][::-1]
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RattaInputError(
                f"{w.flag} {w.path}: cannot create folder {target} ({exc.strerror})"
            ) from None
        created += missing
    return created


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders of ``folders`` that are empty, innermost first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# ------------------------------------------------------------------------------ locks

_held: dict[str, int] = {}  # lock path -> depth: a process may claim an output it holds
_held_guard = threading.Lock()


def lock_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).absolute()
    return p.parent / f".{p.name}.lock"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 64, 0).decode().strip()
        if text:
            return f" (pid {int(text)})"
    return ""


@contextlib.contextmanager
def output_lock(
    path: str | os.PathLike[str], flag: str = "--out", *, wait: bool = False
) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path`` for the duration; re-entrant within a process.

    The lock file is removed on release; one left by a killed process is reused (the
    kernel released its lock).
    """
    lock = lock_path(path)
    key = str(lock)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = _acquire(lock, flag, path, wait)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, flag: str, path: str | os.PathLike[str], wait: bool) -> int:
    umask = current_umask()
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask)
        except OSError as exc:
            raise RattaInputError(f"{flag} {path}: cannot create {lock} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise OutputBusyError(
                    f"{flag} {path}: another ratta process{holder} is writing it; wait for "
                    "it to finish or choose another path"
                ) from None
            if not announced:
                print(
                    f"ratta: waiting for another process{holder} writing {path}",
                    file=sys.stderr,
                )
                announced = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The previous holder unlinks the file on release: if ours is no longer the file at
        # that path, another process may already lock the new one; start again.
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (mine.st_dev, mine.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


# ------------------------------------------------------------------------------ debris

# Temporary names beside a target: tempfile's 8 random characters, then ".tmp".
_TMP = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"


def temporary_name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(_TMP.format(name=re.escape(name)))


def remove_debris(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it; returns what was removed.

    Only call while holding the output's lock: then no live process is writing these.
    """
    p = Path(path).absolute()
    pattern = temporary_name_pattern(p.name)
    removed = []
    try:
        entries = list(os.scandir(p.parent))
    except OSError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name):
            debris = p.parent / entry.name
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(debris, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    debris.unlink()
            removed.append(debris)
    return removed


@contextlib.contextmanager
def claim(
    writes: Sequence[Write], reads: Iterable[Read] = (), *, wait: bool = False
) -> Iterator[None]:
    """Check ``writes`` against ``reads``, create missing parent folders, lock the first
    write and clear the debris of killed writers; then run the command's work.

    If the work fails, the folders created here are removed again when empty, so that
    bad input leaves nothing behind.
    """
    check_writes(writes, list(reads))
    if not writes:
        yield
        return
    created = make_parents(writes)
    try:
        with output_lock(writes[0].path, writes[0].flag, wait=wait):
            for w in writes:
                remove_debris(w.path)
            yield
    except BaseException:
        remove_empty(created)
        raise


Plan = Callable[..., tuple[Sequence[Write], Iterable[Read]]]


def guarded(plan: Plan) -> Callable[[F], F]:
    """Run the decorated function inside :func:`claim` of what ``plan`` says it writes
    and reads; ``plan`` receives the function's arguments by name (defaults applied)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            writes, reads = plan(**bound.arguments)
            with claim(writes, reads):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
