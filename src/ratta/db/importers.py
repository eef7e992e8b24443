"""``ratta db import``: existing embeddings -> a database directory.

Any source of :mod:`ratta.db.sources` (the reference code's pickles, ``.npy``,
``.safetensors``, clip-retrieval folders, other ratta databases), one or several
concatenated in order, streamed block by block into shards with their metadata.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from ratta.atomic import check_free_space
from ratta.db.index import IndexSettings
from ratta.db.sources import Source, common_backbone, open_source
from ratta.db.store import BLOCK_ROWS, Manifest
from ratta.db.writer import SHARD_ROWS, DatabaseWriter, new_database
from ratta.errors import RattaInputError
from ratta.guard import Read, Write, guarded
from ratta.progress import Progress, progress_bar, within


def default_dtype(sources: Sequence[Source]) -> str:
    """float16 when every source is float16 (keeps their bytes), float32 otherwise."""
    dtypes = {t for s in sources for t in s.dtypes}
    return "float16" if dtypes == {np.dtype(np.float16)} else "float32"


def stream_into(writer: DatabaseWriter, source: Source, bar: tqdm | None = None) -> None:
    """Append every row of ``source`` to ``writer``, one block at a time (``bar`` counts
    the rows)."""
    for shard in source.shards():
        meta = shard.metadata()
        for s in range(0, shard.rows, BLOCK_ROWS):
            block = shard.embeddings[s : s + BLOCK_ROWS]
            writer.add(
                np.asarray(block),
                meta.slice(s, block.shape[0]),
                source=str(shard.file),
                rows=s,
            )
            if bar is not None:
                bar.update(block.shape[0])


def _plan(
    sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **_: Any
) -> tuple[list[Write], list[Read]]:
    return new_database(out, [r for s in sources for r in Read.of(s, "source")])


@guarded(_plan)
def import_database(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    key: str | None = None,
    dtype: str | None = None,
    shard_rows: int = SHARD_ROWS,
    backbone: dict[str, Any] | None = None,
    index: IndexSettings | None = None,
    queries: np.ndarray | None = None,
    progress: Progress = False,
) -> Manifest:
    """Write the rows of ``sources`` (concatenated in order) as the database ``out``.

    ``key`` names the embeddings in a pickle dict or safetensors file; ``dtype`` defaults
    to :func:`default_dtype`. ``backbone`` is recorded as given (the embeddings' encoder).
    """
    if not sources:
        raise RattaInputError("give at least one source to import")
    opened = [open_source(s, key) for s in sources]
    dims = {s.dim for s in opened}
    if len(dims) != 1:
        shapes = ", ".join(f"{s.path}: {s.dim}" for s in opened)
        raise RattaInputError(f"sources have different dimensions ({shapes})")
    dtype = dtype or default_dtype(opened)
    rows = sum(s.rows for s in opened)
    check_free_space(out, rows * next(iter(dims)) * np.dtype(dtype).itemsize)
    with DatabaseWriter(
        out,
        dim=dims.pop(),
        dtype=dtype,
        shard_rows=shard_rows,
        backbone=backbone or common_backbone(opened),
    ) as writer:
        with progress_bar(progress, "import", total=rows, unit="row") as bar:
            for src in opened:
                stream_into(writer, src, bar)
        return writer.commit(
            {
                "operation": "import",
                "sources": [s.provenance() for s in opened],
                "key": key,
            },
            index,
            queries=queries,
            progress=within(progress, "index"),
        )
