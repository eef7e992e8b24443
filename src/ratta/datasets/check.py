"""Is each dataset under the data root, complete, and are its listed image files there?"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ratta.datasets.registry import DATASETS, DatasetInfo
from ratta.datasets.split import first_missing, load_split
from ratta.errors import RattaInputError


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found for one dataset.

    Attributes:
        name: dataset name.
        info: its registry entry (expected counts, layout, source).
        missing_path: first required folder or file that does not exist; None when all do.
        error: why the split files could not be read (malformed); None when they could.
        count: test images listed by the split; None when not read.
        classes: classes of the split; None when not read.
        missing_files: listed image files that do not exist; None when not read.
        first_missing_file: the first of them.
    """

    name: str
    info: DatasetInfo
    missing_path: Path | None = None
    error: str | None = None
    count: int | None = None
    classes: int | None = None
    missing_files: int | None = None
    first_missing_file: Path | None = None

    @property
    def found(self) -> bool:
        return self.missing_path is None

    @property
    def complete(self) -> bool:
        """Found, readable, every listed file present, and the known counts met."""
        known = self.info.test_count
        return (
            self.found
            and self.error is None
            and self.missing_files == 0
            and (known is None or self.count == known)
            and self.classes == self.info.num_classes
        )


def _check_one(root: Path, info: DatasetInfo) -> CheckResult:
    missing = first_missing(info, root)
    if missing is not None:
        return CheckResult(info.name, info, missing_path=missing)
    try:
        split = load_split(info.name, root)
    except RattaInputError as exc:
        return CheckResult(info.name, info, error=str(exc))
    absent = [p for p, _ in split.items if not p.is_file()]
    return CheckResult(
        info.name,
        info,
        count=len(split),
        classes=len(split.class_names),
        missing_files=len(absent),
        first_missing_file=absent[0] if absent else None,
    )


def check(root: str | Path, names: Sequence[str] | None = None) -> list[CheckResult]:
    """Check the datasets ``names`` (default: all 17) under the data root ``root``.

    Image files are counted (``is_file``), not decoded.
    """
    base = Path(os.path.abspath(root))
    if not base.is_dir():
        raise RattaInputError(f"{base}: data root not found (expected the folder of the datasets)")
    wanted = list(names) if names is not None else list(DATASETS)
    unknown = [n for n in wanted if n not in DATASETS]
    if unknown:
        raise RattaInputError(f"unknown dataset '{unknown[0]}' (known: {', '.join(DATASETS)})")
    return [_check_one(base, DATASETS[n]) for n in wanted]
