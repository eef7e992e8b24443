"""Readers of the split formats: each returns the test items and the class names in label order.

A reader trusts that the paths of :attr:`DatasetInfo.required` exist (``load_split`` checks them)
and raises one-line :class:`RattaInputError` for malformed metadata. Image files are listed, never
opened: a file that does not decode is for the feature extractor to report.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

from ratta.datasets.registry import DatasetInfo
from ratta.errors import RattaInputError

Items = list[tuple[Path, int]]
Reader = Callable[[Path, DatasetInfo], tuple[Items, list[str]]]

_SPLIT_KEYS = ("train", "val", "test")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RattaInputError(f"{path}: cannot read ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line.strip()


def _pairs(path: Path, what: str) -> dict[str, str]:
    """``<key> <value>`` lines as an ordered dict; ``what`` names the value in errors."""
    out: dict[str, str] = {}
    for number, line in _lines(path):
        parts = line.split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise RattaInputError(f"{path}: line {number} is not '<id> <{what}>'")
        if parts[0] in out:
            raise RattaInputError(f"{path}: line {number} repeats id '{parts[0]}'")
        out[parts[0]] = parts[1].strip()
    return out


def _visible(folder: Path) -> list[os.DirEntry[str]]:
    """Entries of ``folder`` without hidden ones (names starting with '.'), sorted by name."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise RattaInputError(f"{folder}: cannot list ({exc.strerror})") from None


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    return [e.name for e in _visible(folder) if e.is_dir()]


def files_below(folder: Path, _above: frozenset[tuple[int, int]] = frozenset()) -> list[Path]:
    """Every non-hidden file below ``folder``, depth first in name order.

    No extension filter: anything that is not a folder is kept (a broken link too, so that
    ``check`` counts it as missing rather than the split silently shrinking). Folder links
    are followed; one that leads back to a folder above it is an error, not a loop.
    """
    try:
        st = folder.stat()
    except OSError as exc:
        raise RattaInputError(f"{folder}: cannot list ({exc.strerror})") from None
    here = (st.st_dev, st.st_ino)
    if here in _above:
        raise RattaInputError(f"{folder}: a folder link that loops back to a folder above it")
    above = _above | {here}
    out: list[Path] = []
    for entry in _visible(folder):
        path = folder / entry.name
        if entry.is_dir():
            out.extend(files_below(path, above))
        else:
            out.append(path)
    return out


def _contiguous(names: dict[int, str], where: Path) -> list[str]:
    missing = next((i for i in range(len(names)) if i not in names), None)
    if missing is not None:
        raise RattaInputError(f"{where}: labels are not 0..{len(names) - 1} (no label {missing})")
    return [names[i] for i in range(len(names))]


def _is_row(row: object) -> bool:
    """Whether ``row`` is ``[image path, integer label, class name]``."""
    return (
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and type(row[1]) is int
        and isinstance(row[2], str)
    )


def read_coop_json(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """CoOp/Dassl ``split_*.json``: ``{"train"|"val"|"test": [[impath, label, classname], ...]}``.

    Items are the ``test`` rows in file order, ``impath`` taken relative to the image folder.
    Class names come from the rows of all three lists (one name per label, labels 0..K-1).
    """
    path = root / info.files[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RattaInputError(f"{path}: not a readable JSON split file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("test"), list):
        raise RattaInputError(f"{path}: expected a JSON object with a 'test' list")
    pattern = re.compile(info.name_pattern) if info.name_pattern else None
    names: dict[int, str] = {}
    for key in (k for k in _SPLIT_KEYS if isinstance(data.get(k), list)):
        for i, row in enumerate(data[key]):
            if not _is_row(row):
                raise RattaInputError(
                    f"{path}: {key}[{i}] is not [image path, integer label, class name]"
                )
            name = row[2]
            if pattern is not None:
                match = pattern.fullmatch(name)
                if match is None:
                    raise RattaInputError(
                        f"{path}: {key}[{i}] class '{name}' does not match '{info.name_pattern}'"
                    )
                name = match.group(1)
            if names.setdefault(row[1], name) != name:
                raise RattaInputError(
                    f"{path}: label {row[1]} is named both '{names[row[1]]}' and '{name}'"
                )
    ordered = _contiguous(names, path)
    dropped = sorted(label for label, name in enumerate(ordered) if name in info.drop)
    images = root / info.images
    items = [
        (images / impath, label - bisect.bisect(dropped, label))
        for impath, label, _ in data["test"]
        if label not in dropped
    ]
    return items, [n for n in ordered if n not in info.drop]


def read_fgvc_txt(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """FGVC-Aircraft: names from ``variants.txt`` (label = line), test rows ``<id> <variant>``."""
    variants_path, test_path = (root / f for f in info.files)
    variants = [line for _, line in _lines(variants_path)]
    label_of = {v: i for i, v in enumerate(variants)}
    images = root / info.images
    items: Items = []
    for number, line in _lines(test_path):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise RattaInputError(
                f"{test_path}: line {number} variant '{variant}' is not in {variants_path.name}"
            )
        items.append((images / f"{image_id}.jpg", label_of[variant]))
    return items, variants


def packaged_class_names(file: str) -> list[str]:
    """Class names kept as package data (``ratta/datasets/classnames/<file>``), one per line."""
    text = resources.files("ratta.datasets").joinpath("classnames", file).read_text("utf-8")
    return [line for line in text.splitlines() if line]


def read_cub_txt(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """CUB-200-2011: rows of ``images.txt`` (in order) whose ``train_test_split.txt`` flag is 0.

    Labels are ``image_class_labels.txt`` ids minus one; ``classes.txt`` fixes the class count.
    The names are the reference code's list (package data), in class-id order.
    """
    images_txt, labels_txt, split_txt, classes_txt = (root / f for f in info.files)
    paths = _pairs(images_txt, "path")
    labels = _pairs(labels_txt, "class id")
    is_train = _pairs(split_txt, "0 or 1")
    classes = _pairs(classes_txt, "class name")
    names = packaged_class_names(info.class_names_file)
    if set(classes) != {str(i) for i in range(1, len(names) + 1)}:
        raise RattaInputError(f"{classes_txt}: expected class ids 1..{len(names)}")
    images = root / info.images
    items: Items = []
    for image_id, rel in paths.items():
        for table, where in ((labels, labels_txt), (is_train, split_txt)):
            if image_id not in table:
                raise RattaInputError(f"{where}: no line for image id {image_id}")
        flag = is_train[image_id]
        if flag not in ("0", "1"):
            raise RattaInputError(f"{split_txt}: image id {image_id} has flag '{flag}', not 0 or 1")
        if flag == "1":
            continue
        if labels[image_id] not in classes:
            raise RattaInputError(
                f"{labels_txt}: image id {image_id} has class id '{labels[image_id]}' "
                f"(not in {classes_txt.name})"
            )
        items.append((images / rel, int(labels[image_id]) - 1))
    return items, names


def read_resisc_txt(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """RESISC45 test list of file names ``<class>_<NNN>.jpg``, each in ``images/<class>/``.

    Labels index the sorted class names of the list (the reference code's sorted list).
    """
    path = root / info.files[0]
    rows: list[tuple[str, str]] = []
    for number, line in _lines(path):
        match = re.fullmatch(r"(.+)_\d+\.jpg", line)
        if match is None:
            raise RattaInputError(f"{path}: line {number} '{line}' is not '<class>_<NNN>.jpg'")
        rows.append((line, match.group(1)))
    names = sorted({c for _, c in rows})
    label_of = {c: i for i, c in enumerate(names)}
    images = root / info.images
    return [(images / c / f, label_of[c]) for f, c in rows], names


def imagenet_class_names(path: Path) -> dict[str, str]:
    """``classnames.txt`` of CoOp (CLIP's ImageNet names): ``<wnid> <name>`` lines, in order."""
    return _pairs(path, "class name")


def read_wnid_folders(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """ImageNet-style ``<wnid>/<image>`` folders: label = rank of the wnid among the folders.

    Names come from ImageNet's ``classnames.txt``, so IN-A and IN-R get their 200-class subsets
    in the reference code's (sorted wnid) order.
    """
    names_path = root / info.files[0]
    by_wnid = imagenet_class_names(names_path)
    images = root / info.images
    wnids = class_folders(images)
    if not wnids:
        raise RattaInputError(f"{images}: no class folders (expected {info.layout})")
    unknown = next((w for w in wnids if w not in by_wnid), None)
    if unknown is not None:
        raise RattaInputError(
            f"{images / unknown}: '{unknown}' is not a wnid of {names_path} "
            f"(expected {info.image_pattern} directly in {images})"
        )
    items = [(f, label) for label, w in enumerate(wnids) for f in files_below(images / w)]
    return items, [by_wnid[w] for w in wnids]


def read_index_folders(root: Path, info: DatasetInfo) -> tuple[Items, list[str]]:
    """ImageNetV2 folders ``0..999``: the folder number is the ImageNet label.

    Names are all of ``classnames.txt`` in file order, as in the reference's ImageNetV2 loader.
    """
    names = list(imagenet_class_names(root / info.files[0]).values())
    images = root / info.images
    folders = class_folders(images)
    if not folders:
        raise RattaInputError(f"{images}: no class folders (expected {info.layout})")
    labels = {str(i) for i in range(len(names))}
    bad = next((f for f in folders if f not in labels), None)
    if bad is not None:
        raise RattaInputError(
            f"{images / bad}: folder '{bad}' is not a label 0..{len(names) - 1} "
            f"(expected {info.image_pattern} directly in {images})"
        )
    return [(f, int(y)) for y in sorted(folders, key=int) for f in files_below(images / y)], names


READERS: dict[str, Reader] = {
    "coop_json": read_coop_json,
    "fgvc_txt": read_fgvc_txt,
    "cub_txt": read_cub_txt,
    "resisc_txt": read_resisc_txt,
    "wnid_folders": read_wnid_folders,
    "index_folders": read_index_folders,
}


def read_folder(folder: Path) -> tuple[Items, list[str]]:
    """A user's ``folder/<class>/<image>`` tree: classes sorted, label = rank of the class."""
    if not folder.is_dir():
        raise RattaInputError(f"{folder}: folder not found (expected <folder>/<class>/<image>)")
    classes = class_folders(folder)
    if not classes:
        raise RattaInputError(f"{folder}: no class folders (expected <folder>/<class>/<image>)")
    return [(f, y) for y, c in enumerate(classes) for f in files_below(folder / c)], classes


def read_names_file(path: Path) -> list[str]:
    """One class name per line, in label order; outer whitespace and blank lines ignored."""
    if not path.is_file():
        raise RattaInputError(f"{path}: class names file not found (one name per line)")
    names: dict[str, int] = {}
    for number, name in _lines(path):
        if name in names:
            raise RattaInputError(
                f"{path}: line {number} repeats class '{name}' (first on line {names[name]})"
            )
        names[name] = number
    if not names:
        raise RattaInputError(f"{path}: no class names (expected one name per line)")
    return list(names)


def read_csv(path: Path, names_path: Path) -> tuple[Items, list[str]]:
    """``path,label`` rows (an optional ``path,label`` header first); relative paths are taken
    from the CSV's folder; labels index the names file's lines."""
    if not path.is_file():
        raise RattaInputError(f"{path}: CSV file not found (expected 'path,label' rows)")
    names = read_names_file(names_path)
    items: Items = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RattaInputError(f"{path}: cannot read CSV ({exc})") from None
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or (number == 1 and cells == ["path", "label"]):
            continue
        if len(cells) != 2 or not cells[0]:
            raise RattaInputError(f"{path}: line {number} is not 'path,label'")
        try:
            label = int(cells[1])
        except ValueError:
            raise RattaInputError(
                f"{path}: line {number} label '{cells[1]}' is not an integer"
            ) from None
        if not 0 <= label < len(names):
            raise RattaInputError(
                f"{path}: line {number} label {label} is outside 0..{len(names) - 1} "
                f"({len(names)} names in {names_path})"
            )
        items.append((Path(os.path.normpath(path.parent / cells[0])), label))
    if not items:
        raise RattaInputError(f"{path}: no rows (expected 'path,label' rows)")
    return items, names
