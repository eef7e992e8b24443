"""Progress bars say which command shows them; the audit lists the classes with findings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from conftest import write_images

from ratta.cli import main
from ratta.cli.db import format_audit
from ratta.progress import label, within


def test_a_stage_inside_a_command_is_named_by_it() -> None:
    assert label(True, "extract") == "extract" and label("db build", "extract") == "db build"
    assert within("db build", "index") == "db build: index"
    assert within(True, "index") == "index" and within(False, "index") is False
    assert label(within("run", "text"), "text") == "run: text"


def _bars(err: str) -> set[str]:
    """The labels of the tqdm bars in ``err`` (``label: 100%|...``)."""
    lines = err.replace("\r", "\n").splitlines()
    return {line.split(": 100%")[0] for line in lines if ": 100%" in line}


def test_db_build_bars_name_db_build(tiny_clip, tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "imgs", 8, seed=1)
    argv = ["db", "build", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "db")]
    argv += ["--model-config", str(tiny_clip["config"])]
    argv += ["--pretrained", str(tiny_clip["checkpoint"])]
    argv += ["--workers", "0", "--index", "IVF2,Flat", "--eval-queries", "8"]
    assert main(argv) == 0
    assert _bars(capsys.readouterr().err) == {"db build", "db build: index"}


def _audit(per_class: list[tuple[str, int, int, int]]) -> SimpleNamespace:
    return SimpleNamespace(
        images=sum(c[1] for c in per_class),
        rows=100,
        threshold=0.95,
        flagged_images=np.arange(sum(c[2] for c in per_class)),
        flagged_rows=np.arange(sum(c[3] for c in per_class)),
        per_class=[
            {"name": n, "test_images": i, "images_with_duplicates": d, "flagged_rows": r}
            for n, i, d, r in per_class
        ],
    )


def test_the_audit_lists_classes_with_findings_and_all_with_all() -> None:
    report = _audit([("banded", 4, 0, 0), ("woven", 4, 2, 3), ("zigzag", 4, 0, 0)])
    lines = format_audit(report).splitlines()
    assert lines[0].startswith("12 test images x 100 database rows, cosine >= 0.95: 2 images")
    assert [line.split()[0] for line in lines[2:-1]] == ["woven"]
    assert lines[-1] == "2 classes without near-duplicates not listed (--all lists them)"
    every = format_audit(report, every_class=True).splitlines()
    assert [line.split()[0] for line in every[2:]] == ["banded", "woven", "zigzag"]
    clean = format_audit(_audit([("banded", 4, 0, 0)])).splitlines()
    assert clean[1:] == ["1 class without near-duplicates not listed (--all lists it)"]
