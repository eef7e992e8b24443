"""``ratta db audit``: test images that also sit in the database (leakage), per class.

A web-scale database can contain the test images themselves (or resized copies); retrieving
them would let RA-TTA look at the answer. The audit compares every test image's center-crop
embedding (``image`` of a features file) with every database row by cosine similarity,
streaming over the shards, and flags the pairs at or above a threshold. ``write_clean``
copies the database without the flagged rows, with a manifest that records the audit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ratta.backbones import cached_file_hash
from ratta.db.index import IndexSettings
from ratta.db.sources import COLUMNS, open_source
from ratta.db.store import BLOCK_ROWS, EXACT, Database, Manifest
from ratta.db.writer import DatabaseWriter, new_database
from ratta.errors import RattaInputError
from ratta.files import (
    FeatureReader,
    check_embeddings,
    load_text,
    warn_renormalised,
    write_json,
)
from ratta.guard import Read, Write, guarded
from ratta.progress import Progress, progress_bar, within

# Elements of one [test images, rows] similarity block: cache-sized, as the exact scan.
_SIM_BLOCK = 1 << 22


@dataclass
class AuditReport:
    """Flagged (test image, database row, cosine) pairs and their summary per class."""

    threshold: float
    images: int
    rows: int
    pairs: list[tuple[int, int, float]]
    class_names: list[str]
    per_class: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flagged_rows(self) -> np.ndarray:
        return np.unique(np.array([r for _, r, _ in self.pairs], dtype=np.int64))

    @property
    def flagged_images(self) -> np.ndarray:
        return np.unique(np.array([i for i, _, _ in self.pairs], dtype=np.int64))

    def to_dict(self, max_pairs: int | None = None) -> dict[str, Any]:
        pairs = self.pairs if max_pairs is None else self.pairs[:max_pairs]
        return {
            "threshold": self.threshold,
            "test_images": self.images,
            "database_rows": self.rows,
            "flagged_images": int(self.flagged_images.size),
            "flagged_rows": int(self.flagged_rows.size),
            "per_class": self.per_class,
            "pairs": [{"image": i, "row": r, "cosine": round(c, 5)} for i, r, c in pairs],
        }


def _read_test_images(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated center-crop embeddings [N, d] (float32) and labels of a features file."""
    reader = FeatureReader(path)
    labels = reader.labels
    reader.close()
    with safe_open(str(path), framework="pt") as f:
        image = f.get_tensor("image")
    image, fixed = check_embeddings(image, path, "image")
    warn_renormalised(path, "image", fixed)
    return image.float(), labels


def find_duplicates(
    db: str | os.PathLike[str],
    features: str | os.PathLike[str],
    threshold: float = 0.95,
    *,
    text: str | os.PathLike[str] | None = None,
    progress: Progress = False,
) -> AuditReport:
    """Pairs (test image, database row) with cosine >= ``threshold``, summarised per class.

    Classes are the features file's labels, named by the text file's class names when
    given; without labels every image counts under one class ``all``.
    """
    if not -1 <= threshold <= 1:
        raise RattaInputError(f"--threshold must be a cosine in [-1, 1], got {threshold}")
    features = Path(features)
    image, labels = _read_test_images(features)
    source = open_source(db)
    if source.dim != image.shape[1]:
        raise RattaInputError(
            f"{features}: test embeddings have dimension {image.shape[1]} but the database "
            f"{db} has {source.dim}"
        )
    names: list[str]
    if labels is None:
        names = ["all"]
        labels = torch.zeros(image.shape[0], dtype=torch.int64)
    elif text is not None:
        names = load_text(text).class_names
        if int(labels.max()) >= len(names):
            raise RattaInputError(
                f"{features}: key 'labels' has values up to {int(labels.max())} but {text} "
                f"names {len(names)} classes"
            )
    else:
        names = [str(c) for c in range(int(labels.max()) + 1)]
    if int(labels.min()) < 0:
        raise RattaInputError(f"{features}: key 'labels' has negative values")

    step = max(256, _SIM_BLOCK // image.shape[0])
    pairs: list[tuple[int, int, float]] = []
    start = 0
    bar = progress_bar(progress, "audit", total=source.rows, unit="row")
    for shard in source.shards():
        for s in range(0, shard.rows, BLOCK_ROWS):
            rows = torch.from_numpy(np.asarray(shard.embeddings[s : s + BLOCK_ROWS], np.float32))
            rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-12)
            for p in range(0, rows.shape[0], step):
                sims = image @ rows[p : p + step].T
                hit_i, hit_r = (sims >= threshold).nonzero(as_tuple=True)
                for i, r in zip(hit_i.tolist(), hit_r.tolist(), strict=True):
                    pairs.append((i, start + s + p + r, float(sims[i, r])))
            bar.update(rows.shape[0])
        start += shard.rows
    bar.close()
    pairs.sort()
    report = AuditReport(threshold, image.shape[0], source.rows, pairs, names)
    report.per_class = _per_class(pairs, labels, names)
    return report


def _per_class(
    pairs: list[tuple[int, int, float]], labels: torch.Tensor, names: list[str]
) -> list[dict[str, Any]]:
    images: list[set[int]] = [set() for _ in names]
    rows: list[set[int]] = [set() for _ in names]
    for i, r, _ in pairs:
        c = int(labels[i])
        images[c].add(i)
        rows[c].add(r)
    totals = torch.bincount(labels, minlength=len(names)).tolist()
    return [
        {
            "class": c,
            "name": names[c],
            "test_images": totals[c],
            "images_with_duplicates": len(images[c]),
            "flagged_rows": len(rows[c]),
        }
        for c in range(len(names))
    ]


def _plan(
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    features: str | os.PathLike[str] | None,
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    reads = Read.of(db, "--db") + Read.of(features, "--features")
    return new_database(out, reads, "--write-clean")


@guarded(_plan)
def write_clean(
    db: str | os.PathLike[str],
    report: AuditReport,
    out: str | os.PathLike[str],
    *,
    features: str | os.PathLike[str] | None = None,
    index: IndexSettings | None = None,
    progress: Progress = False,
) -> Manifest:
    """Copy ``db`` without the flagged rows; the manifest records the audit.

    ``index`` defaults to the source database's index spec and search parameters.
    """
    source = open_source(db)
    if source.rows != report.rows:
        raise RattaInputError(
            f"{db}: has {source.rows} rows but the audit report covers {report.rows}"
        )
    flagged = report.flagged_rows
    backbone = None
    classes = False
    if source.format == "ratta":
        parent = Database(source.path).manifest
        backbone = parent.backbone
        classes = "classes" in ((parent.metadata or {}).get("columns") or [])
        if index is None and parent.index.get("spec", EXACT) != EXACT:
            index = IndexSettings(
                spec=parent.index["spec"], search_params=parent.index.get("search_params")
            )
    dtype = "float16" if source.dtypes == {np.dtype(np.float16)} else "float32"
    columns = (*COLUMNS, "classes") if classes else COLUMNS
    with DatabaseWriter(
        out, dim=source.dim, dtype=dtype, classes=classes, backbone=backbone
    ) as writer:
        start = 0
        for shard in source.shards():
            lo, hi = np.searchsorted(flagged, [start, start + shard.rows])
            drop = flagged[lo:hi] - start
            keep = np.setdiff1d(np.arange(shard.rows, dtype=np.int64), drop)
            meta = shard.metadata(columns)
            for s in range(0, keep.size, BLOCK_ROWS):
                rows = keep[s : s + BLOCK_ROWS]
                writer.add(
                    np.asarray(shard.embeddings[rows]),
                    meta.take(rows),
                    source=str(shard.file),
                    rows=rows,
                )
            start += shard.rows
        audit = report.to_dict(max_pairs=1000)
        audit["features"] = str(features) if features else None
        if features:
            audit["features_sha256"] = cached_file_hash(features)
        return writer.commit(
            {"operation": "audit-clean", "sources": [source.provenance()], "audit": audit},
            index,
            progress=within(progress, "index"),
        )


def _audit_plan(
    db: str | os.PathLike[str],
    features: str | os.PathLike[str],
    text: str | os.PathLike[str] | None,
    report: str | os.PathLike[str] | None,
    clean: str | os.PathLike[str] | None,
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    reads = Read.of(db, "--db") + Read.of(features, "--features") + Read.of(text, "--text")
    writes = [Write.of(report, "--report")] if report is not None else []
    if clean is not None:
        writes += new_database(clean, reads, "--write-clean")[0]
    return writes, reads


@guarded(_audit_plan)
def audit(
    db: str | os.PathLike[str],
    features: str | os.PathLike[str],
    threshold: float = 0.95,
    *,
    text: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    clean: str | os.PathLike[str] | None = None,
    index: IndexSettings | None = None,
    progress: Progress = False,
) -> tuple[AuditReport, Manifest | None]:
    """``ratta db audit``: :func:`find_duplicates`, then the JSON ``report`` and the
    ``clean`` copy if asked; every output is checked before the search starts."""
    found = find_duplicates(db, features, threshold, text=text, progress=progress)
    if report is not None:
        write_json(report, found.to_dict())
    manifest = None
    if clean is not None:
        manifest = write_clean(db, found, clean, features=features, index=index, progress=progress)
    return found, manifest
