"""Why did RA-TTA change a prediction? ``ratta explain``: predictions -> pictures of the evidence.

For chosen test images, one PNG each (the test image, zero-shot's top-5, the surviving
candidates with their best descriptions and retrieved database images, OT distances,
relevances, lambda and the decision), an ``index.html`` showing them all (relative links
only) and ``explain.json`` (the same numbers). Modules:

- ``evidence``: the predictions, features, text and database files, checked against each
  other, and what each test image's explanation holds;
- ``pictures``: where the test image and each database row's image come from;
- ``render``: the PNG (fixed size) and the page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ratta.atomic import write_json, write_text_atomic
from ratta.explain.evidence import Explanation, gather, select_rows
from ratta.explain.render import HEIGHT, WIDTH, draw, page
from ratta.guard import Read, Write, claim
from ratta.progress import Progress, progress_bar
from ratta.provenance import stamp

__all__ = ["HEIGHT", "WIDTH", "explain"]


def explain(
    predictions: str | os.PathLike[str],
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: list[int] | None = None,
    changed: bool = False,
    limit: int | None = None,
    data_root: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    class_names: str | os.PathLike[str] | None = None,
    progress: Progress = False,
) -> dict[str, Any]:
    """Explain the rows ``images`` of a predictions file (or, ``changed``, those where
    RA-TTA's top-1 differs from zero-shot's; the first ``limit``) into the folder ``out``:
    ``image-<row>.png`` (``WIDTH`` x ``HEIGHT`` pixels) per image, ``index.html`` and
    ``explain.json``. Returns the summary (``explain.json``'s content).

    ``predictions`` must hold ``ratta adapt --save-retrieved``'s keys; the four files
    must belong together (same images, classes, description rows, database size), else
    one line says which does not, and nothing is written. The test images are read from
    ``data_root`` (the split of ``dataset``, by default the one the features file names;
    ``class_names`` for csv datasets); without it, the pictures say so. An unreadable
    image becomes a placeholder, noted in the page and the summary.
    """
    evidence = gather(
        predictions,
        features,
        text,
        db,
        data_root=data_root,
        dataset=dataset,
        class_names=class_names,
    )
    rows = select_rows(evidence, images, changed, limit)
    explanations = [evidence.explain(row) for row in rows]
    folder = Path(out)
    pngs = [f"image-{e.row:05d}.png" for e in explanations]
    writes = [Write.of(folder, "--out", "folder")]
    writes += [Write.of(folder / name, "--out") for name in (*pngs, "index.html", "explain.json")]
    with claim(writes, [*evidence.reads, *_picture_reads(explanations)]):
        drawn: list[str] = []
        with progress_bar(progress, "explain", total=len(rows), unit="image") as bar:
            for e, png in zip(explanations, pngs, strict=True):
                drawn += draw(e, evidence.class_names, evidence.config, folder / png)
                bar.update()
        notes = list(dict.fromkeys(drawn))  # a row retrieved for two classes: one note
        what = (
            f"{len(rows)} of the {len(evidence.changed_rows)} test images where RA-TTA "
            "and zero-shot disagree"
            if changed
            else f"{len(rows)} chosen test images"
        )
        heading = f"ratta explain: {what}"
        header = [f"predictions {predictions}, database {db}"]
        if evidence.database.reason:
            header.append(f"No thumbnails: {evidence.database.reason}.")
        if data_root is None:
            header.append("No test images: no --data-root given.")
        summary = {
            **stamp(),
            "inputs": {
                "predictions": str(predictions),
                "features": str(features),
                "text": str(text),
                "db": str(db),
                "data_root": None if data_root is None else str(data_root),
            },
            "selection": {"images": images, "changed": changed, "limit": limit},
            "size_px": [WIDTH, HEIGHT],
            "no_thumbnails": evidence.database.reason,
            "notes": notes,
            "images": [
                {"png": png, **e.to_dict(evidence.class_names)}
                for e, png in zip(explanations, pngs, strict=True)
            ],
        }
        write_json(folder / "explain.json", summary)
        write_text_atomic(
            folder / "index.html",
            page(
                list(zip(explanations, pngs, strict=True)),
                evidence.class_names,
                heading,
                header + notes,
            ),
        )
    return summary


def _picture_reads(explanations: list[Explanation]) -> list[Read]:
    """The database's image files and shards behind the pictures: no output may replace
    them, and none may land in a folder ``ratta db build`` read them from."""
    reads: dict[Path, Read] = {}
    for e in explanations:
        for cand in e.candidates:
            for pic in cand.pictures:
                if pic.source is not None and pic.source not in reads:
                    reads[pic.source] = Read(pic.source, "database images", pic.source.is_dir())
    return list(reads.values())
