"""Where the pictures of an explanation come from: the test split, the database's metadata.

A database row is shown from its image when the image is local (a file below the folder
``ratta db build`` read, a member of its webdataset shard, or a local path in ``url``),
linked when only its web address is known, and otherwise said to be missing, with why.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ratta.db.build import IMAGE_EXTENSIONS, TarMember, list_tar
from ratta.db.store import Database
from ratta.errors import RattaInputError

WEB_SCHEMES = ("http://", "https://")
# Sources ``ratta db import`` reads that hold embeddings only (no image, no address).
EMBEDDING_FORMATS = ("npy", "safetensors", "pickle")


@dataclass(frozen=True)
class Picture:
    """A picture to show: read from ``image`` (a file or a tar member), or, not local,
    linked at ``url``; ``missing`` says why there is neither. ``source``: the folder,
    shard or file the image was found in."""

    name: str
    image: Path | TarMember | None = None
    url: str | None = None
    caption: str | None = None
    missing: str | None = None
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "image": None if self.image is None else str(self.image),
            "url": self.url,
            "caption": self.caption,
            "missing": self.missing,
        }


def open_picture(picture: Picture, size: int) -> tuple[Any, str | None]:
    """The picture as an RGB PIL image scaled to fit ``size`` x ``size`` (small images
    enlarged too), or (None, why not)."""
    from PIL import Image, ImageOps

    if picture.image is None:
        return None, picture.missing or ("web image (linked in index.html)" if picture.url else "")
    try:
        with Image.open(picture.image) as img:  # type: ignore[arg-type]
            img.draft("RGB", (size, size))  # JPEG: decode at the nearest smaller scale
            return ImageOps.contain(img.convert("RGB"), (size, size)), None
    # PIL's decoders raise many kinds (OSError, SyntaxError, ValueError, decompression
    # bombs...): any of them means this one picture cannot be shown, not that we stop
    except Exception as exc:
        return None, f"unreadable ({type(exc).__name__})"


class DatabasePictures:
    """The pictures of database rows, found through ``metadata.parquet``.

    ``reason``: why the database has no pictures at all (a bare ``.npy``, no metadata),
    else ``None``. Only the row groups of the rows asked for are read; they, folder
    listings and shard indexes are kept for the next rows.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reason: str | None = None
        self._meta: Any = None
        self._groups: dict[int, list[dict[str, Any]]] = {}
        self._folders: dict[Path, dict[str, str]] = {}
        self._tars: dict[Path, dict[str, TarMember] | None] = {}
        if not self.path.is_dir():
            self.reason = (
                f"{self.path} is a bare embedding array: it has no metadata, so no pictures"
            )
            return
        database = Database(self.path)
        meta = database.metadata_path
        if meta is None or not meta.is_file():
            self.reason = f"{self.path} has no metadata.parquet, so no pictures"
            return
        provenance = database.manifest.provenance
        sources = provenance.get("sources") or []
        formats = sorted({str(src.get("format")) for src in sources if isinstance(src, dict)})
        if provenance.get("operation") == "import" and set(formats) <= set(EMBEDDING_FORMATS):
            self.reason = (
                f"{self.path} was imported from embeddings only ({', '.join(formats)}): "
                "its rows name no image and no address"
            )
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self._meta = pq.ParquetFile(meta)
        except (pa.ArrowException, OSError) as exc:
            self.reason = f"{meta} cannot be read ({type(exc).__name__}), so no pictures"
            return
        groups = self._meta.metadata
        self._starts = np.cumsum(
            [0, *(groups.row_group(g).num_rows for g in range(groups.num_row_groups))]
        )
        if self._starts[-1] != database.count:
            self._meta = None
            self.reason = (
                f"{meta} has {self._starts[-1]} rows for {database.count} embeddings, "
                "so no pictures"
            )

    def pictures(self, rows: np.ndarray) -> list[Picture]:
        """One picture per database row id of ``rows`` (ids >= 0), in order."""
        import pyarrow as pa

        if self._meta is not None:
            try:
                records = [self._record(r) for r in rows.tolist()]
            except (pa.ArrowException, OSError) as exc:
                self._meta = None
                self.reason = f"metadata of {self.path} cannot be read ({type(exc).__name__})"
            else:
                return [self._locate(r, rec) for r, rec in zip(rows.tolist(), records, strict=True)]
        return [Picture(f"row {r}", missing=self.reason) for r in rows.tolist()]

    def _record(self, row: int) -> dict[str, Any]:
        group = int(np.searchsorted(self._starts, row, side="right")) - 1
        if group not in self._groups:
            columns = ["id", "url", "caption", "source"]
            self._groups[group] = self._meta.read_row_group(group, columns=columns).to_pylist()
        return self._groups[group][row - int(self._starts[group])]

    def _locate(self, row: int, rec: dict[str, Any]) -> Picture:
        name = rec["id"] or f"row {row}"
        url, caption, source = rec["url"], rec["caption"], rec["source"]
        found = self._local(name, source, url)
        if isinstance(found, str):
            if url and url.startswith(WEB_SCHEMES):
                return Picture(name, url=url, caption=caption)
            return Picture(name, url=url, caption=caption, missing=found)
        image, where = found
        return Picture(name, image=image, url=url, caption=caption, source=where)

    def _local(
        self, name: str, source: str | None, url: str | None
    ) -> tuple[Path | TarMember, Path] | str:
        """The local image of a row and where it was found, or why there is none."""
        if url and not url.startswith(WEB_SCHEMES):
            local = Path(url.removeprefix("file://"))
            if local.is_file():
                return local, local
        if not source:
            return "no source recorded"
        where = Path(source)
        if not where.exists() and where.suffix and where.suffix != ".tar":
            return f"{source} holds embeddings only, no images"
        if where.is_dir():
            stem = Path(name)
            listing = self._listing(where / stem.parent)
            if stem.name in listing:
                return where / stem.parent / listing[stem.name], where
            return f"{name} not found below {source}"
        if where.is_file():
            members = self._members(where)
            if members is None:
                return f"{source} holds embeddings only, no images"
            if name not in members:
                return f"{name} not found in the shard {source}"
            return members[name], where
        relative = "" if where.is_absolute() else " (relative to the current folder)"
        return f"{source} not found{relative}"

    def _members(self, shard: Path) -> dict[str, TarMember] | None:
        """The images of a webdataset shard by key; ``None`` for a file that is no shard."""
        if shard not in self._tars:
            try:
                items = list_tar(shard) if tarfile.is_tarfile(shard) else None
            except (RattaInputError, OSError, tarfile.TarError):
                items = None
            self._tars[shard] = (
                None if items is None else {it.id: it.image for it in items}  # type: ignore[misc]
            )
        return self._tars[shard]

    def _listing(self, folder: Path) -> dict[str, str]:
        """Image file names of ``folder`` by stem (``ratta db build`` drops the extension)."""
        if folder not in self._folders:
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            self._folders[folder] = {
                n.rpartition(".")[0]: n
                for n in sorted(names)
                if n.rpartition(".")[2].lower() in IMAGE_EXTENSIONS
            }
        return self._folders[folder]
