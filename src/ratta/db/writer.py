"""Write a database directory: streamed shards and metadata in a temporary folder, then rename.

Every producer (import, build, select, the audit's clean copy) appends blocks of rows with
their metadata to a :class:`DatabaseWriter`; it validates the rows (NaN/Inf and zero
vectors are errors naming the source and row, rows off the unit sphere are re-normalised and
counted), cuts them into ``.npy`` shards written as they arrive (memory bounded by one
block), optionally builds a FAISS index, writes the manifest and only then renames the
folder onto the target. An interrupted or failed write leaves no database behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ratta.atomic import publish
from ratta.backbones import sha256_file
from ratta.db.index import IndexSettings, build_index
from ratta.db.store import EXACT, MANIFEST, METADATA, SHARD_DIR, Database, Manifest, ShardInfo
from ratta.errors import RattaInputError
from ratta.files import NORM_TOL, readonly_tensor, warn_renormalised, write_json
from ratta.guard import Read, Write, check_writes
from ratta.progress import Progress
from ratta.provenance import stamp

if TYPE_CHECKING:
    import pyarrow as pa


DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
SHARD_ROWS = 1 << 20
_HEADER_BYTES = 128  # fixed .npy header size, so the row count can be filled in at the end
METADATA_COLUMNS = ("id", "url", "caption", "source", "source_row")


def metadata_schema(classes: bool = False) -> pa.Schema:
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("source_row", pa.int64()),
    ]
    if classes:
        fields.append(pa.field("classes", pa.list_(pa.int32())))
    return pa.schema(fields)


def check_new_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Fail before any work if the target directory exists or cannot be created."""
    check_writes([Write.of(path, flag, "dir")], [])
    return Path(path)


def new_database(
    out: str | os.PathLike[str], reads: Sequence[Read], flag: str = "--out"
) -> tuple[list[Write], list[Read]]:
    """What a command that writes the new database ``out`` from ``reads`` claims (for
    :func:`ratta.guard.guarded`): the folder, and the chunk folder of a Ray run."""
    writes = [Write.of(out, flag, "dir"), Write.of(f"{out}.parts", f"{flag} chunks", "scratch")]
    return writes, list(reads)


def npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``_HEADER_BYTES`` bytes."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = _HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte header")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


class _ShardFile:
    """One ``.npy`` shard written row block by row block; the header is fixed on close."""

    def __init__(self, path: Path, dtype: np.dtype, dim: int) -> None:
        self.path, self.dtype, self.dim = path, dtype, dim
        self.rows = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(npy_header(dtype, (0, dim)))

    def write(self, block: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.seek(0)
        self._fh.write(npy_header(self.dtype, (self.rows, self.dim)))
        self._fh.close()


class DatabaseWriter:
    """Append validated rows and metadata; :meth:`commit` makes the directory appear.

    Use as a context manager: leaving it without :meth:`commit` (an error, Ctrl-C) deletes
    the temporary folder.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        dim: int,
        dtype: str = "float16",
        shard_rows: int = SHARD_ROWS,
        classes: bool = False,
        backbone: dict[str, Any] | None = None,
    ) -> None:
        import pyarrow.parquet as pq

        if dtype not in DTYPES:
            raise RattaInputError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if shard_rows < 1:
            raise RattaInputError(f"--shard-rows must be >= 1, got {shard_rows}")
        self.out = check_new_dir(out)
        self.dim, self.dtype, self.shard_rows = dim, DTYPES[dtype], shard_rows
        self.backbone = backbone
        # named like atomic_path's files, so that ratta.guard clears one a kill -9 left
        self.tmp = Path(
            tempfile.mkdtemp(
                prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.absolute().parent
            )
        )
        (self.tmp / SHARD_DIR).mkdir()
        self.schema = metadata_schema(classes)
        self._meta = pq.ParquetWriter(self.tmp / METADATA, self.schema, compression="zstd")
        self._shards: list[_ShardFile] = []
        self.count = 0
        self.renormalised = 0
        self._done = False

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        self._done = True
        self._meta.close()
        for shard in self._shards:
            shard.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(
        self,
        embeddings: np.ndarray,
        metadata: pa.Table,
        *,
        source: str,
        rows: np.ndarray | int = 0,
    ) -> None:
        """Append rows [n, d] and their metadata (n rows, columns of :func:`metadata_schema`).

        ``source`` and ``rows`` (the first row, or every row's number) say where the rows
        come from, for error messages.
        """
        n = embeddings.shape[0]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise RattaInputError(
                f"{source}: embeddings have shape {tuple(embeddings.shape)}, expected "
                f"[N, {self.dim}] (all sources of a database must have the same dimension)"
            )
        if metadata.num_rows != n:
            raise ValueError(f"{n} rows but {metadata.num_rows} metadata rows")
        if n == 0:
            return
        block = self._validated(embeddings, source, rows)
        self._meta.write_table(metadata.select(self.schema.names).cast(self.schema))
        done = 0
        while done < n:
            if not self._shards or self._shards[-1].rows >= self.shard_rows:
                if self._shards:
                    self._shards[-1].close()
                name = self.tmp / SHARD_DIR / f"{len(self._shards):06d}.npy"
                self._shards.append(_ShardFile(name, self.dtype, self.dim))
            shard = self._shards[-1]
            take = min(n - done, self.shard_rows - shard.rows)
            shard.write(block[done : done + take])
            done += take
        self.count += n

    def _validated(self, embeddings: np.ndarray, source: str, rows: np.ndarray | int) -> np.ndarray:
        """Rows checked for NaN/Inf/zero; rows off the unit sphere re-normalised in float32."""
        if embeddings.dtype.kind != "f":
            raise RattaInputError(
                f"{source}: embeddings must be floating point, got {embeddings.dtype}"
            )
        x = readonly_tensor(embeddings).float()
        norms = torch.linalg.vector_norm(x, dim=-1)
        for bad, what in (
            (~torch.isfinite(x).all(1), "contains NaN or Inf"),
            (~torch.isfinite(norms), "is too large to normalise"),
            (norms == 0, "is a zero vector"),
        ):
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                row = int(rows[i]) if isinstance(rows, np.ndarray) else rows + i
                raise RattaInputError(f"{source}: embedding row {row} {what}")
        fixed = int(((norms - 1).abs() > NORM_TOL).sum())
        if not fixed:
            return embeddings
        self.renormalised += fixed
        off = (norms - 1).abs() > NORM_TOL  # x may alias a read-only memory map: no writes
        out = np.array(embeddings, dtype=np.result_type(embeddings.dtype, self.dtype))
        out[off.numpy()] = (x[off] / norms[off].unsqueeze(1)).numpy()
        return out

    def commit(
        self,
        provenance: dict[str, Any],
        index: IndexSettings | None = None,
        *,
        queries: np.ndarray | None = None,
        progress: Progress = False,
    ) -> Manifest:
        """Close the files, build the index (if any), write the manifest, rename into place."""
        if self.count == 0:
            self.abort()
            raise RattaInputError(f"{self.out}: no rows to write (the sources are empty)")
        try:
            self._meta.close()
            for shard in self._shards:
                shard.close()
            warn_renormalised(self.out, "embeddings", self.renormalised)
            shards = [
                ShardInfo(f"{SHARD_DIR}/{s.path.name}", s.rows, sha256_file(s.path))
                for s in self._shards
            ]
            manifest = Manifest(
                dimension=self.dim,
                count=self.count,
                dtype=self.dtype.name,
                shards=shards,
                normalisation={
                    "l2": True,
                    "tolerance": NORM_TOL,
                    "renormalised_rows": self.renormalised,
                },
                # no timestamp: the same sources and settings give the same bytes
                provenance={**stamp(), **provenance},
                backbone=self.backbone,
                metadata={
                    "file": METADATA,
                    "columns": list(self.schema.names),
                    "sha256": sha256_file(self.tmp / METADATA),
                },
            )
            write_json(self.tmp / MANIFEST, manifest.to_dict())
            if index is not None and index.spec != EXACT:
                manifest.index = build_index(
                    Database(self.tmp), index, queries=queries, progress=progress
                )
                write_json(self.tmp / MANIFEST, manifest.to_dict())
            publish(self.tmp)
            if self.out.exists():
                raise RattaInputError(f"--out {self.out}: appeared while writing; not replaced")
            os.rename(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return manifest
