"""The database directory format: ``.npy`` shards, ``metadata.parquet``, a FAISS index, a manifest.

Layout (a public contract, documented in docs/db.md)::

    DIR/manifest.json            what the directory holds and where it came from
    DIR/embeddings/000000.npy    [n_i, d] float16/float32 shards, L2-normalised, memory-mapped
    DIR/metadata.parquet         optional: one row per embedding (id, url, caption, source,
                                 source_row[, classes]), in shard order
    DIR/index-<hash>.faiss       optional: an approximate FAISS index over all rows

The rows of the database are the shards concatenated in manifest order. Reading never
unpickles anything; everything is validated once, on open, with one-line errors naming the
file. Writing lives in :mod:`ratta.db.writer`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ratta.backbones import sha256_file
from ratta.errors import RattaInputError
from ratta.files import (
    ArrayRows,
    load_rows,
    open_database,
)
from ratta.identity import read_npy_header

FORMAT = "ratta-database"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "embeddings"
METADATA = "metadata.parquet"
EXACT = "exact"
# Rows read at a time when streaming: 64k x 512 float32 is 128 MB at most.
BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class ShardInfo:
    """One ``.npy`` shard: its path relative to the directory, row count and file sha256."""

    file: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """``manifest.json``: shape, dtype, shards, metadata, index and provenance of a database.

    ``index`` is ``{"spec": "exact"}`` (search scans every row, as the paper does) or the
    description of the FAISS index file (spec, search parameters, measured recall).
    ``provenance`` says which operation produced the rows from which sources, with which
    selection rule, and their hashes.
    """

    dimension: int
    count: int
    dtype: str
    shards: list[ShardInfo]
    normalisation: dict[str, Any]
    provenance: dict[str, Any]
    backbone: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    index: dict[str, Any] = field(default_factory=lambda: {"spec": EXACT})
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ("format", "version", "count", "dimension", "dtype", "normalisation")
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RattaInputError(
                f"{path}: not a ratta database manifest ('format' is not {FORMAT!r})"
            )
        if data.get("version") != VERSION:
            raise RattaInputError(
                f"{path}: database format version {data.get('version')} is not supported "
                f"(this ratta reads version {VERSION})"
            )
        try:
            shards = [
                ShardInfo(str(s["file"]), int(s["rows"]), str(s["sha256"])) for s in data["shards"]
            ]
            manifest = cls(
                dimension=int(data["dimension"]),
                count=int(data["count"]),
                dtype=str(data["dtype"]),
                shards=shards,
                normalisation=dict(data["normalisation"]),
                provenance=dict(data["provenance"]),
                backbone=data.get("backbone"),
                metadata=data.get("metadata"),
                index=dict(data.get("index") or {"spec": EXACT}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RattaInputError(
                f"{path}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from None
        if manifest.dtype not in ("float16", "float32"):
            raise RattaInputError(
                f"{path}: 'dtype' must be float16 or float32, got {manifest.dtype!r}"
            )
        for name in [s.file for s in shards] + [
            str(section["file"])
            for section in (manifest.metadata, manifest.index)
            if section and "file" in section
        ]:
            _check_inside(path.parent, name, path)
        if sum(s.rows for s in shards) != manifest.count:
            raise RattaInputError(
                f"{path}: 'count' is {manifest.count} but the shards hold "
                f"{sum(s.rows for s in shards)} rows"
            )
        if manifest.count == 0:
            raise RattaInputError(f"{path}: the database is empty (0 rows)")
        return manifest


def _check_inside(folder: Path, name: str, manifest: Path) -> None:
    """A file named by the manifest must lie inside the database folder."""
    real = os.path.realpath(folder / name)
    base = os.path.realpath(folder)
    if Path(name).is_absolute() or not real.startswith(base + os.sep):
        raise RattaInputError(
            f"{manifest}: file '{name}' lies outside the database folder; a manifest may only "
            "name files inside it"
        )


# FAISS search parameters take whole numbers; FAISS itself wraps -1 or nan to 2^64 - 1.
_PARAM_MIN = {"nprobe": 1, "efSearch": 1, "quantizer_efSearch": 1, "k_factor": 1}


def check_search_params(text: str) -> str:
    """``name=value[,name=value]`` with whole, non-negative values (positive for nprobe,
    efSearch and k_factor); FAISS itself checks that the names fit the index."""
    if not text.strip():
        raise RattaInputError("--search-params: empty (e.g. nprobe=32)")
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            number = float(value) if sep else math.nan
        except ValueError:
            number = math.nan
        low = _PARAM_MIN.get(name.strip(), 0)
        if not (math.isfinite(number) and number == int(number) and low <= number < 2**31):
            raise RattaInputError(
                f"--search-params {text}: '{item.strip()}' must be name=N with a whole N "
                f">= {low} (e.g. nprobe=32, efSearch=128)"
            )
    return text


def is_database_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Database:
    """An opened database directory: manifest checked against the shard headers.

    Embeddings are only ever memory-mapped; :meth:`blocks` streams them one block of rows
    at a time, so memory stays bounded by the block whatever the size of the database.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise RattaInputError(f"{self.path}: database directory not found")
        if not manifest_path.is_file():
            raise RattaInputError(
                f"{self.path}: not a database directory (no {MANIFEST}); "
                "create one with 'ratta db import' or 'ratta db build'"
            )
        try:
            data = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RattaInputError(f"{manifest_path}: invalid JSON ({exc})") from None
        self.manifest = Manifest.from_dict(data, manifest_path)
        for shard in self.manifest.shards:
            arr = self._open_shard(shard)
            if arr.shape != (shard.rows, self.dim) or arr.dtype != np.dtype(self.manifest.dtype):
                raise RattaInputError(
                    f"{self.path / shard.file}: shard is {arr.dtype} {arr.shape} but the manifest "
                    f"says {self.manifest.dtype} ({shard.rows}, {self.dim})"
                )

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dimension

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype)

    @property
    def index_spec(self) -> str:
        return str(self.manifest.index.get("spec", EXACT))

    @property
    def has_index(self) -> bool:
        return "file" in self.manifest.index

    @property
    def metadata_path(self) -> Path | None:
        meta = self.manifest.metadata
        return self.path / meta["file"] if meta else None

    def _open_shard(self, shard: ShardInfo) -> np.ndarray:
        p = self.path / shard.file
        if not p.is_file():
            raise RattaInputError(f"{p}: shard listed in {self.path / MANIFEST} is missing")
        shape, dtype, _ = read_npy_header(p)
        if len(shape) != 2 or shape[0] == 0:
            raise RattaInputError(
                f"{p}: shard is {dtype} {shape} but the manifest says "
                f"{self.manifest.dtype} ({shard.rows}, {self.dim})"
            )
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise RattaInputError(f"{p}: not a readable .npy shard ({exc})") from None

    def shards(self) -> Iterator[tuple[ShardInfo, int, np.ndarray]]:
        """(shard, first row, memory-mapped [n, d] array) in row order."""
        start = 0
        for shard in self.manifest.shards:
            yield shard, start, self._open_shard(shard)
            start += shard.rows

    def files(self) -> Iterator[tuple[Path, int, np.ndarray]]:
        """(shard file, first row, memory-mapped [n, d] array) in row order."""
        for shard, start, arr in self.shards():
            yield self.path / shard.file, start, arr

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, memory-mapped block) of at most ``rows`` rows, never across shards."""
        for _, start, arr in self.shards():
            for s in range(0, arr.shape[0], rows):
                yield start + s, arr[s : s + rows]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The embeddings of the given global row ids (any order), read from the shards."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.dim), dtype=self.manifest.dtype)
        for _, start, arr in self.shards():
            hit = (ids >= start) & (ids < start + arr.shape[0])
            if hit.any():
                out[hit] = arr[ids[hit] - start]
        return out

    def verify(self) -> list[str]:
        """The files (shards, metadata, index) whose sha256 differs from the manifest's."""
        files = [(s.file, s.sha256) for s in self.manifest.shards]
        for section in (self.manifest.metadata, self.manifest.index):
            if section and "file" in section and "sha256" in section:
                files.append((section["file"], section["sha256"]))
        bad = []
        for name, digest in files:
            p = self.path / name
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(str(p))
        return bad

    def read_index(self) -> Any:
        """The FAISS index, in host memory, with the manifest's search parameters."""
        import faiss

        info = self.manifest.index
        p = self.path / info["file"]
        if not p.is_file():
            raise RattaInputError(f"{p}: index file listed in the manifest is missing")
        try:
            index = faiss.read_index(str(p))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            raise RattaInputError(f"{p}: not a readable FAISS index ({first})") from None
        if index.ntotal != self.count or index.d != self.dim:
            raise RattaInputError(
                f"{p}: index holds {index.ntotal} x {index.d} but the database is "
                f"{self.count} x {self.dim}; rebuild it with 'ratta db index'"
            )
        if info.get("search_params"):
            try:
                params = check_search_params(str(info["search_params"]))
                faiss.ParameterSpace().set_index_parameters(index, params)
            except (RattaInputError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0]
                raise RattaInputError(
                    f"{self.path / MANIFEST}: index search parameters are not valid ({first})"
                ) from None
        return index


@dataclass(frozen=True)
class DatabaseInfo:
    """What ``ratta adapt`` checks before loading: rows, dimension, index (if any)."""

    path: Path
    count: int
    dim: int
    index_spec: str
    has_index: bool


def inspect_database(path: str | os.PathLike[str]) -> DatabaseInfo:
    """Shape and index of a database ``.npy`` file or directory, from headers only."""
    p = Path(path)
    if not p.exists():
        raise RattaInputError(f"{p}: database not found (a .npy file or a database directory)")
    if p.is_dir():
        db = Database(p)
        return DatabaseInfo(p, db.count, db.dim, db.index_spec, db.has_index)
    arr = open_database(p)
    return DatabaseInfo(p, arr.shape[0], arr.shape[1], EXACT, False)


def load_for_search(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    with_index: bool = True,
) -> tuple[Tensor, Tensor, Any | None]:
    """Embeddings [N, d] of ``dtype`` on ``device``, their squared norms [N], and the index.

    ``path`` is a ``.npy`` file (no index) or a database directory, whose shards are read
    in order and validated chunk by chunk (NaN/Inf and zero rows are errors, rows off the
    unit sphere are re-normalised with a warning): :func:`ratta.files.load_rows`. The index
    (in host memory) is ``None`` for exact databases or when ``with_index`` is false.
    """
    source = open_rows(path)
    emb, sq_norms = load_rows(source, dtype, device)
    index = None
    if with_index and isinstance(source, Database) and source.has_index:
        index = source.read_index()
    return emb, sq_norms, index


def open_rows(path: str | os.PathLike[str]) -> Database | ArrayRows:
    """A database directory or ``.npy`` file, opened (headers checked), rows memory-mapped."""
    p = Path(path)
    return Database(p) if p.is_dir() else ArrayRows(p)
