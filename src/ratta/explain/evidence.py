"""What an explanation shows, read from the files of a run and checked against each other.

The predictions file of ``ratta adapt --save-retrieved`` holds, per test image, the numbers
of every step: zero-shot p0, the K_D top description rows and their scores, the surviving
candidates, the K_S database rows retrieved for each, OT distances, relevances, lambda and
the final prediction. The features file tells which split image each row is, the text
file which class owns each description row (and its text), the database what each
retrieved row shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratta.config import RATTAConfig
from ratta.datasets import Split, load_split
from ratta.db import inspect_database
from ratta.errors import RattaInputError
from ratta.explain.pictures import DatabasePictures, Picture
from ratta.files import FeatureReader, TextFeatures, load_text
from ratta.files.predictions import PROBABILITIES, Predictions, load_predictions
from ratta.guard import Read

TOP_ZERO_SHOT = 5


@dataclass(frozen=True)
class Description:
    row: int
    score: float
    text: str


@dataclass(frozen=True)
class Candidate:
    """A surviving class of one test image and what it rests on."""

    label: int
    name: str
    relevance: float
    ot_distance: float
    descriptions: list[Description]
    """The top description rows it owns, best score first."""
    retrieved: list[int]
    """Its K_S database rows, nearest first."""
    pictures: list[Picture]


@dataclass(frozen=True)
class Explanation:
    """One test image: every number from zero-shot to the final decision."""

    row: int
    split_position: int | None
    label: int | None
    test: Picture
    zero_shot: list[tuple[int, float]]
    """The top-5 classes of p0 with their probabilities."""
    retrieval: tuple[int, float]
    final: tuple[int, float]
    lam: float
    entropy_zero_shot: float
    entropy_retrieval: float
    top: list[tuple[Description, int]]
    """The K_D top description rows with their classes, best score first."""
    candidates: list[Candidate]
    """By relevance, most relevant first."""

    @property
    def changed(self) -> bool:
        return self.final[0] != self.zero_shot[0][0]

    def to_dict(self, names: list[str]) -> dict[str, Any]:
        """The numbers of the explanation as JSON (classes as ids and names)."""

        def cls(k: int, p: float) -> dict[str, Any]:
            return {"class": k, "name": names[k], "p": p}

        return {
            "row": self.row,
            "split_position": self.split_position,
            "test_image": self.test.to_dict(),
            "label": self.label,
            "zero_shot_top5": [cls(k, p) for k, p in self.zero_shot],
            "retrieval": cls(*self.retrieval),
            "final": cls(*self.final),
            "changed": self.changed,
            "lam": self.lam,
            "entropy_zero_shot": self.entropy_zero_shot,
            "entropy_retrieval": self.entropy_retrieval,
            "candidates": [
                {
                    "class": c.label,
                    "name": c.name,
                    "relevance": c.relevance,
                    "ot_distance": c.ot_distance,
                    "descriptions": [vars(d) for d in c.descriptions],
                    "retrieved": [
                        {"row": r, **p.to_dict()}
                        for r, p in zip(c.retrieved, c.pictures, strict=True)
                    ],
                }
                for c in self.candidates
            ],
        }


@dataclass
class Evidence:
    """The opened, mutually consistent inputs of ``ratta explain``."""

    predictions: Predictions
    text: TextFeatures
    positions: np.ndarray
    """[N] the position in the split of each row."""
    split: Split | None
    database: DatabasePictures
    reads: list[Read]

    @property
    def class_names(self) -> list[str]:
        return self.predictions.class_names

    @property
    def config(self) -> dict[str, Any]:
        return {**RATTAConfig().to_dict(), **self.predictions.config}

    @cached_property
    def changed_rows(self) -> list[int]:
        """The rows where RA-TTA's top-1 differs from zero-shot's."""
        preds = self.predictions
        return (preds.top1("final") != preds.top1("zero_shot")).nonzero().flatten().tolist()

    def explain(self, row: int) -> Explanation:
        t = {key: value[row] for key, value in self.predictions.tensors.items()}
        for key in PROBABILITIES:
            t[key] = self.predictions.rows(key, row, row + 1)[0]
        names = self.class_names
        order = sorted(
            zip(t["top_descriptions"].tolist(), t["top_description_scores"].tolist(), strict=True),
            key=lambda ms: (-ms[1], ms[0]),
        )
        texts = self.text.desc_texts
        top = [
            (
                Description(m, s, texts[m] if texts else f"description row {m}"),
                int(self.text.desc_class[m]),
            )
            for m, s in order
        ]
        candidates = []
        for slot in t["relevance"].argsort(descending=True, stable=True).tolist():
            label = int(t["candidates"][slot])
            if label < 0:
                continue
            rows = t["retrieved"][slot]
            rows = rows[rows >= 0].numpy()
            candidates.append(
                Candidate(
                    label,
                    names[label],
                    float(t["relevance"][slot]),
                    float(t["ot_distance"][slot]),
                    [d for d, c in top if c == label],
                    rows.tolist(),
                    self.database.pictures(rows),
                )
            )
        p0 = t["zero_shot"]
        best = p0.topk(min(TOP_ZERO_SHOT, p0.shape[0]))
        position = int(self.positions[row])
        return Explanation(
            row=row,
            split_position=position,
            label=int(t["labels"]) if "labels" in t else None,
            test=self._test_picture(position),
            zero_shot=list(zip(best.indices.tolist(), best.values.tolist(), strict=True)),
            retrieval=_top1(t["retrieval"]),
            final=_top1(t["final"]),
            lam=float(t["lam"]),
            entropy_zero_shot=float(t["entropy_zero_shot"]),
            entropy_retrieval=float(t["entropy_retrieval"]),
            top=top,
            candidates=candidates,
        )

    def _test_picture(self, position: int) -> Picture:
        if self.split is None:
            return Picture(f"split position {position}", missing="no --data-root given")
        path = self.split.items[position][0]
        name = os.path.relpath(path, self.split.base) if self.split.base else str(path)
        return Picture(name, image=path)


def _top1(p: torch.Tensor) -> tuple[int, float]:
    value, index = p.max(0)
    return int(index), float(value)


def gather(
    predictions: str | os.PathLike[str],
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    class_names: str | os.PathLike[str] | None = None,
) -> Evidence:
    """Open the four files (and the split), checking that they belong together: one line
    naming the file that does not, before anything is drawn."""
    preds = load_predictions(predictions, retrieved=True)
    tensors = preds.tensors
    n = preds.num_images
    reader = FeatureReader(features)
    try:
        if reader.num_images != n:
            raise RattaInputError(
                f"{predictions} holds {n} test images but {features} holds "
                f"{reader.num_images}: the predictions come from other features"
            )
        labels = reader.labels
        if (
            labels is not None
            and preds.labels is not None
            and not torch.equal(labels, preds.labels)
        ):
            raise RattaInputError(
                f"{predictions}: its labels differ from those of {features}: the predictions "
                "come from other features"
            )
        positions = (reader.index if reader.index is not None else torch.arange(n)).numpy()
        source = reader.source
    finally:
        reader.close()
    txt = load_text(text)
    if txt.class_names != preds.class_names:
        raise RattaInputError(
            f"{predictions}: its class names differ from those of {text} "
            f"({len(preds.class_names)} and {txt.num_classes} classes)"
        )
    _check_descriptions(preds, txt, text)
    rows = inspect_database(db).count
    if int(tensors["retrieved"].max()) >= rows:
        raise RattaInputError(
            f"{predictions} retrieved row {int(tensors['retrieved'].max())} but {db} has "
            f"{rows} rows: the predictions come from another database"
        )
    split = None
    reads = Read.of(predictions, "--predictions") + Read.of(features, "--features")
    reads += Read.of(text, "--text") + Read.of(db, "--db")
    if data_root is not None:
        split = _split(source, features, data_root, dataset, class_names, positions)
        reads += split.reads()
    return Evidence(preds, txt, positions, split, DatabasePictures(db), reads)


def _check_descriptions(
    preds: Predictions, txt: TextFeatures, text: str | os.PathLike[str]
) -> None:
    """The candidates must be the classes owning min_desc of the top description rows."""
    tensors = preds.tensors
    top = tensors["top_descriptions"]
    if top.numel() and (int(top.min()) < 0 or int(top.max()) >= txt.desc.shape[0]):
        raise RattaInputError(
            f"{preds.path}: top description rows reach {int(top.max())} but {text} has "
            f"{txt.desc.shape[0]}: the predictions come from another text file"
        )
    min_desc = int(preds.config.get("min_desc", RATTAConfig().min_desc))
    owned = torch.zeros(top.shape[0], txt.num_classes, dtype=torch.int64)
    owned.scatter_add_(1, txt.desc_class[top], torch.ones_like(top))
    candidates = tensors["candidates"]
    # empty slots (-1) all mark an extra column, which is dropped
    cols = torch.where(candidates >= 0, candidates, txt.num_classes)
    listed = torch.zeros(top.shape[0], txt.num_classes + 1, dtype=torch.bool)
    listed.scatter_(1, cols, True)
    if not torch.equal(owned >= min_desc, listed[:, : txt.num_classes]):
        raise RattaInputError(
            f"{preds.path}: its candidates are not the classes owning {min_desc} of its top "
            f"description rows in {text}: the predictions come from another text file"
        )


def _split(
    source: dict[str, Any],
    features: str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    dataset: str | None,
    class_names: str | os.PathLike[str] | None,
    positions: np.ndarray,
) -> Split:
    """The split the features were extracted from, under ``data_root``."""
    name = dataset or source.get("dataset")
    if not name:
        raise RattaInputError(
            f"{features} does not name its dataset (not written by ratta extract); "
            "give --dataset with --data-root"
        )
    split = load_split(str(name), Path(data_root), csv_classes=class_names)
    if source.get("split") not in (None, split.fingerprint()):
        raise RattaInputError(
            f"--data-root {data_root}: the {name} split there is not the one {features} "
            "was extracted from (its images, labels or class names differ)"
        )
    if positions.size and int(positions.max()) >= len(split):
        raise RattaInputError(
            f"{features}: image positions reach {int(positions.max())} but the {name} split "
            f"under {data_root} has {len(split)} images"
        )
    return split


def select_rows(
    evidence: Evidence, images: list[int] | None, changed: bool, limit: int | None
) -> list[int]:
    """The rows to explain: ``images`` as given, or those RA-TTA changed; the first ``limit``."""
    n = evidence.predictions.num_images
    if (images is None) == (not changed):
        raise RattaInputError("choose the test images: --images I [I ...] or --changed")
    if limit is not None and limit < 1:
        raise RattaInputError(f"--limit must be >= 1, got {limit}")
    if images is not None:
        for i in images:
            if not 0 <= i < n:
                raise RattaInputError(
                    f"--images {i}: out of range; {evidence.predictions.path} holds {n} test "
                    f"images (0-{n - 1})"
                )
        twice = sorted({i for i in images if images.count(i) > 1})
        if twice:
            raise RattaInputError(f"--images: {', '.join(map(str, twice))} given twice")
        rows = list(images)
    else:
        rows = evidence.changed_rows
    return rows[:limit] if limit is not None else rows
