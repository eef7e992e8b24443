"""Test splits as lists of (image path, label) with class names: the input of feature extraction."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ratta.datasets.readers import READERS, Items, read_csv, read_folder
from ratta.datasets.registry import DATASETS, DatasetInfo
from ratta.errors import RattaInputError
from ratta.guard import Read


@dataclass(frozen=True)
class Split:
    """One test split.

    Attributes:
        name: dataset name (a key of :data:`DATASETS`, ``folder`` or ``csv``).
        items: ``(absolute image path, label)`` in the split's test order.
        class_names: names in label order, ``_`` replaced by a space.
        base: the folder the fingerprint takes image paths relative to (the dataset folder,
            the user's folder, the CSV's folder); None: absolute paths.
        root: the data root the split was read from (resolved).
        files: the metadata files read (split file, class-name lists, the CSV).
    """

    name: str
    items: list[tuple[Path, int]]
    class_names: list[str]
    base: Path | None = None
    root: Path | None = None
    files: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def reads(self) -> list[Read]:
        """Everything the split reads: the data root as a whole, its files, every image."""
        reads = [*Read.of(self.root, "--data-root", tree=bool(self.root and self.root.is_dir()))]
        reads += [Read(f, "split file") for f in self.files]
        return reads + [Read(path, "image") for path, _ in self.items]

    def fingerprint(self) -> str:
        """SHA-256 over the relative image paths, labels and class names, in order.

        Identifies the split for caches: the same split under another data root has the same
        fingerprint; a moved, added or relabelled image, or a renamed class, changes it.
        """
        h = hashlib.sha256(b"ratta-split-v1\n")
        h.update(json.dumps(self.class_names).encode() + b"\n")
        for path, label in self.items:
            rel = Path(os.path.relpath(path, self.base)) if self.base else path
            h.update(json.dumps([rel.as_posix(), label]).encode() + b"\n")
        return h.hexdigest()


def first_missing(info: DatasetInfo, root: Path) -> Path | None:
    """The first of the dataset's required paths under ``root`` that does not exist."""
    return next((root / p for p in info.required if not (root / p).exists()), None)


def _registered(name: str, root: Path) -> tuple[Items, list[str], Path]:
    info = DATASETS[name]
    missing = first_missing(info, root)
    if missing is not None:
        raise RattaInputError(
            f"{missing} not found: {name} expects {info.layout} under the data root; {info.source}"
        )
    items, names = READERS[info.reader](root, info)
    renames = dict(info.renames)
    return items, [renames.get(n, n) for n in names], root / info.folder


def _folder(root: Path, _: Path | None) -> tuple[Items, list[str], Path]:
    return (*read_folder(root), root)


def _csv(root: Path, classes: Path | None) -> tuple[Items, list[str], Path]:
    if classes is None:
        raise RattaInputError(
            "csv datasets need csv_classes: a class-names file, one name per line in label order"
        )
    return (*read_csv(root, classes), root.parent)


_CUSTOM_READERS: dict[str, Callable[[Path, Path | None], tuple[Items, list[str], Path]]] = {
    "folder": _folder,
    "csv": _csv,
}


def load_split(name: str, root: str | Path, *, csv_classes: str | Path | None = None) -> Split:
    """The test split of ``name``.

    Args:
        name: one of :data:`DATASETS` (``root`` = the data root holding the dataset folders),
            ``folder`` (``root`` = a folder ``<class>/<image>``; classes sorted, every non-hidden
            file kept) or ``csv`` (``root`` = a CSV of ``path,label`` rows).
        root: see ``name``.
        csv_classes: for ``csv``, the class-names file (one name per line, in label order).

    Raises:
        RattaInputError: unknown name, missing folder or file, malformed split file.
    """
    base = Path(os.path.abspath(root))
    if csv_classes is not None and name != "csv":
        raise RattaInputError(
            f"csv_classes is for csv datasets only; '{name}' takes its class names from its files"
        )
    if name in DATASETS:
        items, names, folder = _registered(name, base)
        files = tuple(base / f for f in DATASETS[name].files)
    elif name in _CUSTOM_READERS:
        classes = Path(os.path.abspath(csv_classes)) if csv_classes is not None else None
        items, names, folder = _CUSTOM_READERS[name](base, classes)
        files = (base, classes) if name == "csv" and classes is not None else ()
    else:
        known = ", ".join((*DATASETS, *_CUSTOM_READERS))
        raise RattaInputError(f"unknown dataset '{name}' (known: {known})")
    names = [n.replace("_", " ") for n in names]
    return Split(name, items, names, folder, Path(os.path.realpath(base)), files)


def class_names(name: str, root: str | Path, *, csv_classes: str | Path | None = None) -> list[str]:
    """Class names of ``name``'s test split in label order (see :func:`load_split`)."""
    return load_split(name, root, csv_classes=csv_classes).class_names
