"""Embedding sources read shard by shard: ratta databases, clip-retrieval folders, files.

Every source is a sequence of shards; a shard is a [n, d] array (memory-mapped wherever the
format allows) plus its metadata in ratta's columns (id, url, caption, source,
source_row), read on demand. Import, selection and the audit stream over shards through
this one interface, so a corpus never has to fit in memory. The formats are a table
(:data:`FORMATS`): how to recognise each, and how to open it.

- ``ratta``: a database directory (``manifest.json``);
- ``clip-retrieval``: ``img_emb/img_emb_<i>.npy`` (float16 [n, d]) with
  ``metadata/metadata_<i>.parquet`` row-aligned (``url`` or ``image_path``, ``caption``,
  ``key``);
- ``npy``: one [N, d] array; ``safetensors``: one [N, d] tensor (``--key``, default the
  ``embedding`` key or the only 2-D tensor), memory-mapped in place;
- ``pickle``: the reference code's released files, a dict whose ``embedding`` key (or
  ``--key``) holds an [N, d] array, read by :mod:`ratta.db.safe_pickle` (no code runs).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ratta.backbones import cached_file_hash
from ratta.db.store import MANIFEST, Database, is_database_dir
from ratta.errors import RattaInputError

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("id", "url", "caption", "source", "source_row")
# clip-retrieval / img2dataset column names, in order of preference, for ratta's columns
_FOREIGN = {"url": ("url", "image_path"), "caption": ("caption", "text"), "id": ("key",)}


@dataclass
class SourceShard:
    """Rows of one file: embeddings [n, d] and a reader of their metadata.

    ``name`` (the file, relative to the source's parent folder) fills the ``source``
    metadata column and the generated ids; ``file`` is the path, for error messages.
    """

    name: str
    file: Path
    embeddings: np.ndarray
    read_metadata: Callable[[Sequence[str]], dict[str, Any]] | None = field(default=None)

    @property
    def rows(self) -> int:
        return int(self.embeddings.shape[0])

    def metadata(
        self, columns: Sequence[str] = COLUMNS, rows: np.ndarray | None = None
    ) -> pa.Table:
        """The shard's metadata in ratta's columns (missing ones generated or null).

        ``id`` defaults to ``<source>:<row>``, ``source`` to the shard's file and
        ``source_row`` to the row in it. ``rows`` selects (and orders) a subset.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        found = self.read_metadata(columns) if self.read_metadata else {}
        n = self.rows
        take = pa.array(rows, pa.int64()) if rows is not None else None
        out: dict[str, Any] = {}
        for col in columns:
            arr = found.get(col)
            if arr is None:
                if col in ("source_row", "id"):
                    row = pa.array(np.arange(n, dtype=np.int64))
                    arr = row
                    if col == "id":
                        arr = pc.binary_join_element_wise(
                            pa.scalar(self.name), pc.cast(row, pa.string()), ":"
                        )
                elif col == "source":
                    arr = pa.repeat(pa.scalar(self.name, pa.string()), n)
                else:
                    arr = pa.nulls(n, _column_type(col))
            if take is not None:
                arr = arr.take(take)
            out[col] = arr
        return pa.table(out)


class Source:
    """A sequence of shards with a known total shape."""

    def __init__(self, path: Path, fmt: str, shards: Callable[[], Iterator[SourceShard]]) -> None:
        self.path = path
        self.format = fmt
        self._shards = shards
        self.rows = 0
        self.dim = 0
        self.dtypes: set[np.dtype] = set()
        self.backbone: dict[str, Any] | None = None  # known for ratta databases

    def shards(self) -> Iterator[SourceShard]:
        return self._shards()

    def provenance(self) -> dict[str, Any]:
        """Path, format, shape and content hashes of the source, for manifests."""
        info: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "rows": self.rows,
            "dimension": self.dim,
        }
        if self.format == "ratta":
            info["manifest_sha256"] = cached_file_hash(self.path / MANIFEST)
        elif self.path.is_dir():
            info["sha256"] = {
                str(f.relative_to(self.path)): cached_file_hash(f) for f in _clip_files(self.path)
            }
        else:
            info["sha256"] = cached_file_hash(self.path)
        return info


def common_backbone(sources: Sequence[Source]) -> dict[str, Any] | None:
    """The backbone all sources agree on (ratta databases record theirs), else None."""
    found = [s.backbone for s in sources]
    return found[0] if found and all(b == found[0] for b in found) else None


def _check_array(arr: Any, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise RattaInputError(f"{where}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise RattaInputError(f"{where}: embeddings must have rank 2 [N, d], got shape {arr.shape}")
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise RattaInputError(f"{where}: embeddings must be float16/32/64, got {arr.dtype}")
    return arr


def _single(path: Path, fmt: str, arr: np.ndarray) -> Source:
    src = Source(path, fmt, lambda: iter([SourceShard(path.name, path, arr)]))
    src.rows, src.dim, src.dtypes = arr.shape[0], arr.shape[1], {arr.dtype}
    return src


# ------------------------------------------------------------------------------ files


def _open_npy(path: Path, key: str | None) -> Source:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RattaInputError(f"{path}: not a readable .npy array ({exc})") from None
    return _single(path, "npy", _check_array(arr, str(path)))


_ST_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _open_safetensors(path: Path, key: str | None) -> Source:
    """Memory-map one tensor of a safetensors file in place (its bytes are a C array)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(fh.read(size)) if 0 < size < (1 << 27) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise RattaInputError(f"{path}: not a readable safetensors file")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if key is None:
        two_d = [k for k, v in tensors.items() if len(v.get("shape", [])) == 2]
        key = "embedding" if "embedding" in tensors else (two_d[0] if len(two_d) == 1 else None)
        if key is None:
            raise RattaInputError(
                f"{path}: cannot tell which tensor holds the embeddings "
                f"({', '.join(sorted(tensors)) or 'none'}); pass --key"
            )
    if key not in tensors:
        raise RattaInputError(
            f"{path}: missing key '{key}' (found: {', '.join(sorted(tensors)) or 'none'})"
        )
    info = tensors[key]
    if info.get("dtype") not in _ST_NUMPY:
        raise RattaInputError(f"{path}: key '{key}' must be F16/F32/F64, got {info.get('dtype')}")
    shape = tuple(int(s) for s in info["shape"])
    if len(shape) != 2:
        raise RattaInputError(f"{path}: key '{key}' must have rank 2 [N, d], got shape {shape}")
    begin = 8 + size + int(info["data_offsets"][0])
    arr = np.memmap(path, dtype=_ST_NUMPY[info["dtype"]], mode="r", offset=begin, shape=shape)
    return _single(path, "safetensors", _check_array(arr, f"{path}: key '{key}'"))


def _open_pickle(path: Path, key: str | None) -> Source:
    from ratta.db.safe_pickle import safe_load

    obj = safe_load(path)
    if isinstance(obj, dict):
        want = key or "embedding"
        if want not in obj:
            keys = ", ".join(sorted(str(k) for k in obj)) or "none"
            raise RattaInputError(f"{path}: missing key '{want}' (found: {keys}); pass --key")
        return _single(path, "pickle", _check_array(obj[want], f"{path}: key '{want}'"))
    if key is not None:
        raise RattaInputError(f"{path}: --key {key} given but the pickle holds no dict")
    return _single(path, "pickle", _check_array(obj, str(path)))


# ------------------------------------------------------------------------------ folders


_CLIP_EMB = re.compile(r"img_emb_(\d+)\.npy")


def _clip_shards(root: Path) -> list[tuple[int, Path, Path | None]]:
    """(index, img_emb_<i>.npy, metadata_<i>.parquet or None) sorted by index."""
    found = []
    for f in (root / "img_emb").iterdir():
        m = _CLIP_EMB.fullmatch(f.name)
        if m:
            meta = root / "metadata" / f"metadata_{m.group(1)}.parquet"
            found.append((int(m.group(1)), f, meta if (root / "metadata").is_dir() else None))
    found.sort()
    return found


def _clip_files(root: Path) -> list[Path]:
    return [f for _, emb, meta in _clip_shards(root) for f in (emb, meta) if f is not None]


def _parquet_reader(path: Path, rows: int) -> Callable[[Sequence[str]], dict[str, Any]]:
    """Read ratta's columns from a clip-retrieval metadata file (only the ones asked for)."""

    def read(columns: Sequence[str]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            pick = {}
            for col in columns:
                for name in (col, *_FOREIGN.get(col, ())):
                    if name in names:
                        pick[col] = name
                        break
            table = pf.read(columns=sorted(set(pick.values())))
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise RattaInputError(f"{path}: not a readable parquet file ({exc})") from None
        if table.num_rows != rows:
            raise RattaInputError(
                f"{path}: {table.num_rows} metadata rows for {rows} embeddings in the shard"
            )
        out = {}
        for col, name in pick.items():
            arr = table.column(name).combine_chunks()
            out[col] = arr.cast(_column_type(col))
        return out

    return read


def _column_type(col: str) -> pa.DataType:
    import pyarrow as pa

    return {"source_row": pa.int64(), "classes": pa.list_(pa.int32())}.get(col, pa.string())


def _open_clip_retrieval(path: Path, key: str | None) -> Source:
    shards = _clip_shards(path)
    if not shards:
        raise RattaInputError(f"{path}: no img_emb/img_emb_<i>.npy files")
    headers = []
    for _, emb, meta in shards:
        headers.append(_open_npy(emb, None))
        if meta is not None and not meta.is_file():
            raise RattaInputError(f"{meta}: missing (metadata/ exists but lacks this shard's file)")

    def iterate() -> Iterator[SourceShard]:
        for (_, emb, meta), header in zip(shards, headers, strict=True):
            arr = np.load(emb, mmap_mode="r", allow_pickle=False)
            reader = _parquet_reader(meta, header.rows) if meta is not None else None
            yield SourceShard(f"{path.name}/img_emb/{emb.name}", emb, arr, reader)

    src = Source(path, "clip-retrieval", iterate)
    _set_shape(src, [(h.rows, h.dim, next(iter(h.dtypes))) for h in headers])
    return src


def _set_shape(src: Source, shapes: list[tuple[int, int, np.dtype]]) -> None:
    dims = {d for _, d, _ in shapes}
    if len(dims) != 1:
        raise RattaInputError(f"{src.path}: shards have different dimensions {sorted(dims)}")
    src.rows, src.dim = sum(r for r, _, _ in shapes), dims.pop()
    src.dtypes = {t for _, _, t in shapes}


def _open_ratta(path: Path, key: str | None) -> Source:
    db = Database(path)
    meta_path = db.metadata_path
    if meta_path is not None:
        import pyarrow.parquet as pq

        try:
            meta_rows = pq.ParquetFile(meta_path).metadata.num_rows
        except (OSError, ValueError) as exc:  # missing, or not parquet (ArrowInvalid)
            raise RattaInputError(f"{meta_path}: not a readable parquet file ({exc})") from None
        if meta_rows != db.count:
            raise RattaInputError(
                f"{meta_path}: {meta_rows} metadata rows for {db.count} database rows"
            )

    def iterate() -> Iterator[SourceShard]:
        for shard, start, arr in db.shards():
            reader = None
            if meta_path is not None:
                reader = _row_range_reader(meta_path, start, start + shard.rows)
            yield SourceShard(f"{path.name}/{shard.file}", path / shard.file, arr, reader)

    src = Source(path, "ratta", iterate)
    src.rows, src.dim, src.dtypes = db.count, db.dim, {np.dtype(db.manifest.dtype)}
    src.backbone = db.manifest.backbone
    return src


def _row_range_reader(
    path: Path, start: int, stop: int
) -> Callable[[Sequence[str]], dict[str, Any]]:
    """Rows [start, stop) of a database's metadata.parquet, reading only the row groups needed."""

    def read(columns: Sequence[str]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = [c for c in columns if c in pf.schema_arrow.names]
        groups: list[int] = []
        first = offset = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                if not groups:
                    first = offset
                groups.append(g)
            offset += n
        table = pf.read_row_groups(groups, columns=names).slice(start - first, stop - start)
        return {c: table.column(c).combine_chunks() for c in names}

    return read


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class SourceFormat:
    """How to recognise a format and how to open it."""

    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, str | None], Source]
    description: str


def _magic(path: Path, prefixes: tuple[bytes, ...]) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return any(head.startswith(p) for p in prefixes)


FORMATS = {
    f.name: f
    for f in (
        SourceFormat("ratta", is_database_dir, _open_ratta, "ratta database directory"),
        SourceFormat(
            "clip-retrieval",
            lambda p: p.is_dir() and (p / "img_emb").is_dir(),
            _open_clip_retrieval,
            "clip-retrieval folder (img_emb/, metadata/)",
        ),
        SourceFormat(
            "npy", lambda p: p.is_file() and _magic(p, (b"\x93NUMPY",)), _open_npy, ".npy array"
        ),
        SourceFormat(
            "safetensors",
            lambda p: p.is_file() and p.suffix == ".safetensors",
            _open_safetensors,
            ".safetensors file",
        ),
        SourceFormat(
            "pickle",
            lambda p: p.is_file() and (p.suffix in (".pkl", ".pickle") or _magic(p, (b"\x80",))),
            _open_pickle,
            "pickle of numpy arrays (the reference code's databases)",
        ),
    )
}


def open_source(path: str | os.PathLike[str], key: str | None = None) -> Source:
    """Open any supported source, recognised by :data:`FORMATS` in order."""
    p = Path(path)
    if not p.exists():
        raise RattaInputError(f"{p}: not found")
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.open(p, key)
    known = "; ".join(f.description for f in FORMATS.values())
    raise RattaInputError(f"{p}: unrecognised embedding source (known: {known})")
