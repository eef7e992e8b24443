"""``ratta db select``: the subset of a corpus that concerns a dataset's classes.

Two rules, both streaming over the corpus shard by shard (a corpus never has to fit in
memory), both writing a database whose metadata has a ``classes`` column (the classes a
row was selected for) and whose manifest records the rule and the rows per class:

- ``caption`` (the paper's): a row is selected for class c when its caption contains the
  class name, or one of its synonyms, as whole words, ignoring case. Names and captions
  are compared as token sequences (runs of letters/digits/underscore, and single
  punctuation marks; whitespace separates tokens), so "Boeing 737" matches "a boeing  737
  on the runway" and "Boeing 737-800", but not "Boeing 7370"; ``_`` in class names counts
  as a space.
- ``knn``: the k database rows nearest (L2, as RA-TTA retrieves) to each query vector of a
  text features file: the class's zero-shot classifier row, or each of its description
  rows; a row is selected for the classes of the queries that found it.

Rows are stored once even when selected for several classes (counted for each). Later
rows that repeat an earlier selected row are dropped: the same embedding bytes, the same
origin (``source`` file and ``source_row``: one corpus row reached twice, e.g. through
overlapping corpora) or the same (non-empty) ``url``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ratta.db.index import IndexSettings, exact_search
from ratta.db.sources import COLUMNS, Source, SourceShard, common_backbone, open_source
from ratta.db.store import BLOCK_ROWS, Manifest
from ratta.db.writer import DatabaseWriter, check_new_dir
from ratta.errors import RattaInputError

_TOKEN = re.compile(r"\w+|[^\w\s]")
CAPTION_RULE = (
    "class name or synonym as a whole-token sequence in the caption, case-insensitive "
    "(tokens: runs of letters/digits/_ and single punctuation marks; _ in names is a space)"
)


def tokens(text: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(text.casefold()))


class CaptionMatcher:
    """Which classes a caption mentions, in time linear in the caption's length.

    Phrases are indexed by their first token; at each token of the caption only the
    phrases starting with it are compared.
    """

    def __init__(self, phrases: Sequence[Sequence[str]]) -> None:
        self.by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        for c, names in enumerate(phrases):
            for name in names:
                toks = tokens(name.replace("_", " "))
                if not toks:
                    raise RattaInputError(f"class {c}: name or synonym {name!r} has no words")
                self.by_first.setdefault(toks[0], []).append((toks, c))

    def match(self, caption: str | None) -> set[int]:
        if not caption:
            return set()
        toks = tokens(caption)
        found: set[int] = set()
        for i, tok in enumerate(toks):
            for phrase, c in self.by_first.get(tok, ()):
                if toks[i : i + len(phrase)] == phrase:
                    found.add(c)
        return found


def read_synonyms(path: str | os.PathLike[str], class_names: Sequence[str]) -> list[list[str]]:
    """A JSON object {class name: [synonym, ...]} -> synonyms per class, in class order."""
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"--synonyms {p}: file not found")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RattaInputError(f"--synonyms {p}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise RattaInputError(f"--synonyms {p}: expected a JSON object {{name: [synonym, ...]}}")
    index = {n: i for i, n in enumerate(class_names)}
    out: list[list[str]] = [[] for _ in class_names]
    for name, syns in data.items():
        if name not in index:
            raise RattaInputError(f"--synonyms {p}: '{name}' is not one of the class names")
        out[index[name]].extend(syns)
    return out


@dataclass
class _Dedupe:
    """Identities of the rows kept so far, as 16-byte digests (~100 bytes per kept row).

    A row repeats a kept one when it has the same embedding bytes, the same origin (source
    file and row: the same corpus row given twice) or the same non-empty url.
    """

    embeddings: set[bytes] = field(default_factory=set)
    origins: set[bytes] = field(default_factory=set)
    urls: set[bytes] = field(default_factory=set)
    dropped: dict[str, int] = field(default_factory=lambda: {"embedding": 0, "origin": 0, "url": 0})

    def keep(self, row: np.ndarray, origin: str, url: str | None) -> bool:
        keys = (
            ("embedding", self.embeddings, _digest(row.tobytes())),
            ("origin", self.origins, _digest(origin.encode())),
            ("url", self.urls, _digest(url.encode()) if url else None),
        )
        for name, seen, key in keys:
            if key is not None and key in seen:
                self.dropped[name] += 1
                return False
        for _, seen, key in keys:
            if key is not None:
                seen.add(key)
        return True


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _Selection:
    """Appends picked rows of each shard to the writer, deduplicated, counting per class."""

    writer: DatabaseWriter
    num_classes: int
    dedupe: _Dedupe = field(default_factory=_Dedupe)
    counts: np.ndarray = field(init=False)
    scanned: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.num_classes, dtype=np.int64)

    def add(self, shard: SourceShard, rows: np.ndarray, classes: list[list[int]]) -> None:
        import pyarrow as pa

        if rows.size == 0:
            return
        emb = np.asarray(shard.embeddings[rows])
        meta = shard.metadata(COLUMNS, rows=rows)
        origins = [
            f"{src}\t{row}"
            for src, row in zip(
                meta.column("source").to_pylist(),
                meta.column("source_row").to_pylist(),
                strict=True,
            )
        ]
        urls = meta.column("url").to_pylist()
        keep = [i for i in range(rows.size) if self.dedupe.keep(emb[i], origins[i], urls[i])]
        if not keep:
            return
        kept_classes = [sorted(classes[i]) for i in keep]
        for cs in kept_classes:
            self.counts[cs] += 1
        take = pa.array(keep, pa.int64())
        table = meta.take(take).append_column(
            "classes", pa.array(kept_classes, pa.list_(pa.int32()))
        )
        self.writer.add(emb[keep], table, source=str(shard.file), rows=rows[keep])


def _open_corpus(corpus: Sequence[str | os.PathLike[str]]) -> list[Source]:
    if not corpus:
        raise RattaInputError("--corpus: give at least one corpus folder")
    sources = [open_source(c) for c in corpus]
    dims = {s.dim for s in sources}
    if len(dims) != 1:
        raise RattaInputError(
            "--corpus: folders have different dimensions "
            f"({', '.join(f'{s.path}: {s.dim}' for s in sources)})"
        )
    return sources


def _finish(
    sel: _Selection,
    sources: list[Source],
    class_names: Sequence[str],
    rule: dict[str, Any],
    index: IndexSettings | None,
    progress: bool,
) -> Manifest:
    if sel.writer.count == 0:
        raise RattaInputError(
            f"no corpus row was selected for any of the {len(class_names)} classes "
            f"({sel.scanned} rows scanned)"
        )
    selection = {
        **rule,
        "classes": list(class_names),
        "rows_scanned": sel.scanned,
        "rows_selected": sel.writer.count,
        "duplicates_dropped": dict(sel.dedupe.dropped),
        "counts": {name: int(n) for name, n in zip(class_names, sel.counts, strict=True)},
    }
    provenance = {
        "operation": "select",
        "sources": [s.provenance() for s in sources],
        "selection": selection,
    }
    return sel.writer.commit(provenance, index, progress=progress)


def _dtype(sources: Sequence[Source]) -> str:
    from ratta.db.importers import default_dtype

    return default_dtype(sources)


def select_by_caption(
    corpus: Sequence[str | os.PathLike[str]],
    class_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    synonyms: Sequence[Sequence[str]] | None = None,
    backbone: dict[str, Any] | None = None,
    index: IndexSettings | None = None,
    progress: bool = False,
) -> Manifest:
    """Rows whose caption mentions a class name or synonym (the paper's rule, above)."""
    check_new_dir(out)
    if not class_names:
        raise RattaInputError("no class names to select for")
    phrases = [[n, *(synonyms[i] if synonyms else ())] for i, n in enumerate(class_names)]
    matcher = CaptionMatcher(phrases)
    sources = _open_corpus(corpus)
    with DatabaseWriter(
        out,
        dim=sources[0].dim,
        dtype=_dtype(sources),
        classes=True,
        backbone=backbone or common_backbone(sources),
    ) as writer:
        sel = _Selection(writer, len(class_names))
        captioned = 0
        bar = tqdm(
            total=sum(s.rows for s in sources), desc="select", unit="row", disable=not progress
        )
        for source in sources:
            for shard in source.shards():
                captions = _captions(shard)
                captioned += sum(c is not None and c != "" for c in captions)
                rows, classes = [], []
                for r, caption in enumerate(captions):
                    found = matcher.match(caption)
                    if found:
                        rows.append(r)
                        classes.append(list(found))
                sel.add(shard, np.array(rows, dtype=np.int64), classes)
                sel.scanned += shard.rows
                bar.update(shard.rows)
        bar.close()
        if not captioned:
            raise RattaInputError(
                f"--corpus: none of the {sel.scanned} rows has a caption; select with --by knn"
            )
        rule = {"by": "caption", "rule": CAPTION_RULE, "synonyms": _synonym_record(synonyms)}
        return _finish(sel, sources, class_names, rule, index, progress)


def _captions(shard: SourceShard) -> list[str | None]:
    found = shard.read_metadata(["caption"]) if shard.read_metadata else {}
    if "caption" not in found:
        raise RattaInputError(
            f"{shard.file}: no captions (metadata column 'caption'); select with --by knn instead"
        )
    return found["caption"].to_pylist()


def _synonym_record(synonyms: Sequence[Sequence[str]] | None) -> dict[str, Any] | None:
    if not synonyms:
        return None
    return {"count": sum(len(s) for s in synonyms), "per_class": [list(s) for s in synonyms]}


def select_by_knn(
    corpus: Sequence[str | os.PathLike[str]],
    queries: np.ndarray,
    query_class: np.ndarray,
    class_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    k: int = 256,
    query_kind: str = "classifier",
    backbone: dict[str, Any] | None = None,
    index: IndexSettings | None = None,
    progress: bool = False,
) -> Manifest:
    """The ``k`` rows nearest to each query [Q, d]; a row joins its queries' classes [Q].

    Two streaming passes: a running exact top-k over all shards, then the picked rows are
    copied shard by shard.
    """
    check_new_dir(out)
    if k < 1:
        raise RattaInputError(f"--k must be >= 1, got {k}")
    sources = _open_corpus(corpus)
    dim = sources[0].dim
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise RattaInputError(
            f"queries have shape {tuple(queries.shape)} but the corpus has dimension {dim}"
        )
    total = sum(s.rows for s in sources)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        start = 0
        bar = tqdm(total=total, desc="knn", unit="row", disable=not progress)
        for source in sources:
            for shard in source.shards():
                for s in range(0, shard.rows, BLOCK_ROWS):
                    block = shard.embeddings[s : s + BLOCK_ROWS]
                    yield start + s, block
                    bar.update(block.shape[0])
                start += shard.rows
        bar.close()

    _, picked = exact_search(blocks(), total, queries, k)
    owners = np.repeat(query_class.astype(np.int64), picked.shape[1])
    flat = picked.reshape(-1)
    order = np.lexsort((owners, flat))
    flat, owners = flat[order], owners[order]
    rows, first = np.unique(flat, return_index=True)
    class_sets = [sorted(set(c.tolist())) for c in np.split(owners, first[1:])]

    with DatabaseWriter(
        out,
        dim=dim,
        dtype=_dtype(sources),
        classes=True,
        backbone=backbone or common_backbone(sources),
    ) as writer:
        sel = _Selection(writer, len(class_names))
        start = 0
        for source in sources:
            for shard in source.shards():
                lo, hi = np.searchsorted(rows, [start, start + shard.rows])
                sel.add(shard, rows[lo:hi] - start, class_sets[lo:hi])
                start += shard.rows
        sel.scanned = total
        rule = {
            "by": "knn",
            "rule": f"the {k} rows nearest (L2) to each {query_kind} query of a text file",
            "k": k,
            "queries": query_kind,
            "query_count": int(queries.shape[0]),
        }
        return _finish(sel, sources, class_names, rule, index, progress)
