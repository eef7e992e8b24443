"""``ratta db build``: images (folder trees, webdataset tar shards) -> a database directory.

Images are encoded exactly as test images' center crops (``ratta.extract`` with no views:
the same decoding workers, batching, progress bar, chunked resumable writes and skipping of
corrupt files), then streamed into shards with their metadata:

- folders: every ``.jpg/.jpeg/.png/.webp`` below the folder (sorted by relative path);
  ``id`` is the relative path without extension, ``caption`` the content of a sibling
  ``<stem>.txt`` if there is one;
- webdataset tars (uncompressed): samples grouped by key (the member path up to the first
  dot of its file name); the image is the sample's jpg/jpeg/png/webp member, ``caption``
  its ``.txt`` member; ``id`` is the key.

Work happens in ``<out>.build/``; rerunning a killed build with the same settings resumes
from the finished chunks, on either backend (the chunks are the shards of a Ray build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from ratta.backbones import Backbone, cached_file_hash
from ratta.db.index import IndexSettings
from ratta.db.store import BLOCK_ROWS, Manifest
from ratta.db.writer import SHARD_ROWS, DatabaseWriter, new_database
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings, extract_features
from ratta.files import write_json
from ratta.guard import Read, Write, guarded
from ratta.progress import Progress, within

if TYPE_CHECKING:
    from ratta.distributed import RayBackend

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"

# One decoded member per process: PIL reads a member in many small pieces, and each
# DataLoader worker handles one image at a time.
_MEMBER_CACHE: dict[str, Any] = {"key": None, "data": b""}


class TarMember:
    """A read-only file object over one member of an uncompressed tar, for PIL.

    Holds only (tar, offset, size), so it pickles to DataLoader workers cheaply; the bytes
    are read on first use and cached for one member per process.
    """

    def __init__(self, tar: str, name: str, offset: int, size: int) -> None:
        self.tar, self.name, self.offset, self.size = tar, name, offset, size
        self._pos = 0

    def __str__(self) -> str:
        return f"{self.tar}::{self.name}"

    def _data(self) -> bytes:
        key = (self.tar, self.offset)
        if _MEMBER_CACHE["key"] != key:
            with open(self.tar, "rb") as fh:
                fh.seek(self.offset)
                _MEMBER_CACHE["data"] = fh.read(self.size)
            _MEMBER_CACHE["key"] = key
        return _MEMBER_CACHE["data"]

    def read(self, n: int | None = -1) -> bytes:
        data = self._data()
        end = len(data) if n is None or n < 0 else min(len(data), self._pos + n)
        out = data[self._pos : end]
        self._pos = end
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


@dataclass(frozen=True)
class ImageItem:
    """One image to encode: how to open it and its metadata."""

    image: Path | TarMember
    id: str
    caption: str | None
    source: str
    source_row: int


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def list_folder(root: Path) -> list[ImageItem]:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    items = []
    for p in files:
        if _ext(p.name) not in IMAGE_EXTENSIONS:
            continue
        rel = p.relative_to(root).with_suffix("").as_posix()
        txt = p.with_suffix(f".{CAPTION_EXTENSION}")
        caption = txt.read_text(errors="replace").strip() if txt.is_file() else None
        items.append(ImageItem(p, rel, caption, str(root), len(items)))
    return items


def _key(member: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def list_tar(path: Path) -> list[ImageItem]:
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 - used in a with block below
    except tarfile.ReadError as exc:
        raise RattaInputError(
            f"--images {path}: not an uncompressed tar ({exc}); decompress it first"
        ) from None
    images: dict[str, TarMember] = {}
    captions: dict[str, str] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _key(m.name)
            if ext in IMAGE_EXTENSIONS and key not in images:
                images[key] = TarMember(str(path), m.name, m.offset_data, m.size)
            elif ext == CAPTION_EXTENSION:
                fh = tf.extractfile(m)
                if fh is not None:
                    captions[key] = fh.read().decode("utf-8", errors="replace").strip()
    return [
        ImageItem(member, key, captions.get(key), str(path), row)
        for row, (key, member) in enumerate(images.items())
    ]


def list_images(sources: Sequence[str | os.PathLike[str]]) -> list[ImageItem]:
    """Every image of the folders and tar shards, in the order given."""
    items: list[ImageItem] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = list_folder(p)
        elif p.is_file():
            found = list_tar(p)
        else:
            raise RattaInputError(f"--images {p}: not found")
        if not found:
            raise RattaInputError(f"--images {p}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
        items.extend(found)
    return items


def _source_record(src: str | os.PathLike[str], items: list[ImageItem]) -> dict[str, Any]:
    p = Path(src)
    mine = [it for it in items if it.source == str(p)]
    record: dict[str, Any] = {"path": str(p), "images": len(mine)}
    if p.is_file():
        record["format"] = "webdataset"
        record["sha256"] = cached_file_hash(p)
    else:
        # hashing every image would double the reading; names and sizes identify the listing
        h = hashlib.sha256()
        for it in mine:
            h.update(f"{it.id}\t{os.path.getsize(it.image)}\n".encode())  # type: ignore[arg-type]
        record["format"] = "folder"
        record["listing_sha256"] = h.hexdigest()
    return record


def _plan(
    sources: Sequence[str | os.PathLike[str]],
    backbone: Backbone,
    out: str | os.PathLike[str],
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    reads = [r for s in sources for r in Read.of(s, "--images")] + backbone.spec.reads()
    writes, reads = new_database(out, reads)
    return [*writes, Write.of(f"{out}.build", "--out work folder", "scratch")], reads


@guarded(_plan)
def build_database(
    sources: Sequence[str | os.PathLike[str]],
    backbone: Backbone,
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    forward_batch: int = 256,
    workers: int = 2,
    chunk_size: int = 4096,
    shard_rows: int = SHARD_ROWS,
    index: IndexSettings | None = None,
    progress: Progress = False,
    backend: RayBackend | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """Encode the center crops of every image of ``sources`` into the database ``out``.

    Returns the manifest and the extraction summary (``skipped_images``: corrupt or
    unreadable files, which are left out and counted; ``shards``: chunks encoded,
    skipped, retried). With ``backend=RayBackend(...)`` the chunks of ``chunk_size``
    images are encoded by Ray workers (see :func:`ratta.extract.extract_features`); the
    database is the same, byte for byte.
    """
    out = Path(out)
    items = list_images(sources)
    work = Path(f"{out}.build")
    work.mkdir(exist_ok=True)
    features = work / "features.safetensors"
    identity = {
        "sources": [str(s) for s in sources],
        "images": len(items),
        "listing": hashlib.sha256("\n".join(str(it.image) for it in items).encode()).hexdigest(),
        "backbone": backbone.fingerprint,
        "dtype": dtype,
        "chunk_size": chunk_size,
        "forward_batch": forward_batch,
    }
    ident = work / "build.json"
    if ident.exists() and json.loads(ident.read_text()) != json.loads(json.dumps(identity)):
        raise RattaInputError(
            f"{work}: an unfinished build with other settings is there; rerun with the same "
            "settings to resume it, or delete the folder"
        )
    write_json(ident, identity)
    if not features.is_file():
        extract_features(
            [it.image for it in items],  # type: ignore[misc]  # PIL opens paths and TarMembers
            None,
            backbone,
            features,
            ExtractSettings(views=0, seed=0, dtype=dtype),
            batch_size=batch_size,
            forward_batch=forward_batch,
            workers=workers,
            chunk_size=chunk_size,
            metadata={"db_build": identity["sources"]},
            progress=progress,
            backend=backend,
        )
    summary = json.loads(Path(f"{features}.json").read_text())
    manifest = _write(
        features, items, out, dtype, shard_rows, backbone, summary, sources, index, progress
    )
    shutil.rmtree(work, ignore_errors=True)
    return manifest, summary


def _write(
    features: Path,
    items: list[ImageItem],
    out: Path,
    dtype: str,
    shard_rows: int,
    backbone: Backbone,
    summary: dict[str, Any],
    sources: Sequence[str | os.PathLike[str]],
    index: IndexSettings | None,
    progress: Progress,
) -> Manifest:
    import pyarrow as pa

    with safe_open(str(features), framework="numpy") as f:
        n, dim = f.get_slice("image").get_shape()
        with DatabaseWriter(
            out, dim=dim, dtype=dtype, shard_rows=shard_rows, backbone=backbone.fingerprint
        ) as writer:
            for s in range(0, n, BLOCK_ROWS):
                stop = min(n, s + BLOCK_ROWS)
                emb = f.get_slice("image")[s:stop]
                idx = f.get_slice("index")[s:stop]
                picked = [items[i] for i in idx.tolist()]
                meta = pa.table(
                    {
                        "id": [it.id for it in picked],
                        "url": pa.nulls(len(picked), pa.string()),
                        "caption": pa.array([it.caption for it in picked], pa.string()),
                        "source": [it.source for it in picked],
                        "source_row": pa.array([it.source_row for it in picked], pa.int64()),
                    }
                )
                writer.add(np.asarray(emb), meta, source=str(features), rows=s)
            skipped = summary.get("skipped_images", [])
            return writer.commit(
                {
                    "operation": "build",
                    "sources": [_source_record(s, items) for s in sources],
                    "images": len(items),
                    "encoded": n,
                    "skipped": len(skipped),
                    "skipped_examples": skipped[:20],
                    "preprocessing": "center crop (resize shorter side, center crop), as test "
                    "images",
                },
                index,
                progress=within(progress, "index"),
            )
